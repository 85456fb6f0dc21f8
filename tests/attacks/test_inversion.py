"""Gradient inversion (spfl_vmap.attacks.inversion, .inversion_metrics, spfl invert).

The batched attack is checked against a Python loop over the same problems and restarts, the
batched L-BFGS against ``torch.optim.LBFGS``, the attacker's model of an upload against plain
autograd and against the engine's own trainer, and the labels against iDLG's guarantee.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spfl_vmap.attacks.inversion import (
    Upload,
    analytic_labels,
    batched_lbfgs,
    invert,
    make_upload_fn,
    problem_chunk,
    total_variation,
)
from spfl_vmap.attacks.inversion_metrics import label_overlap, match, psnr, reconstruction_metrics, save_grid, to_unit
from spfl_vmap.data.loaders import DEBIAN_FASHION_MNIST
from spfl_vmap.engine.params import init_model
from spfl_vmap.errors import ConfigError

from helpers import rel_err


def model_and_params(name: str, shape: tuple[int, int, int], dtype=torch.float32, seed: int = 0):
    model = init_model(name, shape, 10, 64, seed).to(dtype)
    return model, {k: v.detach() for k, v in model.named_parameters()}


def plain_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The FedSGD upload with ordinary autograd: gradient of the mean cross-entropy, flattened."""
    ps = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), ps)
    return torch.cat([t.reshape(-1) for t in g])


def plain_update(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, momentum: float = 0.0) -> torch.Tensor:
    """The FedAvg upload with torch.optim.SGD on a copy of the model: trained - initial."""
    import copy

    m = copy.deepcopy(model)
    w0 = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]) - w0


def uploads(model, xs, ys, upload: Upload = Upload()) -> torch.Tensor:
    """[M, D] uploads of xs [M, B, C, H, W], ys [M, B] with plain autograd."""
    if upload.kind == "gradient":
        return torch.stack([plain_gradient(model, x, y) for x, y in zip(xs, ys)])
    return torch.stack([plain_update(model, x, y, upload.steps, upload.lr, upload.momentum) for x, y in zip(xs, ys)])


# ---- the attacker's model of a client ---------------------------------------------------------
@pytest.mark.parametrize("kind", ["gradient", "update"])
def test_upload_model_equals_plain_autograd(kind):
    torch.manual_seed(0)
    model, params = model_and_params("cnn", (1, 8, 8), torch.float64)
    x, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.tensor([1, 4, 4])
    up = Upload(kind, steps=3, lr=0.5, momentum=0.9)
    want = uploads(model, x[None], y[None], up)[0]
    got = make_upload_fn(model, params, up)(x, F.one_hot(y, 10).double())
    assert rel_err(got, want) < 1e-10


# ---- batched L-BFGS ----------------------------------------------------------------------------
def test_batched_lbfgs_equals_torch_lbfgs_per_problem():
    """P random convex quadratics f_p(z) = 0.5 z'A_p z - b_p'z at once, against torch.optim.LBFGS
    on each (no line search, lr 1, history 3 so the ring buffer wraps, 9 iterations)."""
    g = torch.Generator().manual_seed(1)
    P, n, iters, hist = 4, 7, 9, 3
    Q = torch.randn(P, n, n, generator=g, dtype=torch.float64)
    A = Q @ Q.transpose(1, 2) / n + 0.5 * torch.eye(n, dtype=torch.float64)  # SPD, moderate conditioning
    b = torch.randn(P, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(P, n, generator=g, dtype=torch.float64)

    def fn(z):
        Az = torch.einsum("pij,pj->pi", A, z)
        return 0.5 * (z * Az).sum(1) - (b * z).sum(1), Az - b

    got, failed = batched_lbfgs(fn, z0, iters, history=hist, tol_grad=0.0, tol_change=0.0)
    assert not failed.any()
    for p in range(P):
        z = z0[p].clone().requires_grad_(True)
        opt = torch.optim.LBFGS([z], lr=1.0, max_iter=iters, max_eval=10 * iters, history_size=hist,
                                tolerance_grad=0.0, tolerance_change=0.0)

        def closure():
            opt.zero_grad()
            loss = 0.5 * z @ A[p] @ z - b[p] @ z
            loss.backward()
            return loss

        opt.step(closure)
        assert torch.allclose(got[p], z.detach(), rtol=1e-10, atol=1e-12), p


def test_batched_lbfgs_freezes_a_failing_problem_without_touching_the_others():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))

    def make_fn(ids):
        def fn(z):  # problem 1 turns NaN once its first coordinate drops below 0.39 (it starts at 0.4)
            loss = 0.5 * (z @ A * z).sum(1)
            bad = (z[:, 0].abs() < 0.39) & (torch.tensor(ids) == 1)
            return torch.where(bad, torch.full_like(loss, math.nan), loss), z @ A

        return fn

    z0 = torch.tensor([[1.0, 1.0, 1.0], [0.4, 1.0, 1.0], [1.0, -2.0, 0.5]], dtype=torch.float64)
    got, failed = batched_lbfgs(make_fn([0, 1, 2]), z0, 6)
    alone, _ = batched_lbfgs(make_fn([0, 2]), z0[[0, 2]], 6)
    assert failed.tolist() == [False, True, False]
    assert torch.equal(got[[0, 2]], alone)
    assert torch.isfinite(got).all()


# ---- batched attack == loop over problems -------------------------------------------------------
@pytest.mark.parametrize("attack,kind", [("dlg", "gradient"), ("idlg", "update"), ("ig", "gradient"), ("ig", "update")])
def test_batched_attack_equals_per_problem_loop(attack, kind):
    """M=3 problems x R=2 restarts x B=2 images in one optimization, and each (problem, restart)
    alone with the same seeds: same final objectives, same kept reconstructions (float64)."""
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model, params = model_and_params("cnn", shape, torch.float64)
    M, R, B = 3, 2, 2
    xs = torch.randn(M, B, *shape, dtype=torch.float64)
    ys = torch.randint(0, 10, (M, B))
    up = Upload(kind, steps=2, lr=0.1)
    T = uploads(model, xs, ys, up)
    box = (torch.tensor([-1.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64))
    kw = dict(num_images=B, input_shape=shape, upload=up, iterations=6, seed=3, box=box)
    assert problem_chunk(M, R, T.shape[1], T.device, T.dtype) == 2  # the stack runs in 2 vmap chunks on the CPU
    batched = invert(attack, model, params, T, restarts=R, **kw)
    assert batched.x.shape == (M, B, *shape) and batched.loss.shape == (M, R)
    for m in range(M):
        alone = [invert(attack, model, params, T[m : m + 1], restarts=1, problem_ids=[m], restart_offset=r, **kw) for r in range(R)]
        loss = torch.stack([a.loss[0, 0] for a in alone])
        torch.testing.assert_close(batched.loss[m], loss, rtol=1e-9, atol=1e-12)
        kept = alone[int(batched.best[m])]
        torch.testing.assert_close(batched.x[m], kept.x[0], rtol=1e-9, atol=1e-12)
        assert torch.equal(batched.labels[m], kept.labels[0])
    assert int(batched.best[0]) == int(torch.argmin(batched.loss[0]))


def test_restarts_start_from_different_points():
    model, params = model_and_params("lr", (1, 4, 4))
    T = uploads(model, torch.randn(2, 1, 1, 4, 4), torch.tensor([[1], [2]]))
    r = invert("ig", model, params, T, num_images=1, input_shape=(1, 4, 4), restarts=2, iterations=1)
    assert r.loss[0, 0] != r.loss[0, 1]


# ---- labels ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lr", "cnn"])
@pytest.mark.parametrize("kind", ["gradient", "update"])
def test_idlg_recovers_single_image_labels(name, kind):
    """iDLG (Zhao et al. 2020) recovers the label of a single image 100% of the time (their
    Table 1): the bias gradient p - onehot(y) is negative only at y, and a local update is minus
    a sum of those. 12 random images, 3 untrained models each."""
    shape = (1, 28, 28)
    g = torch.Generator().manual_seed(0)
    up = Upload(kind, steps=3, lr=0.1)
    for seed in range(3):
        model, params = model_and_params(name, shape, seed=seed)
        xs = torch.randn(12, 1, *shape, generator=g)
        ys = torch.randint(0, 10, (12, 1), generator=g)
        T = uploads(model, xs, ys, up)
        labels, method = analytic_labels(model, params, T, 1, 10, shape, kind)
        assert method == "idlg-bias"
        assert torch.equal(labels, ys)
    r = invert("idlg", model, params, T, num_images=1, input_shape=shape, upload=up, iterations=1)
    assert torch.equal(r.labels, ys)


def test_idlg_weight_row_rule_without_bias():
    """iDLG's own rule (argmin of the weight-gradient row sums) for a last layer without bias and
    non-negative features."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 10, bias=False))
    params = {k: v.detach() for k, v in model.named_parameters()}
    xs, ys = torch.randn(6, 1, 1, 4, 4), torch.randint(0, 10, (6, 1))
    T = uploads(model, xs, ys)
    labels, method = analytic_labels(model, params, T, 1, 10, (1, 4, 4))
    assert method == "idlg-weight-rows" and torch.equal(labels, ys)


def test_bias_corrected_batch_labels_by_hand():
    """breaching's bias-corrected rule on hand-made bias gradients (uniform p = 0.1):
    labels [3, 3, 5] give b_3 = 0.1 - 2/3, b_5 = 0.1 - 1/3, others 0.1; stage 1 takes {3, 5},
    the impact is (b_3 + b_5) / 3 = -0.2667, so b_3 -> -0.3, b_5 -> 0.033 and stage 2 adds 3."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 10))
    params = {k: v.detach() for k, v in model.named_parameters()}
    T = torch.zeros(2, 50)
    bias = torch.full((2, 10), 0.1)
    bias[0, 3], bias[0, 5] = 0.1 - 2 / 3, 0.1 - 1 / 3  # problem 0: labels 3, 3, 5
    bias[1, 0], bias[1, 7], bias[1, 9] = 0.1 - 1 / 3, 0.1 - 1 / 3, 0.1 - 1 / 3  # problem 1: 0, 7, 9
    T[:, 40:] = bias
    labels, method = analytic_labels(model, params, T, 3, 10, (1, 2, 2))
    assert method == "bias-corrected-bias"
    assert labels.tolist() == [[3, 3, 5], [0, 7, 9]]
    # an update upload is minus the gradient
    labels_u, _ = analytic_labels(model, params, -T * 0.1, 3, 10, (1, 2, 2), "update")
    assert torch.equal(labels_u, labels)


def test_bias_corrected_labels_of_real_gradients_with_unique_labels():
    """With distinct labels every bias entry of a label is negative, so the batch rule is exact."""
    model, params = model_and_params("cnn", (1, 8, 8))
    g = torch.Generator().manual_seed(2)
    ys = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(5)])
    T = uploads(model, torch.randn(5, 4, 1, 8, 8, generator=g), ys)
    labels, _ = analytic_labels(model, params, T, 4, 10, (1, 8, 8))
    assert torch.equal(labels, ys.sort(dim=1).values)


# ---- reconstruction quality ----------------------------------------------------------------------
@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist (scripts/test installs it)")
def test_ig_reconstructs_a_fashion_mnist_image_on_an_untrained_cnn():
    """Inverting Gradients on the gradient of FashionMNIST test image 0 (an untrained cnn, one
    image, one restart, 200 iterations, TV 1e-4; about 10 s on one CPU thread).

    Threshold: the dataset's mean image is the best guess of a pixel without this client's
    upload (it minimizes the expected squared error), so its PSNR (11.1 dB here) is the level of
    no leakage. A reconstruction must beat it by 10 dB, a 10x smaller MSE, at which the garment
    is plainly recognizable; measured: 62.9 dB, SSIM 0.998.
    """
    from spfl_vmap.data import load_dataset

    ds = load_dataset("fashion_mnist")
    box = (ds.x_train.amin(dim=(0, 2, 3)), ds.x_train.amax(dim=(0, 2, 3)))
    x, y = ds.x_test[:1][None], ds.y_test[:1][None]  # (1, 1, 1, 28, 28), (1, 1)
    model, params = model_and_params("cnn", (1, 28, 28))
    T = uploads(model, x, y)
    r = invert("ig", model, params, T, num_images=1, input_shape=(1, 28, 28), iterations=200, tv=1e-4, box=box)
    rec, orig = to_unit(r.x[0], box), to_unit(x[0], box)  # (1, 1, 28, 28)
    baseline = float(psnr(to_unit(ds.x_train.mean(0, keepdim=True), box), orig))
    got = float(psnr(rec, orig))
    assert 10.5 < baseline < 12.0, baseline
    assert got > baseline + 10.0, (got, baseline)
    assert int(r.labels) == int(y)


def test_dlg_and_idlg_reduce_the_gradient_distance():
    model, params = model_and_params("cnn", (1, 8, 8))
    xs, ys = torch.randn(2, 1, 1, 8, 8), torch.tensor([[2], [7]])
    T = uploads(model, xs, ys)
    for attack in ("dlg", "idlg"):
        first = invert(attack, model, params, T, num_images=1, input_shape=(1, 8, 8), iterations=1)
        later = invert(attack, model, params, T, num_images=1, input_shape=(1, 8, 8), iterations=30)
        assert (later.loss < first.loss).all(), attack


# ---- failures and bad input ------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["dlg", "idlg", "ig"])
def test_nan_upload_fails_its_problem_only(attack):
    model, params = model_and_params("lr", (1, 6, 6))
    T = uploads(model, torch.randn(3, 1, 1, 6, 6), torch.tensor([[1], [2], [3]]))
    kw = dict(num_images=1, input_shape=(1, 6, 6), iterations=4, restarts=2)
    bad = T.clone()
    bad[1, 0] = math.nan
    r = invert(attack, model, params, bad, labels=torch.tensor([[1], [2], [3]]), **kw)
    assert r.failed.tolist() == [[False, False], [True, True], [False, False]]
    assert r.ok.tolist() == [True, False, True]
    assert torch.isnan(r.loss[1]).all()
    good = invert(attack, model, params, T[[0, 2]], problem_ids=[0, 2], labels=torch.tensor([[1], [3]]), **kw)
    torch.testing.assert_close(r.x[[0, 2]], good.x)


def test_a_diverging_attack_marks_restarts_failed_and_never_raises():
    """A step of 3e38 (no box) puts pixels near float32's maximum: the logits overflow to inf,
    the softmax gives NaN, and those restarts are failed; the call returns."""
    model, params = model_and_params("lr", (1, 6, 6))
    T = uploads(model, torch.randn(2, 1, 1, 6, 6), torch.tensor([[1], [2]]))
    r = invert("ig", model, params, T, num_images=1, input_shape=(1, 6, 6), iterations=3, step_size=3e38)
    assert r.failed.all() and not r.ok.any() and torch.isnan(r.loss).all()
    assert r.x.shape == (2, 1, 1, 6, 6)


def test_bad_inputs_are_one_line_config_errors():
    model, params = model_and_params("cnn", (1, 28, 28))
    T = torch.zeros(2, sum(v.numel() for v in params.values()))
    cases = [
        dict(attack="nope"),
        dict(input_shape=(1, 8, 8)),  # the cnn's fc1 is sized for 28x28
        dict(input_shape=(3, 28, 28)),
        dict(target=T[:, :10]),
        dict(num_images=0),
        dict(restarts=0),
        dict(iterations=0),
        dict(upload=Upload("nope")),
        dict(labels=torch.zeros(2, 3, dtype=torch.long)),
    ]
    for case in cases:
        kw = dict(attack="ig", target=T, num_images=1, input_shape=(1, 28, 28), iterations=1)
        kw.update(case)
        attack, target = kw.pop("attack"), kw.pop("target")
        with pytest.raises(ConfigError) as e:
            invert(attack, model, params, target, **kw)
        assert "\n" not in str(e.value), case


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 10, 4), nn.Flatten()),  # no nn.Linear at all
    nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.ReLU()),  # an activation after the last linear
    nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.Linear(10, 10), nn.Tanh()),
])
def test_analytic_labels_need_a_final_linear_layer(model):
    params = {k: v.detach() for k, v in model.named_parameters()}
    T = torch.zeros(1, sum(v.numel() for v in params.values()))
    for attack in ("idlg", "ig"):
        with pytest.raises(ConfigError, match="nn.Linear") as e:
            invert(attack, model, params, T, num_images=1, input_shape=(1, 4, 4), iterations=1)
        assert "\n" not in str(e.value)
    invert("dlg", model, params, T, num_images=1, input_shape=(1, 4, 4), iterations=1)  # DLG learns the labels


# ---- metrics ---------------------------------------------------------------------------------------
def test_psnr_ssim_match_and_labels():
    g = torch.Generator().manual_seed(0)
    orig = torch.rand(2, 3, 1, 8, 8, generator=g)
    noisy = (orig + 0.05 * torch.randn(orig.shape, generator=g)).clamp(0, 1)
    mse = ((noisy - orig) ** 2).flatten(2).mean(-1)
    torch.testing.assert_close(psnr(noisy.flatten(0, 1), orig.flatten(0, 1)), (10 * torch.log10(1 / mse)).flatten())
    assert float(psnr(orig[0], orig[0]).max()) == 100.0  # exact reconstructions are capped
    perm = torch.tensor([[2, 0, 1], [1, 2, 0]])
    shuffled = noisy[torch.arange(2)[:, None], perm]  # reconstruction i of problem m is original perm[m, i]
    order = match(shuffled, orig)
    assert torch.equal(shuffled[torch.arange(2)[:, None], order], noisy)
    true = torch.tensor([[1, 2, 3], [4, 4, 5]])
    rec_labels = true[torch.arange(2)[:, None], perm]
    met = reconstruction_metrics(shuffled, orig, rec_labels, true)
    assert met["label_correct"].all() and met["mean"]["label_acc"] == 1.0
    assert 0.5 < met["mean"]["ssim"] <= 1.0
    assert label_overlap(torch.tensor([[1, 1, 2]]), torch.tensor([[1, 2, 2]])).tolist() == [2 / 3]


def test_metrics_of_failed_reconstructions_are_nan_not_errors(tmp_path):
    orig = torch.rand(1, 2, 1, 8, 8)
    rec = orig.clone()
    rec[0, 1] = math.nan
    met = reconstruction_metrics(rec, orig, torch.tensor([[1, 2]]), torch.tensor([[1, 2]]))
    assert math.isnan(float(met["psnr"][0, 1])) and met["mean"]["psnr"] == 100.0
    path = save_grid(orig[0], rec[0], tmp_path / "g.png", "t", ["a", "b"])
    assert path.stat().st_size > 0


def test_total_variation_by_hand():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 3.0]]]])  # |dx|: 1, 2; |dy|: 1, 2
    assert float(total_variation(x)) == pytest.approx(1.5 + 1.5)


# ---- spfl invert -----------------------------------------------------------------------------------
def _sim(**kw):
    from spfl_vmap import Config, Simulator

    base = dict(dataset="digits", model="lr", client_num_in_total=8, client_num_per_round=8, progress=False, device="cpu")
    base.update(kw)
    return Simulator(Config(**base))


@pytest.mark.parametrize("model,use_gradient,epochs", [("lr", True, 1), ("cnn", False, 2)])
def test_client_uploads_are_the_engines_and_match_the_attackers_model(model, use_gradient, epochs):
    """What spfl invert attacks is what the engine's trainer uploads, and (B <= batch_size) the
    attacker's model of it reproduces it."""
    from spfl_vmap.experiments.invert import client_uploads, upload_model

    sim = _sim(model=model, use_gradient=use_gradient, epochs=epochs, lr=0.1)
    ids, B = [1, 5], 3
    U, x, y = client_uploads(sim, ids, B, 1)
    assert U.shape == (2, sim.spec.dim) and x.shape == (2, B, 1, 8, 8)
    for m, cid in enumerate(ids):
        idx = sim.packed.client_indices(cid)[:B]
        assert torch.equal(x[m], sim.packed.x[idx]) and torch.equal(y[m], sim.packed.y[idx])
    up = upload_model(sim.cfg, B)
    fn = make_upload_fn(sim.model, sim.global_params, up)
    for m in range(2):
        want = fn(x[m], F.one_hot(y[m], 10).float())
        assert rel_err(U[m], want) < 1e-4


@pytest.mark.parametrize("model", ["lr", "cnn"])
def test_trained_images_are_what_an_ats_client_uploads_the_gradient_of(model):
    """Under ATS a one-image client's upload is the plain gradient at trained_images(...), not at
    its original image: so spfl invert's "vs trained images" metric compares with what the
    client really trained on."""
    from spfl_vmap.experiments.invert import client_uploads, trained_images

    sim = _sim(model=model, use_gradient=True, data_recovery_protection=True, ats_policy="3-1-7+11-37-12")
    ids = [0, 2, 3, 6]
    U, x, y = client_uploads(sim, ids, 1, 1)
    xt = trained_images(sim, ids, x, y, 1)  # (M, 1, C, H, W)
    assert xt.shape == x.shape and not torch.allclose(xt, x)
    for m in range(len(ids)):
        assert rel_err(U[m], plain_gradient(sim.model, xt[m], y[m])) < 1e-4
        assert rel_err(U[m], plain_gradient(sim.model, x[m], y[m])) > 1e-2


def test_spfl_invert_reports_metrics_against_the_trained_images_under_ats(tmp_path):
    from spfl_vmap.cli import main

    common = ["invert", "--dataset", "digits", "--model", "lr", "--attack", "idlg", "--num_images", "2", "--batch", "1",
              "--iterations", "2", "--use_gradient", "--client_num_in_total", "8", "--client_num_per_round", "8"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "inversion.json").read_text())["mean_vs_trained_images"] is None
    assert main([*common, "--data_recovery_protection", "--ats_policy", "3-1-7", "--out", str(tmp_path / "b")]) == 0
    t = json.loads((tmp_path / "b" / "inversion.json").read_text())["mean_vs_trained_images"]
    assert set(t) == {"psnr", "ssim"} and math.isfinite(t["psnr"])


def test_spfl_invert_end_to_end(tmp_path, capsys):
    from spfl_vmap.cli import main

    out = tmp_path / "inv"
    rc = main(["invert", "--dataset", "digits", "--model", "lr", "--attack", "idlg", "--num_images", "4", "--batch", "1",
               "--iterations", "3", "--use_gradient", "--client_num_in_total", "8", "--client_num_per_round", "8",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((out / "inversion.json").read_text())
    assert (out / "inversion.png").stat().st_size > 0
    assert len(rep["images"]) == 4 and len(rep["clients"]) == 4
    assert rep["mean"]["label_acc"] == 1.0  # iDLG, one image per gradient
    assert set(rep["images"][0]) >= {"psnr", "ssim", "label_correct", "client"}
    assert "mean PSNR" in capsys.readouterr().out


def test_spfl_invert_at_a_checkpoint(tmp_path):
    from spfl_vmap.cli import main

    run_dir = tmp_path / "run"
    assert main(["run", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "4", "--client_num_per_round", "4",
                 "--comm_round", "2", "--checkpoint_every", "1", "--out", str(run_dir), "--no-progress"]) == 0
    out = tmp_path / "inv"
    assert main(["invert", "--resume", str(run_dir), "--attack", "ig", "--num_images", "4", "--batch", "2",
                 "--iterations", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "inversion.json").read_text())
    assert rep["round"] == 2 and rep["batch"] == 2 and rep["upload"]["kind"] == "update"
    assert rep["resumed_from"] == str(run_dir)


@pytest.mark.parametrize("argv,needle", [
    (["--num_images", "3", "--batch", "2"], "multiple of --batch"),
    (["--client_optimizer", "adam"], "adam is not modelled"),
    (["--attack", "xyz"], "invalid choice"),
    (["--num_images", "400", "--batch", "20"], "honest clients"),
])
def test_spfl_invert_bad_flags_are_one_line(tmp_path, capsys, argv, needle):
    from spfl_vmap.cli import main

    rc = main(["invert", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "4", "--client_num_per_round", "4",
               "--iterations", "1", "--out", str(tmp_path / "x"), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err, err


def test_bench_inversion_runs_both_variants():
    from spfl_vmap.experiments.inversion_bench import bench_inversion

    res = bench_inversion("ig", "lr", (1, 6, 6), problems=2, restarts=2, iterations=2, repeats=1, log=lambda s: None)
    assert [r["variant"] for r in res["rows"]] == ["batched", "loop"] and res["speedup"] > 0
