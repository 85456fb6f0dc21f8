"""pytest-benchmark: the vectorized engine vs the per-client reference loop.

Run with ``pytest bench/bench_engine.py`` (not part of ``scripts/test``, whose testpath is
``tests/``). Sizes are CI-friendly on the CPU; on CUDA they grow. ``benchmark.extra_info``
records the strategy, its chunk, and client-steps per second; compare an engine's row with the
``loop`` row of the same workload for the speed-up (``spfl bench engine`` prints it directly).
"""

from __future__ import annotations

import pytest
import torch

from spfl_vmap.experiments.bench import REF, build_workload, make_trainers

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (model, clients per round, local steps, batch)
WORKLOADS = [("lr", 100, 5, 10), ("lr", 1000, 1, 10), ("cnn", 20 if not CUDA else 200, 5, 10)]


@pytest.mark.parametrize("model,clients,steps,batch", WORKLOADS)
@pytest.mark.parametrize("engine", ["vectorized", "loop"])
def test_engine(benchmark, engine: str, model: str, clients: int, steps: int, batch: int) -> None:
    w = build_workload(model, clients, None, steps, batch, DEVICE)
    trainers = make_trainers(w, ["auto"], loop=engine == "loop")
    trainer = trainers[REF] if engine == "loop" else next(iter(trainers.values()))

    def call():
        r = trainer.train(w.ctx)
        if CUDA:
            torch.cuda.synchronize()
        return r

    benchmark.pedantic(call, rounds=3, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {"strategy": trainer.strategy, "chunk": trainer.chunk, "client_steps_per_s": w.client_steps / t}
    )
