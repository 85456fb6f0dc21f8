"""Engine benchmarks at GPU sizes, for ``bench/gpu_check.py`` on a lent GPU.

``gpu_engine_results()`` times the vectorized engine (auto strategy, plus explicit ``vmap``)
against the per-client reference loop on the same device, on:

* the pfl-research CIFAR-10 benchmark shape (Granlund et al. 2024): ``cnn_cifar``, 50 clients
  per round, 5 local steps of batch 10, synthetic 3x32x32 data; plus the projected wall-clock
  of that benchmark's 1500 rounds (``1500 * seconds per round``, local training only);
* ``lr`` and ``cnn`` (McMahan et al. 2017) at 1,000 clients per round.

``sizes="smoke"`` runs the same code at CPU-sized toy workloads (seconds), which is what the
test suite checks. Budget at ``sizes="full"``: well under 3 minutes on an H100.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import torch

from spfl_vmap.experiments.bench import bench_engine

PFL_ROUNDS = 1500  # pfl-research CIFAR-10 benchmark: 1500 central iterations

# name: (model, clients per round, local steps, batch, input shape, repeats)
FULL: dict[str, tuple[str, int, int, int, tuple[int, int, int], int]] = {
    "pfl_cifar10_cnn": ("cnn_cifar", 50, 5, 10, (3, 32, 32), 3),
    "lr_1000": ("lr", 1000, 5, 10, (1, 28, 28), 3),
    "cnn_1000": ("cnn", 1000, 5, 10, (1, 28, 28), 2),
}
# name: (model, clients in total, clients per round, repeats); Dirichlet(0.5) partitions
DIRICHLET = {"lr_dirichlet_1000_100": ("lr", 1000, 100, 5), "cnn_dirichlet_1000_100": ("cnn", 1000, 100, 3)}
DIRICHLET_SMOKE = {"lr_dirichlet_1000_100": ("lr", 20, 5, 1)}
SMOKE: dict[str, tuple[str, int, int, int, tuple[int, int, int], int]] = {
    "pfl_cifar10_cnn": ("cnn_cifar", 3, 1, 4, (3, 12, 12), 1),
    "lr_1000": ("lr", 10, 2, 4, (1, 28, 28), 1),
    "cnn_1000": ("cnn", 2, 1, 4, (1, 8, 8), 1),
}


def gpu_engine_results(sizes: str = "full", device: str | None = None) -> dict[str, Any]:
    """Vectorized vs loop on each workload; never raises (errors are recorded per workload).

    Args:
        sizes: ``"full"`` (GPU sizes) or ``"smoke"`` (CPU toy sizes for tests).
        device: ``"cuda"`` / ``"cpu"``; default CUDA when available.

    Returns:
        ``{"device", "sizes", "seconds", "workloads": {name: {"config", "rows",
        "projected_pfl_1500_rounds_s"?} | {"error"}}}``; each row has ``s_per_round``,
        ``speedup_vs_loop``, ``client_steps_per_s`` and ``peak_mem_mb``.
    """
    if sizes not in ("full", "smoke"):
        raise ValueError(f"sizes must be 'full' or 'smoke', got {sizes!r}")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    table = FULL if sizes == "full" else SMOKE
    strategies = ("auto", "vmap") if dev == "cuda" else ("auto",)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "sizes": sizes, "workloads": {}}
    for name, (model, n, steps, B, shape, reps) in table.items():
        try:
            res = bench_engine(model, n, None, steps, B, dev, "synthetic", shape, strategies, reps)
            if name.startswith("pfl_"):
                res["projected_pfl_1500_rounds_s"] = {r["engine"]: PFL_ROUNDS * r["s_per_round"] for r in res["rows"]}
            for r in res["rows"]:
                r.pop("s_all", None)
            out["workloads"][name] = res
        except Exception as e:  # one OOM must not hide the other results
            out["workloads"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        if dev == "cuda":
            torch.cuda.empty_cache()
    # Unequal clients (Dirichlet(0.5), synthetic data) with --compile off and trace side by side:
    # the workload users run, and the figure that picks --compile's default on CUDA.
    for name, (model, total, per_round, reps) in (DIRICHLET if sizes == "full" else DIRICHLET_SMOKE).items():
        try:
            res = bench_engine(model, total, per_round, 5, 10, dev, "synthetic", (1, 28, 28), ("vmap",), reps,
                               partition="hetero", alpha=0.5, compiles=("off", "trace"))
            for r in res["rows"]:
                r.pop("s_all", None)
            out["workloads"][name] = res
        except Exception as e:
            out["workloads"][name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        if dev == "cuda":
            torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(gpu_engine_results(sys.argv[1] if len(sys.argv) > 1 else "full"), indent=2))
