"""No padded work, cached step graphs and per-row models/hyperparameters in the vectorized engine.

The references: the per-client loop (``engine="loop"``), the eager engine (``--compile off``) and
separate trainers per hyperparameter setting.
"""

import copy
import warnings

import pytest
import torch

from helpers import rel_err, small_config
from spfl_vmap import Simulator
from spfl_vmap.engine.graphs import StepGraphs, bucket
from spfl_vmap.engine.local import VmapTrainer, fuse_dense_sgd, round_schedule
from spfl_vmap.engine.schedule import make_schedule
from spfl_vmap.rng import generator

RTOL = 1e-5


def _trainer(sim: Simulator, **kw) -> VmapTrainer:
    return VmapTrainer(sim.model, sim.spec, sim.packed, sim.cfg.replace(**kw), sim.device)


def _unequal(**kw):
    """40 unequal clients (Dirichlet), partial last batches (B=7), two epochs: more than 16
    clients, so the graph buckets round the active count up and finished clients ride along."""
    cfg = small_config(model="lr", epochs=2, batch_size=7, strategy="vmap", synthetic_train=2400,
                       client_num_in_total=40, client_num_per_round=40, **kw)
    sim = Simulator(cfg)
    ctx = sim.context(1)
    steps = round_schedule(ctx, 7, 2, False).steps
    assert len(set(steps.tolist())) > 2, "clients must take different numbers of steps"
    active = [int((steps > t).sum()) for t in range(int(steps.max()))]
    assert any(bucket(a, 40) > a for a in active), "some step must run extra (finished) rows"
    return sim, ctx


def test_bucket_bounds():
    for n in (1, 5, 16, 17, 100, 128, 1000):
        for a in range(1, n + 1):
            b = bucket(a, n)
            assert a <= b <= n
            if a > 16:
                assert b <= 1.125 * a  # at most 12.5% extra rows
    assert len({bucket(a, 128) for a in range(1, 129)}) <= 40


def test_only_active_clients_run():
    """Every step runs exactly the clients still training: the rows computed equal the real
    client-steps of the round (with --compile off, no bucket rounding)."""
    sim, ctx = _unequal()
    t = _trainer(sim, compile="off")
    rows = []
    fn = t._gather_graphs.fn
    t._gather_graphs.fn = lambda *a: rows.append(a[2].shape[0]) or fn(*a)
    t.train(ctx)
    assert sum(rows) == int(round_schedule(ctx, 7, 2, False).steps.sum())


@pytest.mark.parametrize("opt,momentum,wd,lr", [("sgd", 0.9, 1e-3, 0.05), ("adam", 0.0, 1e-3, 1e-3)])
def test_traced_graphs_equal_eager_bit_for_bit(opt, momentum, wd, lr):
    """Replayed graphs run the eager step's own ops: identical results, including the bucket
    rows of clients that have finished."""
    sim, ctx = _unequal(client_optimizer=opt, momentum=momentum, wd=wd, lr=lr)
    eager = _trainer(sim, compile="off").train(ctx)
    traced = _trainer(sim, compile="trace")
    traced.train(ctx)  # first use of each shape: eager
    again = traced.train(ctx)  # second use: traced, then replayed
    assert traced.graph_stats[1] > 0, "graphs must have been traced"
    assert torch.equal(again.U, eager.U)
    assert torch.equal(again.train_loss, eager.train_loss)


@pytest.mark.parametrize("compile_mode", ["off", "trace"])
@pytest.mark.parametrize("opt,momentum,wd,lr", [("sgd", 0.9, 1e-3, 0.05), ("adam", 0.0, 1e-3, 1e-3), ("sgd", 0.0, 0.0, 0.1)])
def test_unequal_clients_equal_reference_loop(opt, momentum, wd, lr, compile_mode):
    sim, ctx = _unequal(client_optimizer=opt, momentum=momentum, wd=wd, lr=lr)
    vec = _trainer(sim, compile=compile_mode)
    vec.train(ctx)
    U = vec.train(ctx).U
    loop = Simulator(sim.cfg.replace(engine="loop")).trainer.train(ctx).U
    assert rel_err(U, loop) <= RTOL


def test_fedsgd_unequal_clients_equal_reference_loop():
    sim, ctx = _unequal(use_gradient=True)
    U = sim.trainer.train(ctx).U
    loop = Simulator(sim.cfg.replace(engine="loop")).trainer.train(ctx).U
    assert rel_err(U, loop) <= RTOL


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_row_params_and_hypers_equal_separate_trainers(opt):
    """Two configurations stacked as rows of one ctx (a vectorized sweep) equal their separate
    trainings: each row starts from its own model, with its own lr / momentum / wd."""
    sim, ctx = _unequal(momentum=0.5, wd=1e-3, client_optimizer=opt)
    N = ctx.num_clients
    settings = [dict(lr=0.05, momentum=0.5, wd=1e-3), dict(lr=0.2, momentum=0.0, wd=0.0)]
    if opt == "adam":
        settings = [dict(lr=1e-3, momentum=0.0, wd=1e-3), dict(lr=1e-2, momentum=0.0, wd=0.0)]
    g = torch.Generator().manual_seed(0)
    starts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in ctx.global_params.items()} for _ in settings]
    separate = []
    for st, h in zip(starts, settings):
        c = type(ctx)(**{**ctx.__dict__, "global_params": st})
        separate.append(_trainer(sim, **h).train(c))
    rep = lambda xs: xs + xs  # noqa: E731
    both = type(ctx)(**{
        **ctx.__dict__,
        "client_ids": rep(ctx.client_ids), "counts": rep(ctx.counts),
        "malicious": ctx.malicious.repeat(2), "weights": ctx.weights.repeat(2),
        "row_params": {k: torch.cat([s[k].expand(N, *s[k].shape) for s in starts]) for k in starts[0]},
        "row_hypers": {k: torch.tensor([h[k] for h in settings], dtype=torch.float64).repeat_interleave(N) for k in ("lr", "momentum", "wd")},
    })
    t = _trainer(sim, lr=1.0, momentum=0.9, wd=0.0)  # the config's own values must not leak in
    t.train(both)
    out = t.train(both)
    for i, sep in enumerate(separate):  # float64 row hypers, cast per op as torch.optim casts floats
        assert torch.equal(out.U[i * N : (i + 1) * N], sep.U)
    assert rel_err(out.U[:N], out.U[N:]) > 1e-2  # the two settings differ


def test_graph_storm_falls_back_with_one_warning():
    calls = []

    def f(x):
        calls.append(1)
        return x * 2

    g = StepGraphs(f, "trace", max_graphs=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for n in (2, 2, 3, 3, 4, 4, 3):
            assert torch.equal(g(n, torch.ones(n)), 2 * torch.ones(n))
    assert len(g.graphs) == 1
    assert sum("distinct shapes" in str(x.message) for x in w) == 1


def test_fused_dense_sgd_equals_autograd_then_sgd():
    """A dense layer that updates itself in its backward equals autograd + torch.optim.SGD, and
    the input gradient it passes on uses the weights from before the update."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
    ref = copy.deepcopy(net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    fused = fuse_dense_sgd(net, 0.1)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
        torch.nn.functional.cross_entropy(fused(x), y).backward()
    for (k, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        assert a.grad is None, k
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), k
    assert not torch.equal(fused[0].weight, net[0].weight)  # it trained (the source model did not)


@pytest.mark.parametrize("counts,B,epochs", [([5, 17, 0, 33, 10], 7, 3), ([1], 10, 1), ([20, 20], 10, 2), ([0, 0], 4, 2)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_schedule_equals_per_client_construction(counts, B, epochs, shuffle):
    """Each client's epochs back to back in its row, from its own generator, as written out one
    client and one epoch at a time (the schedule builds them with one scatter)."""
    ids = [3 * i + 1 for i in range(len(counts))]
    per = [-(-c // B) for c in counts]
    T = max(1, max(epochs * s for s in per))
    pos = torch.zeros(len(counts), T * B, dtype=torch.long)
    mask = torch.zeros(len(counts), T * B, dtype=torch.bool)
    for i, (cid, n, s) in enumerate(zip(ids, counts, per)):
        g = generator(5, "batches", 2, cid)
        for e in range(epochs):
            pos[i, e * s * B : e * s * B + n] = torch.randperm(n, generator=g) if shuffle else torch.arange(n)
            mask[i, e * s * B : e * s * B + n] = True
    got = make_schedule(ids, counts, B, epochs, 5, 2, shuffle=shuffle)
    assert torch.equal(got.pos, pos.view(len(counts), T, B)) and torch.equal(got.mask, mask.view(len(counts), T, B))
    assert got.steps.tolist() == [epochs * s for s in per]
