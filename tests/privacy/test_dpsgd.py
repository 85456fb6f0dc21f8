"""Example-level DP-SGD (Abadi et al. 2016): the vectorized trainer against slow references.

- per-sample gradients of the nested vmap equal a one-sample-at-a-time autograd loop;
- clipping bounds every per-sample contribution;
- with C = inf, sigma = 0 and the engine's own batches, DP-SGD *is* plain local training;
- the noise has the right scale (moments of the update when every gradient is exactly zero);
- Poisson masks include each sample with probability q and depend only on (seed, round, client);
- the whole trainer equals the per-client, per-sample reference with clipping and noise on.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spfl_vmap.data import load_dataset, pack_clients
from spfl_vmap.data.packing import PackedClients
from spfl_vmap.engine.local import VmapTrainer
from spfl_vmap.engine.params import ParamSpec, init_model
from spfl_vmap.modules.byzantine import LabelPoison
from spfl_vmap.modules.dpsgd import DPSGDTrainer
from spfl_vmap.privacy import ClientAccountants
from spfl_vmap.stages import RoundContext
from spfl_vmap.privacy.dpsgd import (
    clip_and_sum,
    client_noise,
    client_poisson_masks,
    dpsgd_num_steps,
    dpsgd_reference_client,
    dpsgd_sample_rate,
    poisson_batches,
    sample_rates,
    steps_per_client,
)

CPU = torch.device("cpu")
SIZES = (13, 29, 5, 40)  # unequal; 5 < B exercises q = 1 and divisor n_k


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def make_cfg(**kw) -> SimpleNamespace:
    """Every field VmapTrainer and DPSGDTrainer read."""
    base = dict(
        client_optimizer="sgd", lr=0.05, momentum=0.0, wd=0.0, strategy="auto", client_chunk=0, batch_size=8,
        client_num_per_round=len(SIZES), use_gradient=False, epochs=2, seed=3, grad_norm=1.0, dp_sigma=0.0,
        compile="trace",
    )
    base.update(kw)
    return SimpleNamespace(**base)


def make_setup(model: str = "lr", dataset: str = "synthetic", sizes=SIZES, width: int = 4):
    """(module, spec, packed, global params) for clients of the given sizes."""
    ds = load_dataset(dataset, synthetic_train=sum(sizes), synthetic_test=10)
    perm = np.random.default_rng(0).permutation(len(ds.y_train))[: sum(sizes)]
    parts = np.split(perm, np.cumsum(sizes)[:-1])
    packed = pack_clients(ds.x_train, ds.y_train, parts, CPU)
    net = init_model(model, ds.input_shape, ds.num_classes, width, seed=0)
    spec = ParamSpec.of(net)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    return net, spec, packed, params


def ctx_for(packed, spec, params, ids, round_idx: int, seed: int = 3, malicious=None) -> RoundContext:
    """The round context a trainer gets from the simulator, for clients ``ids`` of ``packed``."""
    counts = [int(packed.counts[i]) for i in ids]
    mal = torch.zeros(len(ids), dtype=torch.bool) if malicious is None else malicious
    return RoundContext(round=round_idx, seed=seed, client_ids=list(ids), counts=counts, malicious=mal,
                        weights=torch.tensor(counts, dtype=torch.float32), global_params=params, spec=spec, device=CPU,
                        num_classes=10, population=len(packed.counts), expected_cohort=len(ids))


def stacked(params, n: int, scale: float = 0.05, seed: int = 0):
    """``n`` distinct perturbations of ``params``, so the client vmap is really exercised."""
    g = torch.Generator().manual_seed(seed)
    return {k: v[None] + scale * torch.randn(n, *v.shape, generator=g) for k, v in params.items()}


# ---- per-sample gradients -------------------------------------------------------------------


@pytest.mark.parametrize("model,dataset", [("lr", "synthetic"), ("cnn", "digits")])
def test_per_sample_grads_equal_one_sample_loop(model, dataset):
    net, spec, packed, params = make_setup(model, dataset)
    trainer = DPSGDTrainer(net, spec, packed, make_cfg(strategy="vmap"), CPU)
    n, L = (3, 5) if model == "lr" else (2, 3)
    P = stacked(params, n)
    idx = packed.index[:n, :L]  # (n, L)
    x, y = packed.x[idx], packed.y[idx]
    grads, losses = trainer.per_sample_grads(P, x, y)  # {k: (n, L, *s)}, (n, L)
    ref = copy.deepcopy(net)
    for i in range(n):
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.copy_(P[k][i])
        for j in range(L):
            ref.zero_grad()
            loss = F.cross_entropy(ref(x[i, j : j + 1]), y[i, j : j + 1])
            loss.backward()
            assert losses[i, j].item() == pytest.approx(loss.item(), abs=1e-5)
            for k, p in ref.named_parameters():
                torch.testing.assert_close(grads[k][i, j], p.grad, atol=1e-5, rtol=1e-5)


# ---- clipping -------------------------------------------------------------------------------


def test_every_per_sample_contribution_is_clipped():
    net, spec, packed, params = make_setup("lr")
    trainer = DPSGDTrainer(net, spec, packed, make_cfg(), CPU)
    n, L = 2, 6
    idx = packed.index[:n, :L]
    grads, _ = trainer.per_sample_grads(stacked(params, n), packed.x[idx], packed.y[idx])
    norms = torch.cat([g.flatten(2) for g in grads.values()], 2).norm(dim=2)  # (n, L)
    C = float(norms.median())  # some samples are clipped, some are not
    # each sample as its own one-sample "client": the sum is then that sample's contribution
    single = {k: g.reshape(n * L, 1, *g.shape[2:]) for k, g in grads.items()}
    out, _ = clip_and_sum(single, torch.ones(n * L, 1), C)
    contrib = spec.flatten(out, stacked=True)  # (n * L, D)
    raw = torch.cat([g.reshape(n * L, -1) for g in grads.values()], 1)  # (n * L, D)
    assert (contrib.norm(dim=1) <= C + 1e-5).all()
    small = norms.flatten() < C
    assert small.any() and (~small).any()
    torch.testing.assert_close(contrib[small], raw[small], atol=1e-5, rtol=1e-4)  # unchanged below C
    torch.testing.assert_close(contrib[~small].norm(dim=1), torch.full(((~small).sum(),), C), rtol=1e-5, atol=1e-5)
    # padding (weight 0) contributes nothing
    w = torch.ones(n, L)
    w[:, -2:] = 0
    summed, _ = clip_and_sum(grads, w, C)
    expect = contrib.reshape(n, L, -1)[:, :-2].sum(1)
    torch.testing.assert_close(spec.flatten(summed, stacked=True), expect, atol=1e-5, rtol=1e-5)


# ---- C = inf, sigma = 0 is plain training ---------------------------------------------------


@pytest.mark.parametrize(
    "model,dataset,opt,momentum,wd,lr",
    [
        ("lr", "synthetic", "sgd", 0.9, 1e-3, 0.05),
        ("lr", "synthetic", "adam", 0.0, 1e-3, 1e-3),
        ("cnn", "digits", "sgd", 0.9, 0.0, 0.05),
    ],
)
def test_no_clip_no_noise_equals_plain_training(model, dataset, opt, momentum, wd, lr):
    net, spec, packed, params = make_setup(model, dataset)
    cfg = make_cfg(client_optimizer=opt, momentum=momentum, wd=wd, lr=lr, grad_norm=math.inf, dp_sigma=0.0, batch_size=7)
    ids = list(range(len(SIZES)))
    ctx = ctx_for(packed, spec, params, ids, 1, seed=cfg.seed)  # both trainers build the same schedule from it
    plain = VmapTrainer(net, spec, packed, cfg, CPU).train(ctx)
    dp = DPSGDTrainer(net, spec, packed, cfg, CPU, poisson=False).train(ctx)
    assert plain.U.norm() > 0
    assert rel_err(dp.U, plain.U) <= 1e-6
    torch.testing.assert_close(dp.train_loss, plain.train_loss, rtol=1e-5, atol=1e-6)
    # and a finite clip does change it (the equality above is not vacuous)
    clipped = DPSGDTrainer(net, spec, packed, make_cfg(**{**vars(cfg), "grad_norm": 0.1}), CPU, poisson=False)
    assert rel_err(clipped.train(ctx).U, plain.U) > 1e-2


# ---- noise scale ----------------------------------------------------------------------------


def test_noise_has_the_right_scale():
    """Zero inputs and a bias-free linear model make every gradient exactly 0, so the update
    after ``T_k`` plain SGD steps is ``-lr sigma C / (q_k n_k) * sum_t z_t`` with ``z_t ~ N(0, I_D)``.
    Normalised, its ``N * D`` coordinates are iid N(0, 1): ``sum_i |Z_i|^2`` is chi-square with
    ``N D`` degrees of freedom (mean ``N D``, variance ``2 N D``); we allow 5 standard deviations.
    """
    sizes = [30] * 15 + [6] * 5  # q = 1/3 (T = 2 ceil(30/10) = 8 steps) and q = 1 (T = 2, divisor 6)
    d_in, classes = 16, 10
    offs = np.cumsum([0] + sizes)
    index = torch.zeros(len(sizes), max(sizes), dtype=torch.long)
    for k, n in enumerate(sizes):
        index[k, :n] = torch.arange(offs[k], offs[k] + n)
    packed = PackedClients(
        x=torch.zeros(sum(sizes), 1, 4, 4), y=torch.arange(sum(sizes)) % classes, index=index, counts=torch.tensor(sizes)
    )
    net = nn.Sequential(nn.Flatten(), nn.Linear(d_in, classes, bias=False))
    spec = ParamSpec.of(net)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    lr, sigma, C, B = 0.1, 1.3, 0.7, 10
    cfg = make_cfg(lr=lr, dp_sigma=sigma, grad_norm=C, batch_size=B, client_num_per_round=len(sizes))
    ids = list(range(len(sizes)))
    U = DPSGDTrainer(net, spec, packed, cfg, CPU).train(ctx_for(packed, spec, params, ids, 1, seed=cfg.seed)).U  # (N, D)
    T = torch.tensor([dpsgd_num_steps(n, B, cfg.epochs) for n in sizes], dtype=torch.float32)
    div = torch.tensor([dpsgd_sample_rate(n, B) * n for n in sizes])
    Z = -U * div[:, None] / (lr * sigma * C * T.sqrt()[:, None])  # (N, D) ~ iid N(0, 1)
    M = Z.numel()
    assert abs(float(Z.pow(2).sum()) - M) <= 5 * math.sqrt(2 * M)
    assert abs(float(Z.mean())) <= 5 / math.sqrt(M)
    # a wrong scale is caught: dividing by the realised batch or forgetting C would be off by >20%
    assert 5 * math.sqrt(2 * M) < 0.2 * M


def test_noise_is_per_client_and_reproducible():
    a = client_noise(0, 1, 7, 3, 50)
    assert torch.equal(a, client_noise(0, 1, 7, 3, 50))
    assert not torch.equal(a, client_noise(0, 1, 8, 3, 50))
    assert not torch.equal(a, client_noise(0, 2, 7, 3, 50))


# ---- Poisson masks --------------------------------------------------------------------------


def test_poisson_inclusion_frequency_matches_rate():
    n_k, B, epochs = 50, 10, 200
    inc = client_poisson_masks(0, 1, 4, n_k, B, epochs)  # (T, n_k)
    q = dpsgd_sample_rate(n_k, B)
    assert inc.shape == (dpsgd_num_steps(n_k, B, epochs), n_k) == (1000, 50)
    M = inc.numel()
    assert abs(float(inc.float().mean()) - q) <= 5 * math.sqrt(q * (1 - q) / M)
    per_sample = inc.float().mean(0)  # every sample, not just on average
    assert (per_sample - q).abs().max() <= 5 * math.sqrt(q * (1 - q) / inc.shape[0])
    assert client_poisson_masks(0, 1, 4, 5, B, 3).all()  # n_k <= B: q = 1, everyone every step


def _decode(b, row: int, n_k: int, T_k: int) -> torch.Tensor:
    """(T_k, n_k) inclusion masks of one row of compacted batches."""
    out = torch.zeros(T_k, n_k, dtype=torch.bool)
    for t in range(T_k):
        out[t, b.pos[row, t][b.mask[row, t]]] = True
    return out


def test_poisson_batches_reproducible_and_independent_of_cohort():
    counts = {1: 13, 5: 29, 7: 5, 9: 40}
    B, E = 8, 2
    a = poisson_batches([5, 9], [counts[5], counts[9]], B, E, seed=0, round_idx=3)
    b = poisson_batches([1, 5, 7], [counts[1], counts[5], counts[7]], B, E, seed=0, round_idx=3)
    T5 = dpsgd_num_steps(29, B, E)
    m5 = client_poisson_masks(0, 3, 5, 29, B, E)
    assert torch.equal(_decode(a, 0, 29, T5), m5) and torch.equal(_decode(b, 1, 29, T5), m5)
    assert a.active[0].sum() == T5 and not a.active[0, T5:].any()
    assert a.divisor[0] == pytest.approx(8.0) and b.divisor[2] == pytest.approx(5.0)
    assert not torch.equal(m5, client_poisson_masks(1, 3, 5, 29, B, E))  # seed matters
    assert not torch.equal(m5, client_poisson_masks(0, 4, 5, 29, B, E))  # round matters


def test_trainer_rows_independent_of_cohort_and_chunk():
    net, spec, packed, params = make_setup("lr")
    cfg = make_cfg(grad_norm=0.5, dp_sigma=0.8, momentum=0.9)
    full = DPSGDTrainer(net, spec, packed, cfg, CPU).train(ctx_for(packed, spec, params, [0, 1, 2, 3], 2, seed=cfg.seed)).U
    sub = DPSGDTrainer(net, spec, packed, cfg, CPU).train(ctx_for(packed, spec, params, [1, 3], 2, seed=cfg.seed)).U
    chunked = DPSGDTrainer(net, spec, packed, make_cfg(**{**vars(cfg), "client_chunk": 1}), CPU)
    one = chunked.train(ctx_for(packed, spec, params, [0, 1, 2, 3], 2, seed=cfg.seed)).U
    assert rel_err(sub[0], full[1]) < 1e-6 and rel_err(sub[1], full[3]) < 1e-6
    assert rel_err(one, full) < 1e-6
    other_round = DPSGDTrainer(net, spec, packed, cfg, CPU).train(ctx_for(packed, spec, params, [1, 3], 3, seed=cfg.seed)).U
    assert rel_err(other_round, sub) > 1e-2


def test_accounting_helpers_match_the_steps_taken():
    net, spec, packed, params = make_setup("lr")
    cfg = make_cfg(batch_size=8, epochs=2)
    trainer = DPSGDTrainer(net, spec, packed, cfg, CPU)
    assert trainer.steps_per_client(SIZES) == steps_per_client(SIZES, 8, 2) == [4, 8, 2, 10]
    assert trainer.sample_rates(SIZES) == sample_rates(SIZES, 8) == pytest.approx([8 / 13, 8 / 29, 1.0, 8 / 40])
    b = poisson_batches(list(range(4)), list(SIZES), 8, 2, cfg.seed, 1)
    assert b.active.sum(1).tolist() == trainer.steps_per_client(SIZES)
    acc = ClientAccountants("rdp")
    acc.step([0, 1, 2, 3], trainer.sample_rates(SIZES), 1.0, trainer.steps_per_client(SIZES))
    eps = acc.epsilons(1e-5)
    assert eps[2] > eps[1] > eps[3] > 0  # q = 1 spends most; larger clients less


# ---- the whole trainer equals the per-sample reference --------------------------------------


@pytest.mark.parametrize(
    "model,dataset,opt,momentum,wd,lr",
    [
        ("lr", "synthetic", "sgd", 0.9, 1e-3, 0.05),
        ("lr", "synthetic", "adam", 0.0, 1e-3, 1e-3),
        ("cnn", "digits", "sgd", 0.5, 0.0, 0.05),
    ],
)
def test_vectorized_equals_reference(model, dataset, opt, momentum, wd, lr):
    net, spec, packed, params = make_setup(model, dataset)
    # clip at about the median per-sample norm, so clipping is active for some samples only
    probe = DPSGDTrainer(net, spec, packed, make_cfg(), CPU)
    idx = packed.index[:, :5]
    g, _ = probe.per_sample_grads({k: v.expand(len(SIZES), *v.shape) for k, v in params.items()}, packed.x[idx], packed.y[idx])
    C = float(torch.cat([v.flatten(2) for v in g.values()], 2).norm(dim=2).median())
    cfg = make_cfg(client_optimizer=opt, momentum=momentum, wd=wd, lr=lr, grad_norm=C, dp_sigma=0.7)
    # the per-sample reference is slow for the CNN: fewer clients and one epoch there
    ids, r = ([0, 1, 2, 3], 5) if model == "lr" else ([1, 2], 5)
    if model != "lr":
        cfg.epochs = 1
    for strategy in ["vmap", "loop"]:  # loop: chunks of one client
        trainer = DPSGDTrainer(net, spec, packed, make_cfg(**{**vars(cfg), "strategy": strategy}), CPU)
        res = trainer.train(ctx_for(packed, spec, params, ids, r, seed=cfg.seed))
        for i, cid in enumerate(ids):
            n_k = SIZES[cid]
            inc = client_poisson_masks(cfg.seed, r, cid, n_k, cfg.batch_size, cfg.epochs)
            noise = client_noise(cfg.seed, r, cid, inc.shape[0], spec.dim)
            rows = packed.client_indices(cid)
            ref_u, ref_loss = dpsgd_reference_client(
                net, params, packed.x[rows], packed.y[rows], inc, noise, C, cfg.dp_sigma,
                dpsgd_sample_rate(n_k, cfg.batch_size) * n_k, opt, lr, momentum, wd,
            )
            assert rel_err(res.U[i], ref_u) <= 1e-5, (strategy, cid)
            assert res.train_loss[i].item() == pytest.approx(ref_loss, rel=1e-4)


def test_config_errors():
    net, spec, packed, _ = make_setup("lr")
    with pytest.raises(ValueError):
        DPSGDTrainer(net, spec, packed, make_cfg(grad_norm=math.inf, dp_sigma=1.0), CPU)
    with pytest.raises(ValueError):
        DPSGDTrainer(net, spec, packed, make_cfg(use_gradient=True), CPU)


def test_label_poisoning_changes_only_poisoned_rows():
    net, spec, packed, params = make_setup("lr")
    cfg = make_cfg(grad_norm=0.5, dp_sigma=0.8)
    clean = DPSGDTrainer(net, spec, packed, cfg, CPU).train(ctx_for(packed, spec, params, [0, 1, 2, 3], 1, seed=cfg.seed)).U
    trainer = DPSGDTrainer(net, spec, packed, cfg, CPU)
    poisoned = torch.tensor([False, True, False, False])
    ctx = ctx_for(packed, spec, params, [0, 1, 2, 3], 1, seed=cfg.seed, malicious=poisoned)
    dirty = trainer.train(ctx, [LabelPoison(lambda y, num_classes: (y + 1) % 10)]).U
    assert rel_err(dirty[~poisoned], clean[~poisoned]) < 1e-6
    assert rel_err(dirty[1], clean[1]) > 1e-2


def test_simulator_runs_example_level_dp():
    from spfl_vmap import Config, Simulator

    cfg = Config(
        dataset="synthetic", synthetic_train=200, synthetic_test=50, model="lr", client_num_in_total=4,
        client_num_per_round=2, comm_round=2, epochs=1, batch_size=8, frequency_of_the_test=1, progress=False,
        device="cpu", dp_mode="example", dp_sigma=1.0, grad_norm=1.0,
    )
    sim = Simulator(cfg)
    assert isinstance(sim.trainer, DPSGDTrainer)
    while not sim.done:
        metrics = sim.step()
    assert math.isfinite(metrics["test_loss"])
