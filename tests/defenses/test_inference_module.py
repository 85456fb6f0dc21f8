"""The data-inference defense module: config section, the ATS batch transform (draws independent
of chunking and engine, pixel space), gradient pruning as a stage, whole runs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spfl_vmap import Config, ConfigError, Simulator
from spfl_vmap.data import load_dataset
from spfl_vmap.data.loaders import DEBIAN_FASHION_MNIST, PIXEL_NORMALIZATION
from spfl_vmap.defenses.ats import parse_policies
from spfl_vmap.defenses.ats_search import read_policy_csv
from spfl_vmap.defenses.pruning import prune_per_layer
from spfl_vmap.modules.inference import ATSTransform, list_origin, pixel_normalization, resolve_policies

BASE = dict(dataset="digits", model="lr", partition_method="hetero", partition_alpha=0.5, partition_min_samples=10,
            client_num_in_total=6, client_num_per_round=6, comm_round=2, epochs=2, batch_size=7, lr=0.05,
            frequency_of_the_test=1, progress=False, device="cpu")
ATS = dict(data_recovery_protection=True, ats_policy="3-1-7+43-18-18+41-11-31")
SEARCH_CSV = Path(__file__).resolve().parents[2] / "docs" / "results" / "ats_search_fashion_mnist_cnn.csv"


def cfg_of(**kw) -> Config:
    return Config(**{**BASE, **kw})


# ---- config section ---------------------------------------------------------------------------
FMNIST = dict(dataset="fashion_mnist", data_recovery_protection=True)


@pytest.mark.parametrize("kw,words", [
    (dict(augid=1), "add --data_recovery_protection"),
    (dict(ats_use_prob=True), "add --data_recovery_protection"),
    (dict(data_recovery_protection=True), "no ATS policy list for dataset digits"),
    (dict(**FMNIST, augid=5), "--augid 5 is out of range"),
    (dict(**FMNIST, augid=-1), "--augid -1 is out of range"),
    (dict(**FMNIST, topn=6), "--topn 6"),
    (dict(**FMNIST, topn=0), "--topn 0"),
    (dict(**FMNIST, augid=1, topn=2), "not --augid and --topn"),
    (dict(**FMNIST, augid=1, ats_policy="3-1-7"), "not --augid and --ats_policy"),
    (dict(ats_list="mnistRGB"), "add --data_recovery_protection"),
    (dict(**FMNIST, ats_list="mnist"), "unknown --ats_list 'mnist'"),
    (dict(**FMNIST, ats_list="cifar100/lr"), "exists for the models resnet20, convnet"),
    (dict(**FMNIST, ats_list="cifar10", ats_policy="3-1-7"), "not both"),
    (dict(**FMNIST, ats_list="mnistRGB", augid=5), "--augid 5 is out of range"),
    (dict(data_recovery_protection=True, ats_policy="3-1-77"), "unknown sub-policy id 77"),
    (dict(data_recovery_protection=True, ats_policy="translate"), "ATS policy"),
    (dict(grad_prune=60.0), "--grad_prune"),
    (dict(grad_prune=0.0), "--grad_prune"),
    (dict(grad_prune=float("nan")), "--grad_prune"),
])
def test_config_errors_are_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        cfg_of(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_policies_follow_the_lists():
    """FashionMNIST and MNIST use our search's list (the top of its ranked CSV); the toolkit's
    lists stay reachable by --ats_list, by the toolkit's --dataset mnistRGB and for CIFAR."""
    ours = read_policy_csv(SEARCH_CSV)[:5]  # docs/results/ats_search_fashion_mnist_cnn.csv, kept policies in rank order
    assert resolve_policies(cfg_of(**FMNIST))[1] == parse_policies("+".join(ours[:2]))  # the toolkit's default --topn 2
    for dataset in ("fashion_mnist", "mnist"):
        for model in ("cnn", "convnet"):  # convnet has no list of its own: the list's first model's, as the toolkit
            for i, name in enumerate(ours):
                cfg = cfg_of(dataset=dataset, model=model, data_recovery_protection=True, augid=i)
                assert resolve_policies(cfg) == (f"fashion_mnist/cnn[{i}]", parse_policies(name))
                assert "our search" in list_origin(cfg)
    assert resolve_policies(cfg_of(**FMNIST, topn=5))[1] == parse_policies("+".join(ours))
    mnist = ("41-11-31", "34-11-36", "11-41-28", "11-28-49", "11-39-8")  # policy_list_mnistRGB.csv
    for i, name in enumerate(mnist):
        for kw in (dict(**FMNIST, ats_list="mnistRGB"), dict(**FMNIST, ats_list="mnistRGB/convnet"),
                   dict(dataset="mnistRGB", model="convnet", data_recovery_protection=True)):
            cfg = cfg_of(**kw, augid=i)
            assert resolve_policies(cfg) == (f"mnistRGB/convnet[{i}]", parse_policies(name))
            assert "toolkit" in list_origin(cfg)
    c100 = dict(dataset="cifar100", data_recovery_protection=True)
    assert resolve_policies(cfg_of(**c100, model="resnet20", augid=1))[1] == parse_policies("43-18-18")
    assert resolve_policies(cfg_of(**c100, model="convnet", augid=0))[1] == parse_policies("3-1-3")
    assert resolve_policies(cfg_of(**c100, model="lr", augid=0))[0] == "cifar100/resnet20[0]"  # the first list, as the toolkit
    assert resolve_policies(cfg_of(**FMNIST, ats_list="cifar100/convnet", augid=1))[1] == parse_policies("21-13-3")
    assert resolve_policies(cfg_of(dataset="cifar10", model="convnet", data_recovery_protection=True, augid=2))[1] == \
        parse_policies("3-21-19")
    assert resolve_policies(cfg_of(**ATS))[1] == parse_policies(ATS["ats_policy"])
    assert list_origin(cfg_of(**ATS)) == "given with --ats_policy"
    assert cfg_of(dataset="mnistRGB", model="convnet").dataset == "mnist_rgb"  # the toolkit's dataset name


# ---- the batch transform ------------------------------------------------------------------------
def batch(sim: Simulator, n: int, B: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(sim.dataset.y_train), (n, B), generator=g)
    real = torch.randint(1, B + 1, (n,), generator=g)  # a padded last batch: only the first real[i] slots hold samples
    valid = torch.arange(B)[None, :] < real[:, None]
    return sim.dataset.x_train[idx], sim.dataset.y_train[idx], valid, real


def test_console_and_config_name_the_policies_and_their_list():
    from spfl_vmap.runner import describe_lines

    sim = Simulator(cfg_of(data_recovery_protection=True, ats_list="fashion_mnist", augid=0))  # digits has no list of its own
    d = sim.describe()["ats"]
    assert (d["policies"], d["source"]) == (["11-37-12"], "fashion_mnist/cnn[0]") and "our search" in d["list"]
    line = [s for s in describe_lines(sim.describe()) if s.startswith("ats:")]
    assert line == ["ats: 11-37-12 (posterize 6, solarize 142, color 0.167); fashion_mnist/cnn[0], our search's list "
                    "(docs/results/ats_search_fashion_mnist_cnn.csv)"]
    hybrid = describe_lines(Simulator(cfg_of(**ATS)).describe())
    assert any(s.startswith("ats: 3-1-7 (") and "each image draws one; given with --ats_policy" in s for s in hybrid)


def test_transform_does_not_depend_on_chunking_or_padding():
    sim = Simulator(cfg_of(**ATS))
    stage = sim.stage("ats")
    ctx = sim.context(1)
    n, B = ctx.num_clients, 9
    x, y, valid, real = batch(sim, n, B)
    rows = torch.arange(n)
    (x2, y2), _ = stage.apply(ctx, x, y, rows, valid)
    assert torch.equal(y2, y) and x2.shape == x.shape
    changed = (x2 - x).abs().flatten(2).amax(2) > 1e-4  # (n, B)
    assert float(changed.double().mean()) > 0.9  # every policy of the hybrid changes almost every image
    for i in range(n):  # chunks of one, and the per-client paths' real samples only
        (xi, _), _ = stage.apply(ctx, x[i : i + 1], y[i : i + 1], rows[i : i + 1], valid[i : i + 1])
        torch.testing.assert_close(xi, x2[i : i + 1], atol=1e-6, rtol=0)
        b = int(real[i])
        (xr, _), _ = stage.apply(ctx, x[i : i + 1, :b], y[i : i + 1, :b], rows[i : i + 1], valid[i : i + 1, :b])
        torch.testing.assert_close(xr, x2[i : i + 1, :b], atol=1e-6, rtol=0)
    # another round, or the same images at other clients, draw differently
    (x3, _), _ = stage.apply(sim.context(2, ctx.client_ids), x, y, rows, valid)
    assert not torch.allclose(x3, x2)


def test_transform_works_in_the_datasets_pixel_space():
    # 28 (solarize at 256) is the identity: the round trip to pixels and back must keep x
    sim = Simulator(cfg_of(data_recovery_protection=True, ats_policy="28"))
    ctx = sim.context(1)
    x, y, valid, _ = batch(sim, ctx.num_clients, 5)
    (x2, _), _ = sim.stage("ats").apply(ctx, x, y, torch.arange(ctx.num_clients), valid)
    torch.testing.assert_close(x2, x, atol=1e-5, rtol=0)
    # 0 is invert: pixel p -> 1 - p. digits' pixels are levels / 16 in [0, 1], normalised with its own
    # statistics; the stage maps the data's range [lo, hi] to [0, 1]
    inv = Simulator(cfg_of(data_recovery_protection=True, ats_policy="0"))
    (x3, _), _ = inv.stage("ats").apply(ctx, x, y, torch.arange(ctx.num_clients), valid)
    lo, hi = float(sim.dataset.x_train.min()), float(sim.dataset.x_train.max())
    torch.testing.assert_close(x3, lo + hi - x, atol=1e-5, rtol=0)  # p = (x - lo) / (hi - lo)


def test_image_datasets_use_their_normalization_constants():
    env = SimpleNamespace(device=torch.device("cpu"), packed=None)
    for name, (mean, std) in PIXEL_NORMALIZATION.items():
        m, s = pixel_normalization(SimpleNamespace(dataset=name), env)  # (C, 1, 1)
        assert m.flatten().tolist() == pytest.approx(mean) and s.flatten().tolist() == pytest.approx(std)


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_pixels_are_8_bit_levels():
    data = load_dataset("fashion_mnist")
    mean, std = PIXEL_NORMALIZATION["fashion_mnist"]
    p = data.x_train[:500] * std[0] + mean[0]  # what the stage transforms
    assert float(p.min()) > -1e-5 and float(p.max()) < 1 + 1e-5
    assert float((p * 255 - torch.round(p * 255)).abs().max()) < 1e-3


# ---- whole runs ---------------------------------------------------------------------------------
def final_w(**kw) -> torch.Tensor:
    sim = Simulator(cfg_of(**kw))
    sim.step()
    sim.step()
    return sim.w.clone()


def test_ats_run_is_the_same_for_every_chunking_and_engine():
    ref = final_w(**ATS, strategy="vmap", client_chunk=6)
    for kw in (dict(strategy="vmap", client_chunk=1), dict(strategy="vmap", client_chunk=4), dict(strategy="loop"),
               dict(engine="loop")):
        w = final_w(**ATS, **kw)
        assert float((w - ref).norm() / ref.norm()) < 1e-5, kw
    clean = final_w(strategy="vmap", client_chunk=6)
    assert float((clean - ref).norm() / ref.norm()) > 1e-3  # the transforms did change the run


def test_evaluation_is_not_transformed():
    sim, plain = Simulator(cfg_of(**ATS)), Simulator(cfg_of())
    sim.step()
    plain.w = sim.w.clone()
    assert sim.evaluate() == plain.evaluate()
    assert isinstance(sim.stage("ats"), ATSTransform)


def test_pruning_stage_prunes_every_client_per_layer():
    sim = Simulator(cfg_of(grad_prune=0.3))
    stage = sim.stage("grad_prune")
    ctx = sim.context(1)
    U = torch.randn(ctx.num_clients, sim.num_params, generator=torch.Generator().manual_seed(0))
    out, m = stage.apply(ctx, U)
    ref, kept = prune_per_layer(U, sim.spec.numels, 0.3)
    assert torch.equal(out, ref)
    assert m["grad_prune_kept"] == pytest.approx(float(kept.mean()))
    assert 0.68 < m["grad_prune_kept"] < 0.72
    row = sim.step()  # in a run: every round reports the kept fraction
    assert 0.68 < row["grad_prune_kept"] < 0.72
