"""``spfl bench scale --nproc 1,2,4``: whole rounds under torchrun with P processes.

For each process count P and cohort size N, :func:`bench_processes` launches

    torchrun --standalone --nproc_per_node P -m spfl_vmap.experiments.bench_dist SPEC_JSON OUT_DIR

and every rank runs :func:`worker`: a FedAvg run (``homo`` partition of synthetic data, all N
clients every round, each holding ``steps * batch_size`` samples) whose rounds are timed with
``Simulator.step`` (training, gathers or all_reduce, aggregation and the server step; the first
round is a warm-up and the last one, which evaluates, is not timed). Each rank writes its median
seconds per round and its peak resident memory (``VmHWM``: over the whole process, and over the
timed rounds alone) to ``OUT_DIR/rank<r>.json``. P = 1 runs the same way in one plain process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import distributed
from ..builder import Simulator
from ..config import Config
from ..errors import SpflError
from .bench import max_rss_bytes, reset_peak


def workload_config(model: str, clients: int, steps: int, batch_size: int, rounds: int, device: str, **overrides: Any) -> Config:
    """FedAvg on synthetic data: ``clients`` clients, all in every round, ``steps`` full local
    batches each; evaluation only at the last of ``rounds`` rounds. ``overrides``: other config
    fields (an attack and an aggregator)."""
    n = clients * steps * batch_size
    return Config(dataset="synthetic", synthetic_train=n, synthetic_test=100, model=model, partition_method="homo",
                  client_num_in_total=clients, client_num_per_round=clients, comm_round=rounds, batch_size=batch_size,
                  epochs=1, lr=0.01, device=device, progress=False, frequency_of_the_test=rounds + 1, **overrides)


def worker(spec: dict[str, Any], out_dir: str) -> None:
    """One rank of the benchmark: time ``spec["rounds"]`` rounds, write ``rank<r>.json``."""
    cfg = workload_config(spec["model"], spec["clients"], spec["steps"], spec["batch_size"], spec["rounds"] + 2, spec["device"],
                          **spec.get("overrides", {}))
    sim = Simulator(cfg)
    sim.step()  # warm-up
    startup_peak = max_rss_bytes()  # loading, packing and the first round
    base = reset_peak(torch.device("cpu"))
    seconds = []
    for _ in range(spec["rounds"]):
        t0 = time.perf_counter()
        sim.step()
        seconds.append(time.perf_counter() - t0)
    rounds_peak = max_rss_bytes()
    result = {
        "rank": distributed.rank(), "processes": distributed.world_size(), "seconds": seconds,
        "s_per_round": statistics.median(seconds), "peak_rss_mb": max(rounds_peak, startup_peak) / 2**20,
        "rounds_peak_rss_mb": rounds_peak / 2**20, "rss_before_rounds_mb": base / 2**20,
        "aggregation": sim.describe().get("distributed", {}).get("aggregation", "one process"),
    }
    Path(out_dir, f"rank{distributed.rank()}.json").write_text(json.dumps(result))


def bench_processes(
    model: str, cohorts: Sequence[int], nprocs: Sequence[int], steps: int = 1, batch_size: int = 10, device: str = "cpu",
    rounds: int = 3, threads: int = 1, timeout_s: float = 1800.0, log: Callable[[str], None] = lambda s: None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Seconds per round and peak memory per rank for each process count and cohort size.

    Each point is a fresh torchrun job (``OMP_NUM_THREADS=threads`` per process), run one at a
    time. Returns one row per (processes, clients) with ``s_per_round`` (rank 0's median),
    ``clients_per_s``, ``peak_rss_mb`` (per rank, whole process: loading included) and
    ``rounds_peak_rss_mb`` (per rank, the high-water mark during the timed rounds).
    ``overrides``: config fields added to every job's workload (an attack and an aggregator).
    """
    rows = []
    for P in nprocs:
        for n in cohorts:
            spec = {"model": model, "clients": n, "steps": steps, "batch_size": batch_size, "rounds": rounds, "device": device,
                    "overrides": overrides or {}}
            with tempfile.TemporaryDirectory(prefix="spfl-bench-") as tmp:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(P),
                       "-m", "spfl_vmap.experiments.bench_dist", json.dumps(spec), tmp]
                env = dict(os.environ, OMP_NUM_THREADS=str(threads))
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    raise SpflError(f"bench scale: {P} processes x {n} clients took over {timeout_s:.0f} s") from None
                if p.returncode != 0:
                    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    raise SpflError(f"bench scale: the {P}-process job with {n} clients failed: {tail}")
                ranks = sorted((json.loads(f.read_text()) for f in Path(tmp).glob("rank*.json")), key=lambda r: r["rank"])
            row = {
                "processes": P, "clients": n, "s_per_round": ranks[0]["s_per_round"],
                "clients_per_s": n / ranks[0]["s_per_round"], "aggregation": ranks[0]["aggregation"],
                "peak_rss_mb": [r["peak_rss_mb"] for r in ranks], "rounds_peak_rss_mb": [r["rounds_peak_rss_mb"] for r in ranks],
                "rss_before_rounds_mb": [r["rss_before_rounds_mb"] for r in ranks],
            }
            rows.append(row)
            log(f"{P} process(es) x {n:>6} clients  {row['s_per_round']:.4f} s/round  {row['clients_per_s']:.0f} clients/s  "
                f"peak per rank {', '.join(f'{m:.0f}' for m in row['peak_rss_mb'])} MB "
                f"(rounds {', '.join(f'{m:.0f}' for m in row['rounds_peak_rss_mb'])} MB)")
    return rows


if __name__ == "__main__":  # one rank of a bench job (see the module docstring)
    with distributed.exit_on_error("spfl bench scale"):
        worker(json.loads(sys.argv[1]), sys.argv[2])
