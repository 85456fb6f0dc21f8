"""The ``loop`` strategy's fast paths (single client, threaded workers) equal ``vmap``."""

from __future__ import annotations

import pytest
import torch

from helpers import rel_err, small_config
from spfl_vmap import Simulator
from spfl_vmap.engine.local import VmapTrainer
from spfl_vmap.modules.byzantine import LabelPoison


@pytest.mark.parametrize("workers,opt,momentum,wd", [("1", "sgd", 0.9, 1e-3), ("2", "sgd", 0.9, 1e-3), ("3", "adam", 0.0, 1e-3)])
def test_loop_workers_equal_vmap_with_label_poison(monkeypatch, workers, opt, momentum, wd):
    """``1`` takes the sequential single-client path, ``2``/``3`` the threaded one."""
    monkeypatch.setenv("SPFL_LOOP_WORKERS", workers)
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # keeps the test quick on a shared machine; workers ignore it
    try:
        _check(opt, momentum, wd)
    finally:
        torch.set_num_threads(prev)


def _check(opt: str, momentum: float, wd: float) -> None:
    cfg = small_config(model="lr", client_optimizer=opt, momentum=momentum, wd=wd, lr=0.01, epochs=2)
    sim = Simulator(cfg)
    ctx = sim.context(1)
    ctx.malicious = torch.tensor([i % 2 == 1 for i in range(ctx.num_clients)])
    poison = [LabelPoison(lambda y, num_classes: 9 - y)]
    out = {}
    for s in ("vmap", "loop"):
        t = VmapTrainer(sim.model, sim.spec, sim.packed, cfg.replace(strategy=s), sim.device)
        out[s] = t.train(ctx, poison)
    assert out["loop"].strategy == "loop"
    assert rel_err(out["loop"].U, out["vmap"].U) < 1e-5
    assert rel_err(out["loop"].train_loss, out["vmap"].train_loss) < 1e-5
    clean = VmapTrainer(sim.model, sim.spec, sim.packed, cfg.replace(strategy="loop"), sim.device).train(ctx)
    assert rel_err(clean.U[1], out["loop"].U[1]) > 1e-3  # the poisoned client's labels did matter
