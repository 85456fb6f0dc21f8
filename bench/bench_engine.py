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
# (model, clients in total, clients per round, local steps (mean for hetero), batch, partition)
# "hetero" is the workload users run: a Dirichlet(0.5) split, clients unequal in size and steps.
WORKLOADS = [
    ("lr", 100, 100, 5, 10, "homo"), ("lr", 1000, 1000, 1, 10, "homo"), ("cnn", 20 if not CUDA else 200, None, 5, 10, "homo"),
    ("lr", 1000, 100, 5, 10, "hetero"), ("lr", 100, 100, 5, 10, "hetero"), ("cnn", 100, 20 if not CUDA else 100, 5, 10, "hetero"),
]


@pytest.mark.parametrize("model,clients,per_round,steps,batch,partition", WORKLOADS)
@pytest.mark.parametrize("engine", ["vectorized", "loop"])
def test_engine(benchmark, engine: str, model: str, clients: int, per_round: int | None, steps: int, batch: int, partition: str) -> None:
    w = build_workload(model, clients, per_round, steps, batch, DEVICE, partition=partition)
    trainers = make_trainers(w, ["auto"], loop=engine == "loop")
    trainer = trainers[REF] if engine == "loop" else next(iter(trainers.values()))

    def call():
        r = trainer.train(w.ctx)
        if CUDA:
            torch.cuda.synchronize()
        return r

    benchmark.pedantic(call, rounds=3, warmup_rounds=2)  # --compile trace: a shape is traced on its second use
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {"strategy": trainer.strategy, "chunk": trainer.chunk, "client_steps_per_s": w.client_steps / t}
    )
