"""The vectorized engine equals the per-client reference loop (torch.optim + nn.Module).

Clients have unequal sizes (Dirichlet split) and partial last batches (B=7), several local
epochs and two rounds, so masking, optimizer state and the server step all take part.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import final_params, rel_err, small_config
from spfl_vmap import Simulator
from spfl_vmap.rng import generator

RTOL = 1e-5  # relative error of the final float32 parameters (issue: <= 1e-5)

CASES = [
    # model, strategy, optimizer, momentum, wd, lr
    ("lr", "vmap", "sgd", 0.9, 1e-3, 0.05),
    ("lr", "vmap", "adam", 0.0, 1e-3, 1e-3),
    ("lr", "vmap", "sgd", 0.0, 0.0, 0.1),
    ("cnn", "vmap", "sgd", 0.9, 1e-3, 0.05),
    ("cnn", "vmap", "adam", 0.0, 0.0, 1e-4),
    ("cnn", "loop", "sgd", 0.9, 1e-3, 0.05),
    ("cnn", "loop", "sgd", 0.0, 0.0, 0.05),  # plain SGD: the dense layers update in their backward
    ("cnn", "loop", "adam", 0.0, 0.0, 1e-4),
]


@pytest.mark.parametrize("model,strategy,opt,momentum,wd,lr", CASES)
def test_vmap_engine_equals_loop_engine(model, strategy, opt, momentum, wd, lr):
    kw = dict(model=model, client_optimizer=opt, momentum=momentum, wd=wd, lr=lr, strategy=strategy, epochs=2, batch_size=7)
    if model == "cnn":
        kw["synthetic_train"] = 120  # ~30 samples a client keeps the 1.66M-param CNN quick
    cfg = small_config(**kw)
    sim = Simulator(cfg)
    assert len(set(sim.counts)) > 1, "clients must have unequal sizes"
    assert any(c % 7 for c in sim.counts), "some client must have a partial last batch"
    w0, vec = final_params(cfg, rounds=2)
    _, ref = final_params(cfg.replace(engine="loop"), rounds=2)
    assert not torch.equal(vec, w0)
    assert rel_err(vec, ref) <= RTOL
    assert rel_err(vec - w0, ref - w0) <= 1e2 * RTOL  # the update itself, not only the weights


def test_equivalence_test_can_fail():
    """A different lr must break the equality the test above checks."""
    cfg = small_config(model="lr", lr=0.05)
    _, a = final_params(cfg)
    _, b = final_params(cfg.replace(engine="loop", lr=0.0501))
    assert rel_err(a, b) > RTOL


@pytest.mark.parametrize("chunk", [1, 3])
def test_client_chunking_does_not_change_result(chunk):
    cfg = small_config(model="lr", client_optimizer="sgd", momentum=0.9)
    _, full = final_params(cfg)
    _, chunked = final_params(cfg.replace(client_chunk=chunk))
    assert torch.equal(full, chunked) or rel_err(chunked, full) < 1e-6


def test_gradient_mode_equals_full_local_gradient():
    """--use_gradient uploads each client's gradient over all its samples (not the last batch)."""
    cfg = small_config(model="lr", use_gradient=True, batch_size=7)
    sim = Simulator(cfg)
    ids = sim.sample_clients(1)
    U = sim.trainer.train(sim.context(1, ids)).U  # FedSGD: one unshuffled pass over each client
    model = sim.model
    for row, cid in zip(U, ids):
        idx = sim.packed.client_indices(cid)
        model.zero_grad()
        F.cross_entropy(model(sim.packed.x[idx]), sim.packed.y[idx]).backward()
        g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        assert rel_err(row, g) < 1e-5
    loop = Simulator(cfg.replace(engine="loop"))
    U_loop = loop.trainer.train(loop.context(1, ids)).U
    assert rel_err(U, U_loop) < 1e-5


def test_one_client_server_lr1_equals_centralized_sgd():
    """One client, server lr 1: FedAvg is plain SGD on that client's data in its batch order."""
    cfg = small_config(model="lr", client_num_in_total=1, client_num_per_round=1, partition_method="homo", epochs=3, batch_size=16)
    sim = Simulator(cfg)
    w_fed = sim.w.clone()
    sim.step()
    model = sim.model  # same architecture; load the initial weights
    with torch.no_grad():
        for (name, p), v in zip(model.named_parameters(), sim.spec.unflatten(w_fed).values()):
            p.copy_(v)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    x, y = sim.dataset.x_train, sim.dataset.y_train
    g = generator(cfg.seed, "batches", 1, 0)  # the documented per-(seed, round, client) stream
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(y), generator=g)
        for lo in range(0, len(y), cfg.batch_size):
            idx = perm[lo : lo + cfg.batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    central = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert rel_err(sim.w, central) <= RTOL


def test_masked_steps_leave_small_clients_unchanged():
    """A client that ran out of batches takes no further step (no momentum, no weight decay)."""
    cfg = small_config(model="lr", momentum=0.9, wd=0.1, epochs=1)
    sim = Simulator(cfg)
    ids = sim.sample_clients(1)
    counts = [sim.counts[i] for i in ids]
    small = counts.index(min(counts))
    # train the smallest client alone: padding steps of the cohort must not matter
    U_all = sim.trainer.train(sim.context(1, ids)).U
    U_one = sim.trainer.train(sim.context(1, [ids[small]])).U
    assert rel_err(U_all[small], U_one[0]) < 1e-6
