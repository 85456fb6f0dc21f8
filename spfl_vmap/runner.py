"""Running a configuration end to end: run directory, metrics log, checkpoints, plot, summary.

Run directory layout:
    config.json     the fully resolved config, package version and engine choices
    metrics.jsonl   one JSON object per evaluated round, appended and flushed as it happens
    summary.json    final and best accuracy, timings
    accuracy.png    test accuracy vs round
    privacy.jsonl   DP runs: epsilon per evaluated round (per client at example/local level)
    epsilons.json   with --dp_epsilon_json: {client_id: epsilon}, the original toolkit's layout
    checkpoint.pt   with --checkpoint_every K: global model, server state, round
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from ..config import Config
from ..data import Dataset
from ..errors import SpflError
from .simulator import CHECKPOINT, History, Simulator


def package_version() -> str:
    from .. import __version__

    return __version__


def default_run_dir(cfg: Config) -> Path:
    name = cfg.name or f"{cfg.dataset}-{cfg.model}-{cfg.engine}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL, flushed and fsynced per row, so a killed run loses at most the round in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a killed run
                break
        return rows

    def truncate_after(self, round_idx: int) -> list[dict[str, Any]]:
        """Keep rows up to ``round_idx`` (rounds after a checkpoint are recomputed on resume)."""
        keep = [r for r in self.read() if r["round"] <= round_idx]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        return keep


def plot_accuracy(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in rows], [r["test_acc"] for r in rows], marker="o", ms=3)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_partition(stats: dict[str, dict[str, float]]) -> str:
    s, c = stats["samples"], stats["classes"]
    return (f"partition: samples/client min {s['min']} median {s['median']:g} max {s['max']}; "
            f"classes/client min {c['min']} median {c['median']:g} max {c['max']}")


def summarize(sim: Simulator) -> dict[str, Any]:
    rows = sim.history.rows
    accs = [r["test_acc"] for r in rows]
    return {
        "rounds": sim.round,
        "final_test_acc": accs[-1] if accs else None,
        "best_test_acc": max(accs) if accs else None,
        "final_test_loss": rows[-1]["test_loss"] if rows else None,
        "wall_s": sim.elapsed,
        "mean_clients_per_s": (sum(r["clients_per_s"] for r in rows) / len(rows)) if rows else None,
        "stopped": sim.stopped,
        **{k: rows[-1][k] for k in ("epsilon", "eps_min", "eps_median", "eps_max") if rows and k in rows[-1]},
        **sim.describe(),
    }


def run(
    cfg: Config,
    data: Dataset | None = None,
    *,
    resume_dir: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> History:
    """Run ``cfg`` to completion and return its :class:`History`.

    Writes a run directory when ``cfg.out`` is set (the CLI always sets it). With
    ``resume_dir``, continues the checkpointed run there.
    """
    log = log or (lambda s: None)
    sim = Simulator(cfg, data)
    log(format_partition(sim.partition_stats))
    out = Path(resume_dir) if resume_dir is not None else (Path(cfg.out) if cfg.out else None)
    metrics = privacy_log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(out / "metrics.jsonl")
        privacy_log = MetricsLog(out / "privacy.jsonl") if sim.privacy.mode != "none" else None
        if resume_dir is not None:
            sim.load_checkpoint(out)
            sim.history.rows = metrics.truncate_after(sim.round)
            if privacy_log is not None:
                sim.privacy.rows = privacy_log.truncate_after(sim.round)
            log(f"resuming {out} after round {sim.round}")
        else:
            if metrics.path.exists():
                raise SpflError(f"run directory {out} already holds metrics.jsonl; choose a new --out or use --resume {out}")
        write_json_atomic(out / "config.json", {"config": cfg.to_dict(), "version": package_version(), **sim.describe()})
    rng = range(sim.round, cfg.comm_round)
    bar = None
    if cfg.progress and sys.stderr.isatty() or os.environ.get("SPFL_PROGRESS") == "1":
        from tqdm import tqdm

        bar = tqdm(total=cfg.comm_round, initial=sim.round, desc="rounds", unit="rd", file=sys.stderr, leave=False)
    for _ in rng:
        m = sim.step()
        if sim.stopped is not None:
            log(f"stopped before round {m['round']}: {sim.stopped}")
            break
        if "test_acc" in m and metrics is not None:
            metrics.append(m)
            if privacy_log is not None:
                privacy_log.append(sim.privacy.rows[-1])
        if out is not None and cfg.checkpoint_every and (sim.round % cfg.checkpoint_every == 0 or sim.done):
            sim.save_checkpoint(out)
        if bar is not None:
            bar.update(1)
            if "test_acc" in m:
                bar.set_postfix(acc=f"{m['test_acc']:.4f}", loss=f"{m['train_loss']:.3f}")
        if on_round is not None:
            on_round(m)
    if bar is not None:
        bar.close()
    if sim.stopped is not None and sim.round and (not sim.history.rows or sim.history.rows[-1]["round"] != sim.round):
        acc, loss = sim.evaluate()  # the model as it stands when the budget ran out
        row = {"round": sim.round, "test_acc": acc, "test_loss": loss, "train_loss": float("nan"), "wall_s": sim.elapsed,
               "clients_per_s": 0.0, **sim.privacy.report(sim.round)}
        sim.history.rows.append(row)
        if metrics is not None:
            metrics.append(row)
            if privacy_log is not None:
                privacy_log.append(sim.privacy.rows[-1])
    sim.history.summary = summarize(sim)
    if out is not None:
        write_json_atomic(out / "summary.json", sim.history.summary)
        if cfg.dp_epsilon_json and sim.privacy.rows and "epsilons" in sim.privacy.rows[-1]:
            write_json_atomic(out / "epsilons.json", sim.privacy.rows[-1]["epsilons"])
        if sim.history.rows:
            plot_accuracy(sim.history.rows, out / "accuracy.png", f"{cfg.dataset} {cfg.model} {cfg.partition_method}")
    return sim.history


def load_run_config(run_dir: str | Path) -> Config:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise SpflError(f"{run_dir} is not a run directory: {p} is missing")
    if not (Path(run_dir) / CHECKPOINT).is_file():
        raise SpflError(f"{run_dir} has no {CHECKPOINT}; only runs started with --checkpoint_every can be resumed")
    return Config.from_dict(json.loads(p.read_text())["config"])
