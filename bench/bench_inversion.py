"""pytest-benchmark: the batched inversion attack vs a Python loop over the same problems.

Run with ``pytest bench/bench_inversion.py`` (not part of ``scripts/test``), or directly with
``python bench/bench_inversion.py`` for the side-by-side table of ``spfl bench inversion``
(median of alternating calls, and the speed-up). Each workload attacks ``M`` uploads with ``R``
restarts: ``batched`` is one ``invert`` call over ``[M, R, B, C, H, W]``, ``loop`` runs ``M x R``
calls of one problem and one restart each (the peers' way), with the same seeds.
"""

from __future__ import annotations

import pytest
import torch

from spfl_vmap.experiments.inversion_bench import bench_inversion, format_inversion_rows

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# (attack, model, input shape, problems M, restarts R, iterations)
WORKLOADS = [
    ("ig", "lr", (1, 28, 28), 16, 4, 20),
    ("idlg", "lr", (1, 28, 28), 16, 4, 20),
    ("ig", "cnn", (1, 8, 8), 16, 4, 20),
    ("ig", "cnn", (1, 28, 28), 8 if not CUDA else 64, 2, 5),
]


@pytest.mark.parametrize("attack,model,shape,problems,restarts,iterations", WORKLOADS)
def test_inversion_batched_vs_loop(benchmark, attack, model, shape, problems, restarts, iterations) -> None:
    res = benchmark.pedantic(
        lambda: bench_inversion(attack, model, shape, problems, restarts, 1, iterations, repeats=1, device=DEVICE, log=lambda s: None),
        rounds=1, warmup_rounds=0,
    )
    benchmark.extra_info.update({"speedup": res["speedup"], **{r["variant"] + "_s": r["seconds"] for r in res["rows"]}})


if __name__ == "__main__":
    for attack, model, shape, problems, restarts, iterations in WORKLOADS:
        res = bench_inversion(attack, model, shape, problems, restarts, 1, iterations, repeats=3, device=DEVICE, log=lambda s: None)
        print(f"\n{attack} on {model} {shape}, {problems} uploads x {restarts} restarts, {iterations} iterations, {DEVICE}, "
              f"{torch.get_num_threads()} threads")
        print(format_inversion_rows(res))
