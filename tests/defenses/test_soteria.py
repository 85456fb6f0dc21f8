"""Soteria (Sun et al. CVPR 2021): the vectorized stage against a per-client loop of the authors'
rule as coded in jeremy313/Soteria ``GS_attack/reconstruct_image.py`` (one backward per feature,
``np.percentile``, ``abs(sum) < thresh``), both Jacobian modes, runs, one-line errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from spfl_vmap import Config, ConfigError, Simulator
from spfl_vmap.cli import main
from spfl_vmap.defenses.soteria import final_linear, representation_model, representation_ratios
from spfl_vmap.modules.inference import SoteriaPruning

BASE = dict(dataset="digits", partition_method="hetero", partition_alpha=0.5, partition_min_samples=10,
            client_num_in_total=5, client_num_per_round=5, comm_round=2, epochs=1, batch_size=16, lr=0.05,
            frequency_of_the_test=1, progress=False, device="cpu")


def authors_mask(model: nn.Module, fc: nn.Linear, x: torch.Tensor, rate: float) -> np.ndarray:
    """reconstruct_image.py's ``--defense ours`` mask for one client's batch ``x (B, C, H, W)``."""
    feats = {}
    hook = fc.register_forward_hook(lambda m, i, o: feats.__setitem__("r", i[0]))
    ground_truth = x.clone().requires_grad_(True)
    model(ground_truth)
    hook.remove()
    feature_fc1_graph = feats["r"]
    deviation_f1_target = torch.zeros_like(feature_fc1_graph)
    deviation_f1_x_norm = torch.zeros_like(feature_fc1_graph)
    for f in range(deviation_f1_x_norm.size(1)):
        deviation_f1_target[:, f] = 1
        feature_fc1_graph.backward(deviation_f1_target, retain_graph=True)
        deviation_f1_x = ground_truth.grad.data
        deviation_f1_x_norm[:, f] = torch.norm(deviation_f1_x.view(deviation_f1_x.size(0), -1), dim=1) / (feature_fc1_graph.data[:, f] + 0.1)
        model.zero_grad()
        ground_truth.grad.data.zero_()
        deviation_f1_target[:, f] = 0
    deviation_f1_x_norm_sum = deviation_f1_x_norm.sum(axis=0)
    thresh = np.percentile(deviation_f1_x_norm_sum.flatten().cpu().numpy(), rate * 100)
    return np.where(abs(deviation_f1_x_norm_sum.cpu()) < thresh, 0, 1).astype(np.float32)


# on 8x8 digits: resnet20 has 64 features for 64 inputs (reverse mode), cnn 512 (forward mode)
@pytest.mark.parametrize("model,samples", [("resnet20", 6), ("cnn", 12)])
def test_stage_equals_authors_rule_per_client(model, samples):
    rate = 0.6
    sim = Simulator(Config(**BASE, model=model, soteria_rate=rate, soteria_samples=samples, use_gradient=True))
    stage = sim.stage("soteria")
    assert isinstance(stage, SoteriaPruning)
    ctx = sim.context(1)
    U = torch.randn(ctx.num_clients, sim.num_params, generator=torch.Generator().manual_seed(0))
    out, m = stage.apply(ctx, U)
    net = copy.deepcopy(sim.model)
    with torch.no_grad():
        for k, p in net.named_parameters():
            p.copy_(ctx.global_params[k])
    name, fc = final_linear(net)
    off = sum(sim.spec.numels[: list(sim.spec.names).index(f"{name}.weight")])  # the last layer's weight in a row of U
    O, Fd = fc.weight.shape
    expected, pruned = U.clone(), []
    for i, cid in enumerate(ctx.client_ids):
        n = ctx.counts[i] if samples is None else min(samples, ctx.counts[i])
        x = sim.packed.x[sim.packed.index[cid, :n]]
        mask = torch.from_numpy(authors_mask(net, fc, x, rate))  # (F,)
        block = expected[i, off : off + O * Fd].view(O, Fd)
        expected[i, off : off + O * Fd] = (block * mask).flatten()  # input_gradient[-2] * mask
        pruned.append(1 - float(mask.mean()))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert m["soteria_pruned"] == pytest.approx(float(np.mean(pruned)))
    assert 0.0 < m["soteria_pruned"] < 1.0


def ratio_reference(rep: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda z: rep(z[None])[0], xi)  # (F, C, H, W)
        r = rep(xi[None])[0].detach()
        out.append(J.flatten(1).norm(dim=1) / (r + 0.1))
    return torch.stack(out)


@pytest.mark.parametrize("width", [2, 40])  # representation smaller (reverse mode) / larger (forward mode) than the input
def test_ratios_equal_per_sample_jacobians(width):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(3 * 5 * 3, width), nn.Tanh(), nn.Linear(width, 3))
    shape = (2, 5, 3)  # input of 30 values
    rep, name, _ = representation_model(model, shape)
    assert name == "6"
    x = torch.randn(7, *shape, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in rep.named_parameters()}
    r, ratio = representation_ratios(rep, params, x, chunk=3)  # chunks of 3, 3, 1 samples
    torch.testing.assert_close(ratio, ratio_reference(rep, x), rtol=1e-4, atol=1e-5)  # r + 0.1 near 0 amplifies rounding
    torch.testing.assert_close(r, rep(x).detach())


def test_runs_report_the_pruned_fraction_in_both_modes():
    for use_gradient in (True, False):
        # rate 0.8: ReLU features dead on all 4 samples score 0, and the authors' |s| < t prunes none of them when t = 0
        sim = Simulator(Config(**BASE, model="cnn", soteria_rate=0.8, soteria_samples=4, use_gradient=use_gradient))
        row = sim.step()
        assert 0.0 < row["soteria_pruned"] < 1.0
        d = sim.describe()["soteria"]
        assert d["layer"] == "fc2.weight" and d["rate"] == 0.8 and d["features"] == 512
        assert d["acts_on"] == ("uploaded gradient" if use_gradient else "last-layer weight update (ratio at the global model)")


def test_model_without_a_final_linear_is_a_one_line_error():
    with pytest.raises(ConfigError, match="has no nn.Linear") as e:
        representation_model(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), (1, 4, 4))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="is not the final layer"):
        representation_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.ReLU()), (1, 4, 4))
    with pytest.raises(ConfigError, match="reads the input itself"):
        representation_model(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), (1, 4, 4))


@pytest.mark.parametrize("flags,words", [
    (["--soteria_rate", "60"], "--soteria_rate is the fraction"),
    (["--soteria_rate", "0"], "--soteria_rate is the fraction"),
    (["--soteria_samples", "4"], "add --soteria_rate"),
    (["--soteria_rate", "0.5", "--soteria_samples", "0"], "--soteria_samples must be >= 1"),
    (["--soteria_rate", "0.5", "--dp_mode", "example", "--dp_sigma", "1", "--grad_norm", "1"], "--dp_mode example"),
    (["--soteria_rate", "0.5", "--model", "lr", "--comm_round", "1"], "reads the input itself"),
])
def test_bad_flags_are_one_line_and_status_2(tmp_path, capsys, flags, words):
    assert main(["run", "--dataset", "digits", "--out", str(tmp_path / "o")] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err
