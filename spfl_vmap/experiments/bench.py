"""Engine benchmarks (``spfl bench``): the vectorized engine against the per-client reference loop.

    spfl bench engine --model cnn --clients 20 --steps 5      one workload, every engine, a table
    spfl bench scale --model lr --clients 10,100,1000,10000    time per round vs cohort size, PNG+JSON

Both engines run in this one process on identical work: the same packed data, the same batch
schedule, the same optimizer. Calls alternate (A B A B ...) after one warm-up call each, so a
noisy neighbour slows both alike; the tables report medians. Only local training is timed
(``trainer.train`` for one round's clients, schedule construction included), not aggregation,
which the engines share.

Peak memory is the resident-set high-water mark gained during one call (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before) on the CPU, and
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..builder import Simulator
from ..config import Config
from ..data import Dataset, load_dataset
from ..data.loaders import load_synthetic
from ..engine.local import VmapTrainer, round_schedule
from ..engine.loop import LoopTrainer
from ..errors import ConfigError
from ..stages import RoundContext

REF = "loop (reference)"


# ---- memory -------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the baseline in bytes to subtract afterwards."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return _status_kb("VmRSS") * 1024


def peak_since(device: torch.device, base: int) -> int:
    """Bytes of peak memory above ``base`` since :func:`reset_peak`."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return max(0, int(torch.cuda.max_memory_allocated(device)) - base)
    return max(0, _status_kb("VmHWM") * 1024 - base)


def max_rss_bytes() -> int:
    """The process's resident-set high-water mark (since the last reset)."""
    return _status_kb("VmHWM") * 1024


# ---- workload -----------------------------------------------------------------------------
@dataclass
class Workload:
    """One round's work, shared by every engine: a simulator (data packed once), the sampled
    client ids and the round's context (every trainer builds the same schedule from it)."""

    sim: Simulator
    ids: list[int]
    ctx: RoundContext
    cfg: Config

    @property
    def client_steps(self) -> int:
        """Real (unmasked) local steps of all clients in the round."""
        return int(round_schedule(self.ctx, self.cfg.batch_size, self.cfg.epochs, self.cfg.use_gradient).active.sum())


def build_workload(
    model: str,
    clients: int,
    per_round: int | None = None,
    steps: int = 5,
    batch_size: int = 10,
    device: str = "cpu",
    dataset: str = "synthetic",
    input_shape: tuple[int, int, int] | None = None,
    optimizer: str = "sgd",
    lr: float = 0.01,
    momentum: float = 0.0,
    data_dir: str = "./data",
    seed: int = 0,
    partition: str = "homo",
    alpha: float = 0.5,
) -> Workload:
    """One round's work for ``clients`` clients, ``per_round`` of them sampled.

    ``partition="homo"``: data sized so that each client takes ``steps`` full batches of
    ``batch_size`` (synthetic data gets ``clients * steps * batch_size`` samples; a real dataset
    is cut to that many), so every client runs the same number of steps.
    ``partition="hetero"``: the real workload: a Dirichlet(``alpha``) split of the whole
    dataset (of ``clients * steps * batch_size`` samples for synthetic data), so clients are
    unequal in size and in steps; ``steps`` is then only the mean.
    """
    if clients < 1 or steps < 1 or batch_size < 1:
        raise ConfigError("--clients, --steps and --batch_size must be >= 1")
    if partition not in ("homo", "hetero"):
        raise ConfigError(f"--partition must be homo or hetero, got {partition!r}")
    per_round = per_round or clients
    if per_round > clients:
        raise ConfigError(f"--per_round ({per_round}) cannot exceed --clients ({clients})")
    n = clients * steps * batch_size
    if dataset != "synthetic" and partition == "hetero":
        if input_shape is not None:
            raise ConfigError("--input_shape applies to --dataset synthetic only")
        data = load_dataset(dataset, data_dir)
        n = len(data.y_train)
    elif dataset == "synthetic":
        data = load_synthetic(synthetic_train=n, synthetic_test=10, input_shape=input_shape or (1, 28, 28), seed=seed)
    else:
        if input_shape is not None:
            raise ConfigError("--input_shape applies to --dataset synthetic only")
        full = load_dataset(dataset, data_dir)
        if len(full.y_train) < n:
            raise ConfigError(
                f"{dataset} has {len(full.y_train)} training samples; {clients} clients x {steps} steps x "
                f"batch {batch_size} need {n}: lower --clients, --steps or --batch_size"
            )
        data = Dataset(full.name, full.x_train[:n], full.y_train[:n], full.x_test[:100], full.y_test[:100], full.num_classes, full.source)
    cfg = Config(
        dataset="synthetic" if dataset == "synthetic" else dataset, model=model, partition_method=partition, partition_alpha=alpha,
        client_num_in_total=clients, client_num_per_round=per_round, batch_size=batch_size, epochs=1,
        client_optimizer=optimizer, lr=lr, momentum=momentum, device=device, seed=seed, progress=False,
        data_dir=data_dir, synthetic_train=n, synthetic_test=10,
    )
    sim = Simulator(cfg, data=data)
    ids = sim.sample_clients(1)
    return Workload(sim, ids, sim.context(1, ids), cfg)


def make_trainers(w: Workload, strategies: Sequence[str], loop: bool = True, compiles: Sequence[str] = ("trace",)) -> dict[str, Any]:
    """``{label: trainer}``: one :class:`VmapTrainer` per strategy and ``--compile`` mode
    (``auto`` labelled with the strategy it picks; the mode named only when several are timed)
    and, with ``loop``, the reference :class:`LoopTrainer`."""
    sim = w.sim
    out: dict[str, Any] = {}
    for s in strategies:
        for c in compiles:
            t = VmapTrainer(sim.model, sim.spec, sim.packed, w.cfg.replace(strategy=s, compile=c), sim.device)
            label = f"vectorized auto={t.strategy}" if s == "auto" else f"vectorized {s}"
            if len(compiles) > 1 and t.strategy == "vmap":
                label += f" {c}"
            elif len(compiles) > 1 and c != compiles[0]:
                continue  # the loop strategy traces nothing: one row is enough
            out[label] = t
    if loop:
        out[REF] = LoopTrainer(sim.model, sim.spec, sim.packed, w.cfg, sim.device)
    return out


# ---- timing -------------------------------------------------------------------------------
@dataclass
class Timing:
    label: str
    strategy: str
    chunk: int
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    trace_s: float = 0.0  # seconds spent tracing step graphs (once per shape, in the warm-up)
    graphs: int = 0  # cached step graphs

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_trainers(w: Workload, trainers: dict[str, Any], repeats: int = 3, warmup: int = 2) -> dict[str, Timing]:
    """Alternate the trainers (A B A B ...) ``repeats`` times after ``warmup`` calls each.

    Two warm-up calls: ``--compile trace`` traces a shape on its second use, so the timed calls
    replay graphs; the tracing seconds are reported apart (``trace_s``).

    Returns per-trainer timings: the seconds of every timed call and the peak memory above the
    pre-call baseline over all calls.
    """
    dev = w.sim.device
    res = {k: Timing(k, t.strategy, t.chunk) for k, t in trainers.items()}

    def call(t) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        t.train(w.ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for _ in range(warmup):
        for t in trainers.values():
            call(t)
    for _ in range(repeats):
        for k, t in trainers.items():
            base = reset_peak(dev)
            res[k].seconds.append(call(t))
            res[k].peak_bytes = max(res[k].peak_bytes, peak_since(dev, base))
    for k, t in trainers.items():
        if hasattr(t, "graph_stats"):
            res[k].trace_s, res[k].graphs = t.graph_stats
    return res


def engine_rows(w: Workload, timings: dict[str, Timing]) -> list[dict[str, Any]]:
    """One JSON-friendly row per trainer, with the speed-up over the reference loop."""
    ref = timings.get(REF)
    steps = w.client_steps
    rows = []
    for k, t in timings.items():
        rows.append({
            "engine": k,
            "strategy": t.strategy,
            "chunk": t.chunk,
            "s_per_round": t.median,
            "s_all": t.seconds,
            "speedup_vs_loop": (ref.median / t.median) if ref else None,
            "client_steps_per_s": steps / t.median,
            "clients_per_s": len(w.ids) / t.median,
            "peak_mem_mb": t.peak_bytes / 2**20,
            "trace_s": t.trace_s,
            "graphs": t.graphs,
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = (f"{'engine':<30} {'strategy':<15} {'chunk':>6} {'s/round':>9} {'loop/this':>9} {'client-steps/s':>14} "
            f"{'peak MB':>8} {'trace s':>8}")
    out = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r['speedup_vs_loop']:.2f}x" if r["speedup_vs_loop"] is not None else "-"
        tr = f"{r['trace_s']:.2f}" if r.get("graphs") else "-"
        out.append(
            f"{r['engine']:<30} {r['strategy']:<15} {r['chunk']:>6} {r['s_per_round']:>9.4f} {sp:>9} "
            f"{r['client_steps_per_s']:>14.1f} {r['peak_mem_mb']:>8.1f} {tr:>8}"
        )
    return "\n".join(out)


def bench_engine(
    model: str,
    clients: int,
    per_round: int | None = None,
    steps: int = 5,
    batch_size: int = 10,
    device: str = "cpu",
    dataset: str = "synthetic",
    input_shape: tuple[int, int, int] | None = None,
    strategies: Sequence[str] = ("auto",),
    repeats: int = 3,
    loop: bool = True,
    data_dir: str = "./data",
    partition: str = "homo",
    alpha: float = 0.5,
    compiles: Sequence[str] = ("trace",),
) -> dict[str, Any]:
    """Time the vectorized engine (each of ``strategies`` x ``compiles``) against the reference loop.

    Returns:
        ``{"config": {...}, "rows": [...]}``; each row has ``s_per_round`` (median),
        ``speedup_vs_loop``, ``client_steps_per_s`` and ``peak_mem_mb``.
    """
    w = build_workload(model, clients, per_round, steps, batch_size, device, dataset, input_shape, data_dir=data_dir,
                       partition=partition, alpha=alpha)
    timings = time_trainers(w, make_trainers(w, strategies, loop, compiles), repeats)
    sched = round_schedule(w.ctx, batch_size, w.cfg.epochs, w.cfg.use_gradient)
    counts = sorted(w.ctx.counts)
    return {
        "config": {
            "model": model, "clients": clients, "per_round": len(w.ids), "steps": steps, "batch_size": batch_size,
            "dataset": dataset, "input_shape": list(w.sim.dataset.input_shape), "device": str(w.sim.device),
            "num_params": w.sim.num_params, "repeats": repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "client_steps_per_round": w.client_steps,
            "partition": partition, "alpha": alpha if partition == "hetero" else None,
            "client_samples_min_median_max": [counts[0], counts[len(counts) // 2], counts[-1]],
            # the old engine ran every client of a chunk for the longest client's steps
            "padded_fraction_if_unsorted": 1 - w.client_steps / (len(w.ids) * sched.num_steps),
        },
        "rows": engine_rows(w, timings),
    }


def bench_scale(
    model: str,
    cohorts: Sequence[int],
    steps: int = 1,
    batch_size: int = 10,
    device: str = "cpu",
    dataset: str = "synthetic",
    loop_max: int = 1000,
    repeats: int = 3,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict[str, Any]]:
    """Seconds per round and clients/s of the vectorized engine (auto strategy) for each cohort
    size, and of the reference loop for cohorts up to ``loop_max``."""
    out = []
    for n in cohorts:
        w = build_workload(model, n, None, steps, batch_size, device, dataset)
        trainers = make_trainers(w, ["auto"], loop=n <= loop_max)
        reps = repeats if n <= 1000 else max(1, min(repeats, 2))
        timings = time_trainers(w, trainers, reps)
        for row in engine_rows(w, timings):
            row["clients"] = n
            out.append(row)
            log(f"{n:>7} clients  {row['engine']:<24} {row['s_per_round']:.4f} s/round  {row['clients_per_s']:.0f} clients/s  peak {row['peak_mem_mb']:.0f} MB")
        del w, trainers
    return out


def plot_scale(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """clients/s and s/round against cohort size, one line per engine (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind in sorted({r["engine"].split(" ")[0] for r in rows}):
        sel = [r for r in rows if r["engine"].split(" ")[0] == kind]
        xs = [r["clients"] for r in sel]
        axes[0].plot(xs, [r["s_per_round"] for r in sel], "o-", label=sel[0]["engine"])
        axes[1].plot(xs, [r["clients_per_s"] for r in sel], "o-", label=sel[0]["engine"])
    for ax, lab in zip(axes, ("seconds per round (local training)", "clients per second")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients per round")
        ax.set_ylabel(lab)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
