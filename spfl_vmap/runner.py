"""Running a configuration end to end: run directory, metrics log, checkpoints, plot, summary.

Run directory layout:
    config.json     the fully resolved config, package version and engine choices
    metrics.jsonl   one JSON object per evaluated round, appended and flushed as it happens
    summary.json    final and best accuracy, timings
    accuracy.png    test accuracy vs round
    <stage logs>    a stage with a ``log_file`` gets one row per evaluated round there, e.g.
                    privacy.jsonl (DP runs: epsilon, per client at example/local level)
    <stage files>   what stages write at the end, e.g. epsilons.json (--dp_epsilon_json)
    checkpoint.pt   with --checkpoint_every K: global model, server state, stage states, round
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from . import __version__, distributed
from .builder import Simulator
from .config import RESUMABLE_CHANGES, Config, resume_mismatches
from .data import Dataset
from .engine.simulator import CHECKPOINT, History, read_checkpoint
from .errors import SpflError
from .stages import Stage


def package_version() -> str:
    return __version__


def default_run_dir(cfg: Config) -> Path:
    name = cfg.name or f"{cfg.dataset}-{cfg.model}-{cfg.engine}"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None``: the files are strict JSON
    (``null``), never the bare ``NaN`` / ``Infinity`` that other JSON readers reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(strict(obj), allow_nan=False, default=str, **kw)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_run_dir(out: Path, resume: bool) -> Path | None:
    """Check ``out`` before any data is loaded; create it. Returns the topmost directory this
    created (to remove if the run fails before writing anything), or None."""
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out else f"has a parent that is a file: {parent}"
            raise SpflError(f"--out {out} {what}; choose a directory path")
    if resume:
        return None
    created = None
    for d in [out, *out.parents]:
        if d.exists():
            break
        created = d
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpflError(f"cannot create run directory {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise SpflError(f"run directory {out} is not writable")
    return created


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.lock`` for the whole run: a second process that
    writes to the same directory gets a one-line error instead of interleaving its rounds.
    ``holder`` names the locking command in the error (``spfl sweep`` locks its sweep directory)."""

    def __init__(self, out: Path, holder: str = "spfl run") -> None:
        self.path = out / ".lock"
        self.holder = holder
        self.fh: Any = None

    def __enter__(self) -> "RunLock":
        try:
            self.fh = open(self.path, "a+")
        except OSError as e:
            raise SpflError(f"cannot lock run directory {self.path.parent}: {e.strerror or e}") from None
        try:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise SpflError(f"run directory {self.path.parent} is in use by {holder}; wait for it or choose another --out") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{self.holder} pid {os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
        self.fh.close()


def check_resume(out: Path, cfg: Config) -> dict[str, Any]:
    """Refuse to resume with settings that would change the results of the checkpointed run.

    Returns the checkpoint, read once here and restored by the simulator."""
    if not (out / CHECKPOINT).is_file():
        raise SpflError(f"{out} has no {CHECKPOINT}: the run was started without --checkpoint_every, or stopped before "
                        f"its first checkpoint; start it again instead")
    checkpoint = read_checkpoint(out / CHECKPOINT)
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        raise SpflError(f"{out / CHECKPOINT} holds no config; it cannot be checked for a safe resume")
    diff = resume_mismatches(saved, cfg)
    if diff:
        raise SpflError(f"--resume {out}: {', '.join(diff)} differ from the checkpointed run and would change its "
                        f"results; only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume")
    return checkpoint


class MetricsLog:
    """Append-only JSONL, flushed and fsynced per row, so a killed run loses at most the round in flight."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(dumps(row) + "\n")
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
        tmp.write_text("".join(dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)
        return keep


def plot_accuracy(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Test accuracy vs round. When the rows carry the backdoor module's ``asr`` (and ``asr_all``),
    both are drawn on the same axes (all three are fractions in [0, 1]) with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["round"] for r in rows], [r["test_acc"] for r in rows], marker="o", ms=3, label="test accuracy")
    backdoor = [r for r in rows if r.get("asr") is not None]
    if backdoor:
        rounds = [r["round"] for r in backdoor]
        ax.plot(rounds, [r["asr"] for r in backdoor], marker="o", ms=3, color="tab:red", label="attack success rate (asr)")
        if all(r.get("asr_all") is not None for r in backdoor):
            ax.plot(rounds, [r["asr_all"] for r in backdoor], ls="--", color="tab:red", alpha=0.6, label="asr_all (every triggered image)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy / attack success rate" if backdoor else "test accuracy")
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
    """Final and best accuracy, timings, the last value of every evaluation hook's metrics."""
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
        "diverged": sim.diverged,
        "rejected_rounds": sim.rejected_rounds,
        "nonfinite_loss_rounds": sim.nonfinite_loss_rounds,
        **{k: rows[-1][k] for k in sorted(sim.eval_keys) if rows and k in rows[-1]},
        **sim.describe(),
    }


def run(
    cfg: Config,
    data: Dataset | None = None,
    *,
    resume_dir: str | Path | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log: Callable[[str], None] | None = None,
    stages: Sequence[Stage] = (),
) -> History:
    """Run ``cfg`` to completion and return its :class:`History`.

    Writes a run directory when ``cfg.out`` is set (the CLI always sets it). With
    ``resume_dir``, continues the checkpointed run there; every setting that affects results
    must match the checkpoint's (see ``config.RESUMABLE_CHANGES``). The run directory is checked
    and locked before any data is loaded: one process writes a run directory at a time.
    ``stages`` are extra pipeline stages (see :class:`spfl_vmap.Simulator`).
    """
    log = log or (lambda s: None)
    with open_run_dir(cfg, resume_dir) as (out, checkpoint):
        hist = _run(cfg, data, out, checkpoint, on_round, log, stages)
        distributed.barrier()  # under torchrun every rank returns once rank 0 has written the run's files
        return hist


@contextmanager
def open_run_dir(cfg: Config, resume_dir: str | Path | None = None) -> Iterator[tuple[Path | None, dict[str, Any] | None]]:
    """Check, create and lock the run directory before any data is loaded.

    Yields ``(out, checkpoint)``: the directory (``None`` when ``cfg.out`` is unset and there is no
    ``resume_dir``) and, with ``resume_dir``, the checked checkpoint to resume from. A fresh run
    refuses a directory that holds another run; a run that fails before writing anything leaves
    no directory behind. The lock is held until the ``with`` block ends.
    """
    out = Path(resume_dir) if resume_dir is not None else (Path(cfg.out) if cfg.out else None)
    if out is None:
        yield None, None
        return
    if not distributed.is_main():  # torchrun's ranks > 0 write nothing; they resume from rank 0's checkpoint (shared filesystem)
        yield None, (check_resume(out, cfg) if resume_dir is not None else None)
        return
    created = prepare_run_dir(out, resume=resume_dir is not None)
    with RunLock(out):
        checkpoint = None
        if resume_dir is not None:
            checkpoint = check_resume(out, cfg)
        elif (out / CHECKPOINT).exists() or (out / "metrics.jsonl").exists():
            which = CHECKPOINT if (out / CHECKPOINT).exists() else "metrics.jsonl"
            raise SpflError(f"run directory {out} already holds {which} from another run; choose a new --out or use --resume {out}")
        try:
            yield out, checkpoint
        except BaseException:
            if created is not None and not (out / "metrics.jsonl").exists() and not (out / CHECKPOINT).exists():
                shutil.rmtree(created, ignore_errors=True)  # failed before writing anything: leave no stray directory
            raise


def _run(cfg: Config, data: Dataset | None, out: Path | None, checkpoint: dict[str, Any] | None, on_round, log, stages) -> History:
    """The run itself; ``checkpoint`` is the state to resume from (already checked), or None."""
    rec = RunRecorder(Simulator(cfg, data, stages=stages), out, checkpoint, on_round, log)
    while not rec.sim.done:
        if not rec.record(rec.sim.step()):
            break
    return rec.close()


class RunRecorder:
    """One run's outputs around its simulator: what :func:`run` writes before, after each round,
    and at the end. ``spfl sweep``'s vectorized points drive several recorders in lockstep.

    Args:
        sim: The run's simulator (not yet stepped).
        out: The run directory (locked by :func:`open_run_dir`), or None to write nothing.
        checkpoint: The checked checkpoint to resume from, or None.
        on_round: Called with each round's metrics.
        log: Receives the run's console lines.
    """

    def __init__(self, sim: Simulator, out: Path | None, checkpoint: dict[str, Any] | None,
                 on_round: Callable[[dict[str, Any]], None] | None, log: Callable[[str], None]) -> None:
        self.sim, self.out, self.on_round, self.log = sim, out, on_round, log
        cfg = sim.cfg
        log(format_partition(sim.partition_stats))
        for line in describe_lines(sim.describe()):
            log(line)
        self.metrics: MetricsLog | None = None
        self.stage_logs: list[tuple[Stage, MetricsLog]] = []
        if out is not None:
            self.metrics = MetricsLog(out / "metrics.jsonl")
            self.stage_logs = [(s, MetricsLog(out / s.log_file)) for s in sim.stages if s.log_file]
            if checkpoint is not None:
                sim.load_checkpoint(out, checkpoint)
                sim.history.rows = self.metrics.truncate_after(sim.round)
                for s, slog in self.stage_logs:
                    s.load_log(slog.truncate_after(sim.round))
                log(f"resuming {out} after round {sim.round}")
            write_json_atomic(out / "config.json", {"config": cfg.to_dict(), "version": package_version(), **sim.describe()})
        elif checkpoint is not None:  # a torchrun rank > 0 restores rank 0's checkpoint and writes nothing
            sim.load_checkpoint(Path(cfg.out or "."), checkpoint)
        self.bar = None
        if distributed.is_main() and (cfg.progress and sys.stderr.isatty() or os.environ.get("SPFL_PROGRESS") == "1"):
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.comm_round, initial=sim.round, desc="rounds", unit="rd", file=sys.stderr, leave=False)

    def record(self, m: dict[str, Any]) -> bool:
        """Log, write and checkpoint the round whose metrics are ``m``; False when a guard
        stopped the run before that round trained (the run is over)."""
        sim, cfg, log = self.sim, self.sim.cfg, self.log
        if "stopped" in m:  # a guard stopped the run before this round trained
            log(f"stopped before round {m['round']}: {sim.stopped}")
            return False
        warn_divergence(sim, m, log)
        if "test_acc" in m and self.metrics is not None:
            self.metrics.append(m)
            append_stage_logs(self.stage_logs)
        if self.out is not None and cfg.checkpoint_every and (sim.round % cfg.checkpoint_every == 0 or sim.done):
            sim.save_checkpoint(self.out)
        if self.bar is not None:
            self.bar.update(1)
            if "test_acc" in m:
                self.bar.set_postfix(acc=f"{m['test_acc']:.4f}", loss=f"{m['train_loss']:.3f}")
        if self.on_round is not None:
            self.on_round(m)
        if sim.stopped is not None:
            log(f"stopped after round {m['round']}: {sim.stopped}")
        return True

    def close(self) -> History:
        """Evaluate a stopped run's last model, then write the summary, stage files and plot."""
        sim, cfg, out = self.sim, self.sim.cfg, self.out
        if self.bar is not None:
            self.bar.close()
        if sim.stopped is not None and sim.round and (not sim.history.rows or sim.history.rows[-1]["round"] != sim.round):
            ev = sim.evaluation()  # the model as it stands when the run stopped
            row = {"round": sim.round, **ev, "train_loss": float("nan"), "wall_s": sim.elapsed, "clients_per_s": 0.0}
            sim.history.rows.append(row)
            if self.metrics is not None:
                self.metrics.append(row)
                append_stage_logs(self.stage_logs)
        sim.history.summary = summarize(sim)
        sim.history.model_state = {k: v.detach().cpu().clone() for k, v in sim.global_params.items()}
        if out is not None:
            write_json_atomic(out / "summary.json", sim.history.summary)
            for s in sim.stages:
                for name, obj in s.final_files().items():
                    write_json_atomic(out / name, obj)
            if sim.history.rows:
                plot_accuracy(sim.history.rows, out / "accuracy.png", f"{cfg.dataset} {cfg.model} {cfg.partition_method}")
        return sim.history


def warn_divergence(sim: Simulator, m: dict[str, Any], log: Callable[[str], None]) -> None:
    """One warning when a streak of rejected rounds or of non-finite training losses begins."""
    if m.get("round_rejected") and sim.consecutive_rejected == 1:
        log(f"warning: round {m['round']} was rejected (every update, or the aggregate, was NaN/Inf); the model is "
            f"unchanged. The run stops after {sim.cfg.max_rejected_rounds} such rounds in a row (--max_rejected_rounds)")
    if sim.consecutive_nonfinite_loss == 1 and m.get("clients"):
        log(f"warning: round {m['round']}: the training loss is {m.get('train_loss')} (diverging: lower --lr?)")


def describe_lines(d: dict[str, Any]) -> list[str]:
    """What a run states up front: the privacy actually applied, the f the aggregator assumes."""
    lines = []
    if "privacy" in d:
        p = d["privacy"]
        lines.append(f"privacy: dp_mode {p['mode']}, noise multiplier {p['noise_multiplier']:.4g}, clip {p['clip']:g}, "
                     f"delta {p['delta']:.3g}, accountant {p['accountant']}"
                     + (f", target epsilon {p['target_epsilon']:g}" if p.get("target_epsilon") is not None else ""))
    if "adaptive_clip" in d:
        a = d["adaptive_clip"]
        lines.append(f"adaptive clipping: updates noised at z_delta {a['update_noise_multiplier']:.4g}, count noise "
                     f"sigma_b {a['count_noise_std']:.4g}, accounted at z {a['accounted_noise_multiplier']:.4g}")
    if "byzantine" in d:
        b = d["byzantine"]
        what = f"{b['attack']} vs {b['defense']}" if b["attack"] != "none" else f"aggregator {b['defense']}"
        lines.append(f"byzantine: {what}, {b['malicious_clients']} malicious clients ({b['mode']}), "
                     f"aggregator assumes f={b['f']} ({b['f_rule']})")
    if "root_samples" in d:
        lines.append(f"server root set: {d['root_samples']} class-stratified training samples, held out from every client")
    if "ats" in d:
        a = d["ats"]
        pols = " | ".join(f"{p} ({ops})" for p, ops in zip(a["policies"], a["ops"]))
        draw = ", each image draws one" if len(a["policies"]) > 1 else ""
        where = a["list"] if a["source"] == "--ats_policy" else f"{a['source']}, {a['list']}"
        lines.append(f"ats: {pols}{draw}; {where}" + (", ops applied with their probabilities" if a["use_prob"] else ""))
    lines += backdoor_lines(d)
    return lines


def backdoor_lines(d: dict[str, Any]) -> list[str]:
    """The backdoor attack, its attackers and the backdoor defenses actually applied."""
    lines = []
    if "backdoor" in d:
        b = d["backdoor"]
        options = [f"boost {b['boost']}" if b.get("boost") is not None else "",
                   f"schedule {b['schedule']}" if b.get("schedule", "continuous") != "continuous" else "",
                   f"projected to norm {b['project']:g}" if b.get("project") is not None else "",
                   f"Neurotoxin keeps {b['neurotoxin_keep']:g}" if b.get("neurotoxin_keep") is not None else ""]
        source = f" from class {b['source']}" if b.get("source") is not None else ""
        lines.append(f"backdoor: {b['attack']}, {b['trigger']} trigger ({b['trigger_pixels']} pixels){source} -> class "
                     f"{b['target']}, {b['poison_frac']:g} of each malicious batch" + "".join(f", {o}" for o in options if o))
    if "backdoor_adversary" in d:
        a = d["backdoor_adversary"]
        lines.append(f"backdoor attackers: {a['rule']} ({a['malicious_clients']} clients)")
    if "backdoor_defense" in d:
        x = d["backdoor_defense"]
        where = "on each client update" if x["noise_on"] == "client" else "on the aggregate"
        lines.append(f"backdoor defense: {x['defense']}, clip {x['clip']:g} ({x['clip_mode']}), noise std {x['noise']:g} {where}")
    if "crfl" in d:
        c = d["crfl"]
        lines.append(f"crfl: the global model is clipped to norm {c['rho_schedule']} and noised with std {c['sigma']:g} every round")
    return lines


def append_stage_logs(stage_logs: list[tuple[Stage, MetricsLog]]) -> None:
    for s, slog in stage_logs:
        row = s.log_row()
        if row is not None:
            slog.append(row)


def load_run_config(run_dir: str | Path) -> Config:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise SpflError(f"{run_dir} is not a run directory: {p} is missing")
    if not (Path(run_dir) / CHECKPOINT).is_file():
        raise SpflError(f"{run_dir} has no {CHECKPOINT}: the run was started without --checkpoint_every, or stopped "
                        f"before its first checkpoint; start it again instead")
    try:
        saved = json.loads(p.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SpflError(f"{p} is damaged ({type(e).__name__}); it cannot be resumed") from None
    return Config.from_dict(saved)
