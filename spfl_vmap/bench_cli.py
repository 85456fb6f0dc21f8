"""``spfl bench``: the vectorized engine against the per-client reference loop.

    spfl bench engine --model cnn --clients 20 --steps 5      one workload, every engine, a table
    spfl bench scale --model lr --clients 10,100,1000,10000    time per round vs cohort size, PNG+JSON

Both engines run in this one process on identical work: the same packed data, the same batch
schedule, the same optimizer. Calls alternate (A B A B ...) after one warm-up call each, so a
noisy neighbour slows both alike; the tables report medians. Only local training is timed
(``trainer.train`` for one round's clients), not schedule construction or aggregation, which
the engines share.

Peak memory is the resident-set high-water mark gained during one call (``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, minus ``VmRSS`` before) on the CPU, and
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .cli import OneLineParser, register_command
from .config import Config
from .data.loaders import load_synthetic
from .errors import ConfigError, SpflError

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
    client ids and their batch schedule."""

    sim: Any  # spfl_vmap.engine.simulator.Simulator
    ids: list[int]
    sched: Any  # spfl_vmap.engine.schedule.Schedule
    cfg: Config

    @property
    def client_steps(self) -> int:
        """Real (unmasked) local steps of all clients in the round."""
        return int(self.sched.active.sum())


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
) -> Workload:
    """Data sized so that each of ``clients`` clients takes ``steps`` full batches of ``batch_size``.

    Synthetic data gets ``clients * steps * batch_size`` samples; a real dataset is cut to that
    many (it must be large enough). The partition is ``homo``, so every client holds exactly
    ``steps * batch_size`` samples and one epoch is ``steps`` local steps.
    """
    from .data import Dataset, load_dataset
    from .engine.schedule import make_schedule
    from .engine.simulator import Simulator

    if clients < 1 or steps < 1 or batch_size < 1:
        raise ConfigError("--clients, --steps and --batch_size must be >= 1")
    per_round = per_round or clients
    if per_round > clients:
        raise ConfigError(f"--per_round ({per_round}) cannot exceed --clients ({clients})")
    n = clients * steps * batch_size
    if dataset == "synthetic":
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
        dataset="synthetic" if dataset == "synthetic" else dataset, model=model, partition_method="homo",
        client_num_in_total=clients, client_num_per_round=per_round, batch_size=batch_size, epochs=1,
        client_optimizer=optimizer, lr=lr, momentum=momentum, device=device, seed=seed, progress=False,
        data_dir=data_dir, synthetic_train=n, synthetic_test=10,
    )
    sim = Simulator(cfg, data=data)
    ids = sim.sample_clients(1)
    sched = make_schedule(ids, [sim.counts[i] for i in ids], batch_size, 1, cfg.seed, 1)
    return Workload(sim, ids, sched, cfg)


def make_trainers(w: Workload, strategies: Sequence[str], loop: bool = True) -> dict[str, Any]:
    """``{label: trainer}``: one :class:`VmapTrainer` per strategy (``auto`` labelled with the
    strategy it picks) and, with ``loop``, the reference :class:`LoopTrainer`."""
    from .engine.local import VmapTrainer
    from .engine.loop import LoopTrainer

    sim = w.sim
    out: dict[str, Any] = {}
    for s in strategies:
        t = VmapTrainer(sim.model, sim.spec, sim.packed, w.cfg.replace(strategy=s), sim.device)
        label = f"vectorized auto={t.strategy}" if s == "auto" else f"vectorized {s}"
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

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def time_trainers(w: Workload, trainers: dict[str, Any], repeats: int = 3, warmup: int = 1) -> dict[str, Timing]:
    """Alternate the trainers (A B A B ...) ``repeats`` times after ``warmup`` calls each.

    Returns per-trainer timings: the seconds of every timed call and the peak memory above the
    pre-call baseline over all calls.
    """
    dev = w.sim.device
    gp = w.sim.global_params
    res = {k: Timing(k, t.strategy, t.chunk) for k, t in trainers.items()}

    def call(t) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        t.train(gp, w.ids, w.sched)
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
        })
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = f"{'engine':<24} {'strategy':<15} {'chunk':>6} {'s/round':>9} {'loop/this':>9} {'client-steps/s':>14} {'peak MB':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        sp = f"{r['speedup_vs_loop']:.2f}x" if r["speedup_vs_loop"] is not None else "-"
        out.append(
            f"{r['engine']:<24} {r['strategy']:<15} {r['chunk']:>6} {r['s_per_round']:>9.4f} {sp:>9} "
            f"{r['client_steps_per_s']:>14.1f} {r['peak_mem_mb']:>8.1f}"
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
) -> dict[str, Any]:
    """Time the vectorized engine (each of ``strategies``) against the reference loop.

    Returns:
        ``{"config": {...}, "rows": [...]}``; each row has ``s_per_round`` (median),
        ``speedup_vs_loop``, ``client_steps_per_s`` and ``peak_mem_mb``.
    """
    w = build_workload(model, clients, per_round, steps, batch_size, device, dataset, input_shape, data_dir=data_dir)
    timings = time_trainers(w, make_trainers(w, strategies, loop), repeats)
    return {
        "config": {
            "model": model, "clients": clients, "per_round": len(w.ids), "steps": steps, "batch_size": batch_size,
            "dataset": dataset, "input_shape": list(w.sim.dataset.input_shape), "device": str(w.sim.device),
            "num_params": w.sim.num_params, "repeats": repeats, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "client_steps_per_round": w.client_steps,
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


# ---- command line -------------------------------------------------------------------------
def _shape(s: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {s!r}") from None
    return c, h, w


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lr", help="model name (default lr)")
    p.add_argument("--steps", type=int, default=5, help="local steps per client (each client holds steps*B samples)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=10, help="local batch size B")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default) or a real dataset such as fashion_mnist")
    p.add_argument("--data_dir", "--data-dir", default="./data", help="root of real datasets")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine (medians are reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")


def _setup_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


def _check_model(model: str) -> None:
    from .models import MODELS

    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(MODELS.names())}")


def cmd_bench_engine(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench engine", description="Vectorized engine vs the per-client reference loop on one workload.")
    _common(p)
    p.add_argument("--clients", type=int, required=True, help="clients in total")
    p.add_argument("--per_round", "--per-round", type=int, default=None, help="clients per round (default: all)")
    p.add_argument("--input_shape", "--input-shape", type=_shape, default=None, help="C,H,W of synthetic data (default 1,28,28)")
    p.add_argument("--strategies", default="auto", help="comma-separated vectorized strategies to time (default auto), e.g. auto,vmap,loop")
    p.add_argument("--no_loop", "--no-loop", action="store_true", help="skip the reference loop")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ns = p.parse_args(argv)
    _check_model(ns.model)
    if ns.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    from .config import STRATEGIES

    strategies = [s for s in ns.strategies.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ConfigError(f"--strategies must be a comma-separated subset of {STRATEGIES}, got {ns.strategies!r}")
    _setup_threads(ns.threads)
    device = "cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device)
    res = bench_engine(
        ns.model, ns.clients, ns.per_round, ns.steps, ns.batch_size, device, ns.dataset, ns.input_shape,
        strategies, ns.repeats, not ns.no_loop, ns.data_dir,
    )
    c = res["config"]
    print(
        f"spfl bench engine: {c['model']} ({c['num_params']:,} params) on {c['dataset']} {tuple(c['input_shape'])}, "
        f"{c['per_round']} clients x {c['steps']} steps x batch {c['batch_size']}, {c['device']}, "
        f"{c['threads']} threads, median of {c['repeats']} alternating calls"
    )
    print(format_rows(res["rows"]))
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {ns.json}")
    return 0


def cmd_bench_scale(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench scale", description="Time per round and clients/s against cohort size.")
    _common(p)
    p.set_defaults(steps=1)
    p.add_argument("--clients", type=_ints, default=[10, 100, 1000, 10000], help="comma-separated cohort sizes")
    p.add_argument("--loop_max", "--loop-max", type=int, default=1000, help="largest cohort the reference loop runs")
    p.add_argument("--out", default="bench/results/scale", help="directory for scale.json and scale.png")
    ns = p.parse_args(argv)
    _check_model(ns.model)
    if not ns.clients or min(ns.clients) < 1:
        raise ConfigError("--clients must list cohort sizes >= 1")
    _setup_threads(ns.threads)
    device = "cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device)
    print(f"spfl bench scale: {ns.model}, {ns.steps} steps x batch {ns.batch_size}, {device}, {torch.get_num_threads()} threads")
    rows = bench_scale(ns.model, ns.clients, ns.steps, ns.batch_size, device, ns.dataset, ns.loop_max, ns.repeats, log=lambda s: print(s, flush=True))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": ns.model, "steps": ns.steps, "batch_size": ns.batch_size, "device": device, "dataset": ns.dataset,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "scale.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    plot_scale(rows, out / "scale.png", f"{ns.model} on {device}: {ns.steps} local steps x batch {ns.batch_size}")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")
    return 0


@register_command("bench", "benchmarks: bench engine (vectorized vs loop), bench scale (cohort size)")
def cmd_bench(argv: Sequence[str]) -> int:
    subs = {"engine": cmd_bench_engine, "scale": cmd_bench_scale}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spfl bench engine|scale [flags]   (spfl bench engine --help)")
        return 0 if argv else 2
    if argv[0] not in subs:
        raise SpflError(f"unknown bench {argv[0]!r}; choose one of: {', '.join(subs)}")
    return subs[argv[0]](list(argv[1:]))
