"""Hyperparameter sweeps in one process (``spfl sweep``).

A sweep is a list of points, each a whole ``spfl run`` configuration: shared base flags plus the
swept values. The values come from a grid (the cartesian product of each flag's values), from a
random search (``N`` draws from ranges and choices, seeded by the sweep seed), or from both
(every random draw at every grid point). Any ``spfl run`` flag can be swept; its values are
parsed and validated as ``spfl run`` parses them, and every point's config is validated before
any data is loaded.

All points run in one process. Points with equal data settings (:data:`DATA_FIELDS`) share one
loaded :class:`~spfl_vmap.data.Dataset`. Each point writes a normal run directory under
``<sweep dir>/points/`` through the runner (``spfl_vmap.runner``), as ``spfl run`` writes it.

**Vectorized points** (issue 13, item 6). Points that differ only in continuous
hyperparameters (:data:`VECTOR_FIELDS`: client and server optimizer, DP noise and clip, attack
and aggregator strengths) run in lockstep, one
round at a time (:func:`run_lockstep`): their cohorts are stacked into one
:class:`~spfl_vmap.stages.RoundContext` of ``P x N`` rows that carries each row's starting model
(``row_params``) and client hyperparameters (``row_hypers``), ONE trainer call trains them all,
and the update matrix is split back per point. Each point then finishes its round on its own
(update stages, aggregation, its own server optimizer and server lr, evaluation, logging,
checkpoints) through ``RoundLoop.finish_round`` and the runner's ``RunRecorder``, exactly as
``RoundLoop.step`` and ``spfl run`` do. Only what is safe runs this way (:func:`lockstep_blockers`,
:func:`trainer_blockers`): the vectorized trainer with the ``vmap`` strategy or the DP-SGD
trainer, no batch transforms, no FedSGD; other points run one after another.

Sweep directory::

    sweep.json              the spec (base flags, grid, random search) and each point's directory and mode
    sweep.csv, sweep.md     one row per point: swept values, final and best test accuracy, final test
                            loss, asr / epsilon when present, rounds, wall seconds, mode, status
    final_vs_<flag>.png     final test accuracy against each swept flag (log x for learning-rate-like flags)
    curves.png              test accuracy against round, one line per point
    points/NNN-<values>/    each point's run directory (config.json, metrics.jsonl, summary.json, ...)

**Resume.** Running the same sweep again (or ``spfl sweep --resume DIR``) skips every point whose
run directory holds a summary, continues a point from its checkpoint, restarts a point that was
killed before its first checkpoint, and refuses a directory that holds a different sweep. The
sweep locks its directory, and each point its run directory, so two sweeps never mix results.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import re
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .. import __version__
from ..builder import Simulator
from ..config import Config, base_type, coerce, field_types, load_config_file
from ..data import Dataset, load_dataset
from ..engine.local import LocalResult, VmapTrainer, auto_chunk
from ..errors import ConfigError, SpflError
from ..modules.dpsgd import DPSGDTrainer
from ..rng import generator
from ..runner import RunLock, RunRecorder, dumps, open_run_dir, run, write_json_atomic
from ..stages import BatchTransform, RoundContext

# Fields that may differ inside a lockstep group: the client optimizer's and DP-SGD's noise
# multiplier and clip, which the trainers take per row (``RoundContext.row_hypers``), and scalars
# that only the stages after local training read, which every point applies to its own rows
# (server lr and momentum, user-level and local DP's noise multiplier and clip, attack and
# aggregator strengths).
VECTOR_FIELDS = ("lr", "momentum", "wd", "server_lr", "server_momentum", "dp_sigma", "grad_norm",
                 "by_attack_params", "by_defense_params")
# Fields that never change a point's results: ignored when grouping points for lockstep.
OUTPUT_FIELDS = ("out", "name", "progress")
# Settings of the loaded dataset: points equal in these share one Dataset.
DATA_FIELDS = ("dataset", "data_dir", "download", "synthetic_train", "synthetic_test")
# Flags that cannot be swept: each point's directory is chosen by the sweep.
NOT_SWEPT = ("out", "name")
SPEC_KEYS = ("base", "grid", "random")

Train = Callable[[RoundContext, Sequence[BatchTransform]], LocalResult]


# ---- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """A random-search range: uniform in ``[low, high]``, or log-uniform with ``log``."""

    low: float
    high: float
    log: bool = False

    def text(self) -> str:
        return f"{'log:' if self.log else ''}{self.low:g}:{self.high:g}"


@dataclass
class SweepSpec:
    """What a sweep runs: base flags, a grid, and a random search (all as Config field names).

    Attributes:
        base: ``{field: value}`` shared by every point (coerced to the fields' types).
        grid: ``{field: [values]}``; the points are the cartesian product, first flag slowest.
        random: Number of random draws (0: no random search).
        ranges: ``{field: Range}`` drawn for each random point.
        choices: ``{field: [values]}`` one drawn uniformly for each random point.
        sweep_seed: Seed of the random draws.
    """

    base: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    random: int = 0
    ranges: dict[str, Range] = field(default_factory=dict)
    choices: dict[str, list[Any]] = field(default_factory=dict)
    sweep_seed: int = 0

    def __post_init__(self) -> None:
        if self.random < 0:
            raise ConfigError(f"--random must be >= 0, got {self.random}")
        if self.random and not (self.ranges or self.choices):
            raise ConfigError("--random N needs at least one --range NAME=[log:]LOW:HIGH or --choice NAME=A,B")
        if (self.ranges or self.choices) and not self.random:
            raise ConfigError("--range and --choice draw random points: give --random N as well")
        if not self.grid and not self.random:
            raise ConfigError("a sweep needs --grid, --random or a --sweep_file with a grid or random section")
        seen: dict[str, str] = {}
        for where, names in (("--grid", self.grid), ("--range", self.ranges), ("--choice", self.choices)):
            for name in names:
                if name in seen:
                    raise ConfigError(f"{name} is swept twice ({seen[name]} and {where}); sweep each flag once")
                if name in self.base:
                    raise ConfigError(f"{name} is both a base flag and swept ({where}); drop one of them")
                seen[name] = where

    @property
    def swept(self) -> list[str]:
        """The swept flags, in column order."""
        return [*self.grid, *self.ranges, *self.choices]

    def points(self) -> list[dict[str, Any]]:
        """Every point's swept values: each grid point with each random draw."""
        grid = [dict(zip(self.grid, combo)) for combo in itertools.product(*self.grid.values())] or [{}]
        draws = [self.draw(i) for i in range(self.random)] or [{}]
        return [{**g, **d} for g in grid for d in draws]

    def draw(self, i: int) -> dict[str, Any]:
        """Random point ``i``: a generator seeded by ``(sweep_seed, "sweep", i)``, ranges first."""
        g = generator(self.sweep_seed, "sweep", i)
        hints = field_types()
        out: dict[str, Any] = {}
        for name, r in self.ranges.items():
            u = float(torch.rand((), generator=g, dtype=torch.float64))
            v = math.exp(math.log(r.low) + u * (math.log(r.high) - math.log(r.low))) if r.log else r.low + u * (r.high - r.low)
            out[name] = round(v) if base_type(hints[name]) is int else float(f"{v:.6g}")  # readable, reproducible
        for name, values in self.choices.items():
            out[name] = values[int(torch.randint(len(values), (), generator=g))]
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored in ``sweep.json`` and compared on resume."""
        random = None
        if self.random:
            random = {"n": self.random, "seed": self.sweep_seed, "ranges": {k: r.text() for k, r in self.ranges.items()},
                      "choices": self.choices}
        return json.loads(dumps({"base": self.base, "grid": self.grid, "random": random}))

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "sweep file") -> "SweepSpec":
        """Parse a sweep file's mapping (``base``, ``grid``, ``random``); every value is checked."""
        return cls(**spec_parts(d, where))


def spec_parts(d: Any, where: str) -> dict[str, Any]:
    """A sweep file's mapping as :class:`SweepSpec` keyword arguments, each value parsed and
    checked (the spec as a whole is checked when it is built, after the command line is added)."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must hold a mapping with base, grid and/or random")
    unknown = sorted(set(d) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown)}; expected {', '.join(SPEC_KEYS)}")
    base = section(d, "base", where)
    spec_base = {fname: parse_value(fname, v, f"{where} base") for fname, v in
                 ((field_name(k, f"{where} base", sweepable=False), v) for k, v in base.items())}
    grid = {}
    for k, values in section(d, "grid", where).items():
        name = field_name(k, f"{where} grid")
        grid[name] = parse_values(name, values if isinstance(values, list) else split_values(str(values)), f"{where} grid")
    rnd = section(d, "random", where)
    extra = sorted(set(rnd) - {"n", "seed", "ranges", "choices"})
    if extra:
        raise ConfigError(f"{where} random: unknown key(s) {', '.join(extra)}; expected n, seed, ranges, choices")
    ranges = {}
    for k, v in (rnd.get("ranges") or {}).items():
        name, r = parse_range(f"{k}={':'.join(map(str, v)) if isinstance(v, list) else v}", f"{where} random.ranges")
        ranges[name] = r
    choices = {}
    for k, values in (rnd.get("choices") or {}).items():
        name = field_name(k, f"{where} random.choices")
        choices[name] = parse_values(name, values if isinstance(values, list) else split_values(str(values)), f"{where} random.choices")
    return dict(base=spec_base, grid=grid, random=int_value(rnd.get("n", 0), f"{where} random.n"), ranges=ranges,
                choices=choices, sweep_seed=int_value(rnd.get("seed", 0), f"{where} random.seed"))


def section(d: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key} must be a mapping of flag names, got {type(v).__name__}")
    return v


def int_value(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            return int(str(v))
        except ValueError:
            raise ConfigError(f"{where} must be an integer, got {v!r}") from None
    return v


def field_name(name: str, where: str, sweepable: bool = True) -> str:
    """The Config field a flag names (dashes allowed); a one-line error for anything else."""
    norm = str(name).strip().lstrip("-").replace("-", "_")
    known = [f.name for f in fields(Config)]
    if norm not in known:
        close = get_close_matches(norm, known, n=1)
        raise ConfigError(f"{where}: unknown flag {name!r}" + (f" (did you mean {close[0]}?)" if close else "")
                          + "; any spfl run flag can be swept (spfl run --help)")
    if sweepable and norm in NOT_SWEPT:
        raise ConfigError(f"{where}: --{norm} cannot be swept: each point's run directory is chosen by the sweep")
    return norm


def split_values(text: str) -> list[str]:
    """``"a,b,c"``; values that hold commas themselves (``tau=5,n_iter=3``) are separated by ``;``."""
    sep = ";" if ";" in text else ","
    return [v.strip() for v in text.split(sep) if v.strip()]


def parse_value(name: str, value: Any, where: str) -> Any:
    """``value`` as the field's type, as ``spfl run`` parses it (``none`` for optional fields)."""
    tp = field_types()[name]
    if isinstance(value, str) and value.lower() in ("none", "null") and base_type(tp) is not tp:
        return None
    try:
        return coerce(name, value, tp)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_values(name: str, values: list[Any], where: str) -> list[Any]:
    out = [parse_value(name, v, where) for v in values]
    if not out:
        raise ConfigError(f"{where}: {name} has no values")
    repeated = [v for i, v in enumerate(out) if v in out[:i]]
    if repeated:
        raise ConfigError(f"{where}: {name} repeats the value {repeated[0]!r}")
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["lr=0.01,0.1", "seed=0,1"]`` -> ``{"lr": [0.01, 0.1], "seed": [0, 1]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} must look like NAME=V1,V2,...")
        k, text = item.split("=", 1)
        name = field_name(k, "--grid")
        if name in grid:
            raise ConfigError(f"--grid gives {name} twice")
        grid[name] = parse_values(name, split_values(text), "--grid")
    return grid


def parse_range(item: str, where: str = "--range") -> tuple[str, Range]:
    """``"lr=log:0.001:0.1"`` (log-uniform) or ``"momentum=0:0.9"`` (uniform), for int or float flags."""
    if "=" not in item:
        raise ConfigError(f"{where} {item!r} must look like NAME=[log:]LOW:HIGH")
    k, text = item.split("=", 1)
    name = field_name(k, where)
    if base_type(field_types()[name]) not in (int, float):
        raise ConfigError(f"{where}: {name} is not a number; use --choice {name}=A,B for it")
    parts = text.split(":")
    log = bool(parts) and parts[0].strip().lower() == "log"
    parts = parts[1:] if log else parts
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"{where} {item!r} must look like NAME=[log:]LOW:HIGH with two numbers") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ConfigError(f"{where} {item!r}: need finite LOW <= HIGH")
    if log and low <= 0:
        raise ConfigError(f"{where} {item!r}: a log range needs LOW > 0")
    return name, Range(low, high, log)


def parse_choice(item: str) -> tuple[str, list[Any]]:
    if "=" not in item:
        raise ConfigError(f"--choice {item!r} must look like NAME=A,B,...")
    k, text = item.split("=", 1)
    name = field_name(k, "--choice")
    return name, parse_values(name, split_values(text), "--choice")


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """A YAML/JSON sweep file, as :class:`SweepSpec` keyword arguments::

        base: {dataset: digits, comm_round: 20}
        grid: {lr: [0.01, 0.03, 0.1], seed: [0, 1]}
        random: {n: 8, seed: 0, ranges: {momentum: "log:0.001:0.1"}, choices: {by_defense: [krum, median]}}
    """
    return spec_parts(load_config_file(path), where=f"sweep file {path}")


# ---- points ---------------------------------------------------------------------------------
def fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def point_label(values: dict[str, Any]) -> str:
    """``lr=0.03 seed=1``."""
    return " ".join(f"{k}={fmt(v)}" for k, v in values.items()) or "base"


def point_dirname(i: int, values: dict[str, Any]) -> str:
    """``003-lr=0.03_seed=1``: the index keeps names unique, the values keep them readable."""
    text = "_".join(f"{k}={fmt(v)}" for k, v in values.items())
    return f"{i:03d}-" + re.sub(r"[^A-Za-z0-9._=+-]", "-", text)[:80] if text else f"{i:03d}"


def point_configs(spec: SweepSpec, out: Path) -> list[Config]:
    """Every point's validated Config, its ``out`` set to its run directory under ``out/points``."""
    cfgs = []
    for i, values in enumerate(spec.points()):
        try:
            cfg = Config.from_dict({**spec.base, **values})
        except ConfigError as e:
            raise ConfigError(f"sweep point {point_label(values)}: {e}") from None
        cfgs.append(cfg.replace(out=str(out / "points" / point_dirname(i, values))))
    return cfgs


def spec_hash(spec: SweepSpec) -> str:
    return hashlib.sha1(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def default_sweep_dir(spec: SweepSpec) -> Path:
    """``runs/sweep-<hash of the spec>``: the same command finds (and resumes) the same directory."""
    return Path("runs") / f"sweep-{spec_hash(spec)}"


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """The run's summary when it finished (a complete ``summary.json``), else None."""
    try:
        s = json.loads((run_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return s if isinstance(s, dict) and "rounds" in s and "final_test_acc" in s else None


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def point_state(run_dir: Path) -> str:
    """``finished`` | ``checkpoint`` (resumable) | ``partial`` (killed before its first checkpoint) | ``new``."""
    if read_summary(run_dir) is not None:
        return "finished"
    if (run_dir / "checkpoint.pt").is_file():
        return "checkpoint"
    return "partial" if run_dir.exists() else "new"


# ---- vectorized (lockstep) points ---------------------------------------------------------------
def group_key(cfg: Config) -> str:
    """Points with equal keys differ only in :data:`VECTOR_FIELDS` (and outputs)."""
    d = {k: v for k, v in cfg.to_dict().items() if k not in VECTOR_FIELDS and k not in OUTPUT_FIELDS}
    return json.dumps(d, sort_keys=True, default=str)


def data_key(cfg: Config) -> tuple[Any, ...]:
    return tuple(getattr(cfg, k) for k in DATA_FIELDS)


def lockstep_blockers(cfg: Config) -> list[str]:
    """Why ``cfg``'s points cannot train in lockstep, from the config alone (empty: they may)."""
    why = []
    if cfg.engine != "vmap":
        why.append(f"--engine {cfg.engine}")
    if cfg.strategy == "loop":
        why.append("--strategy loop")
    if cfg.use_gradient:
        why.append("--use_gradient (FedSGD)")
    return why


def trainer_blockers(sim: Simulator) -> list[str]:
    """Why a built run cannot train in lockstep: only the plain vectorized trainer with the
    ``vmap`` strategy, or the vectorized DP-SGD trainer, and no batch transforms (which read
    per-run state inside training)."""
    why = []
    if type(sim.trainer) not in (VmapTrainer, DPSGDTrainer):
        why.append(f"the {type(sim.trainer).__name__} trainer")
    elif sim.trainer.strategy not in ("vmap", "dpsgd-vmap"):
        why.append(f"the {sim.trainer.strategy} strategy (conv models on the CPU train per client)")
    if sim.pipeline.batch_transforms:
        why.append("batch transforms (" + ", ".join(t.name for t in sim.pipeline.batch_transforms) + ")")
    return why


def hypers_of(sim: Simulator) -> dict[str, float]:
    """The client hyperparameters a lockstep row carries (``RoundContext.row_hypers``): the
    optimizer's, and under DP-SGD the noise multiplier (as calibrated) and the clip norm."""
    cfg = sim.cfg
    h = {"lr": cfg.lr, "momentum": cfg.momentum, "wd": cfg.wd}
    if isinstance(sim.trainer, DPSGDTrainer):
        h.update(dp_sigma=sim.trainer.sigma, grad_norm=sim.trainer.clip)
    return h


def stack_contexts(ctxs: Sequence[RoundContext], hypers: Sequence[dict[str, float]]) -> RoundContext:
    """One context of all points' cohorts, ``P x N`` rows, point after point.

    Args:
        ctxs: Each point's context of the same round (same seed, data and model layout).
        hypers: Each point's ``{"lr", "momentum", "wd"}``.

    Returns:
        A context whose rows are the points' clients, with ``row_params {name: (sum N_p, *shape)}``
        (each point's global model repeated over its clients) and ``row_hypers {"lr" | "momentum"
        | "wd": (sum N_p,)}`` in float64 on their device.
    """
    c0 = ctxs[0]
    sizes = [c.num_clients for c in ctxs]
    row_params = {k: torch.cat([c.global_params[k].expand(n, *v.shape) for c, n in zip(ctxs, sizes)])
                  for k, v in c0.global_params.items()}  # (sum N_p, *shape)
    # float64, as the separate run's Python floats: the engine casts them per op as torch.optim does
    # (to the parameters' dtype for SGD's updates, kept in float64 for Adam's step size)
    row_hypers = {h: torch.cat([torch.full((n,), float(hp[h]), dtype=torch.float64, device=c0.device) for hp, n in zip(hypers, sizes)])
                  for h in hypers[0]}  # (sum N_p,)
    return dataclasses.replace(
        c0,
        client_ids=[i for c in ctxs for i in c.client_ids],
        counts=[n for c in ctxs for n in c.counts],
        malicious=torch.cat([c.malicious for c in ctxs]),
        weights=torch.cat([c.weights for c in ctxs]),
        row_params=row_params,
        row_hypers=row_hypers,
    )


def split_result(local: LocalResult, sizes: Sequence[int]) -> list[LocalResult]:
    """The stacked training result back per point: rows ``[lo, lo + N_p)`` of ``U`` and the losses."""
    out, lo = [], 0
    for n in sizes:
        out.append(dataclasses.replace(local, U=local.U[lo : lo + n], train_loss=local.train_loss[lo : lo + n]))
        lo += n
    return out


def run_lockstep(recs: Sequence[RunRecorder], train: Train) -> None:
    """Run the recorders' simulators to the end, training each round's cohorts together.

    Each pass takes the live runs at the lowest round (runs resumed from different checkpoints
    catch up first), begins their rounds, trains all cohorts with one ``train`` call on the
    stacked context, and finishes and records each run's round as ``RoundLoop.step`` and
    ``spfl run`` would. A run's wall time is its own round work plus an equal share of the
    stacked training.

    Args:
        recs: One recorder per point; the simulators share the data, model layout and seed.
        train: ``(ctx, transforms) -> LocalResult`` honouring ``ctx.row_params`` / ``row_hypers``.
    """
    while True:
        live = [r for r in recs if not r.sim.done]
        if not live:
            return
        r_min = min(r.sim.round for r in live)
        started = []
        for rec in (r for r in live if r.sim.round == r_min):
            t = time.perf_counter()
            start = rec.sim.begin_round()
            if start is None:  # a guard stopped this run before the round
                rec.record({"round": rec.sim.round + 1, "stopped": rec.sim.stopped})
                continue
            started.append((rec, start, time.perf_counter() - t))
        if not started:
            continue
        t = time.perf_counter()
        if len(started) == 1:
            rec, start, _ = started[0]
            locals_ = [rec.sim.trainer.train(start.ctx, rec.sim.pipeline.batch_transforms)]
        else:
            ctx = stack_contexts([s.ctx for _, s, _ in started], [hypers_of(r.sim) for r, _, _ in started])
            locals_ = split_result(train(ctx, ()), [s.ctx.num_clients for _, s, _ in started])
        share = (time.perf_counter() - t) / len(started)
        for (rec, start, begin_s), local in zip(started, locals_):
            start.t0 = time.perf_counter() - begin_s - share  # this run's round time: its own work + its share
            rec.record(rec.sim.finish_round(start, local))


def group_trainer(sims: Sequence[Simulator]) -> VmapTrainer | DPSGDTrainer:
    """The one vectorized trainer of a lockstep group, chunked for ``P x N`` rows.

    Built from the first point's config with the group's largest momentum and weight decay, so
    that structural choices (momentum buffers, the weight-decay term) hold for every row; the
    values themselves come from ``RoundContext.row_hypers``. Under DP-SGD it is a
    :class:`DPSGDTrainer` (each row's sigma and clip come from the rows too).
    """
    s0, cfg = sims[0], sims[0].cfg
    cfg = cfg.replace(momentum=max(s.cfg.momentum for s in sims), wd=max(s.cfg.wd for s in sims))
    if isinstance(s0.trainer, DPSGDTrainer):
        return DPSGDTrainer(s0.model, s0.spec, s0.packed, cfg.replace(dp_sigma=s0.trainer.sigma), s0.device)
    cfg = cfg.replace(strategy="vmap")
    rows = sum(s.cfg.client_num_per_round for s in sims)
    slots = 2 if cfg.client_optimizer == "adam" else int(cfg.momentum > 0)
    chunk = cfg.client_chunk or auto_chunk(s0.model, tuple(s0.packed.x.shape[1:]), cfg.batch_size, slots, s0.device, rows)
    return VmapTrainer(s0.model, s0.spec, s0.packed, cfg.replace(client_chunk=chunk), s0.device)


# ---- the sweep ------------------------------------------------------------------------------------
@dataclass
class Point:
    """One point of a sweep and, once run, its outcome."""

    index: int
    values: dict[str, Any]
    cfg: Config
    mode: str = ""  # "sequential" | "vectorized (group g)" once run
    status: str = "pending"  # "ok" | "diverged" | "stopped: ..." | "failed: ..." | "pending"
    summary: Optional[dict[str, Any]] = None

    @property
    def dir(self) -> Path:
        return Path(self.cfg.out)

    @property
    def label(self) -> str:
        return point_label(self.values)


def status_of(summary: dict[str, Any]) -> str:
    if summary.get("diverged"):
        return "diverged"
    return f"stopped: {summary['stopped']}" if summary.get("stopped") else "ok"


def check_sweep_dir(out: Path, spec: SweepSpec) -> dict[str, Any]:
    """``out/sweep.json`` if this sweep was started there before (empty dict if new); a one-line
    error when it holds a different sweep."""
    path = out / "sweep.json"
    if not path.is_file():
        if (out / "points").is_dir() and any((out / "points").iterdir()):
            raise SpflError(f"{out} holds points/ but no sweep.json; it is not a sweep directory this command can resume")
        return {}
    try:
        saved = json.loads(path.read_text())
        before = saved["spec"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SpflError(f"{path} is damaged ({type(e).__name__}); choose another --out") from None
    now = spec.to_dict()
    if before != now:
        diff = sorted({f"{s}.{k}" for s in SPEC_KEYS for k in set((before.get(s) or {})) | set((now.get(s) or {}))
                       if (before.get(s) or {}).get(k) != (now.get(s) or {}).get(k)})
        raise SpflError(f"{out} holds a different sweep ({', '.join(diff) or 'spec'} differ{'s' if len(diff) == 1 else ''}); "
                        f"rerun it with the same flags (or spfl sweep --resume {out}), or choose another --out")
    return saved


def load_sweep_spec(out: Path) -> SweepSpec:
    """The spec stored in a sweep directory (``spfl sweep --resume DIR``)."""
    path = Path(out) / "sweep.json"
    if not path.is_file():
        raise SpflError(f"{out} is not a sweep directory: {path} is missing")
    try:
        d = json.loads(path.read_text())["spec"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise SpflError(f"{path} is damaged ({type(e).__name__})") from None
    return SweepSpec.from_dict(d, where=str(path))


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    vectorize: str = "auto",
    log: Callable[[str], None] = print,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    train: Train | None = None,
) -> list[Point]:
    """Run every point of ``spec`` in this process, into the sweep directory ``out``.

    Args:
        spec: The sweep.
        out: The sweep directory (created; resumed when it holds this sweep).
        vectorize: ``auto`` trains points that differ only in :data:`VECTOR_FIELDS` together;
            ``off`` runs every point on its own.
        log: Receives the progress lines.
        on_round: ``(point index, round metrics)`` after each round of each point.
        train: The stacked trainer of lockstep groups (default :func:`group_trainer`'s; tests
            substitute a reference).

    Returns:
        The points with their mode, status and summary, in sweep order.
    """
    if vectorize not in ("auto", "off"):
        raise ConfigError(f"--vectorize must be auto or off, got {vectorize!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SpflError(f"--out {out} is a file; choose a directory path")
    points = [Point(i, v, c) for i, (v, c) in enumerate(zip(spec.points(), point_configs(spec, out)))]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpflError(f"cannot create sweep directory {out}: {e.strerror or e}") from None
    with RunLock(out, holder="spfl sweep"):
        saved = check_sweep_dir(out, spec)
        modes = {p.get("index"): p.get("mode", "") for p in saved.get("points", []) if isinstance(p, dict)}
        done = Progress(len(points), log)
        todo = []
        for p in points:
            p.summary = read_summary(p.dir)
            if p.summary is None:
                todo.append(p)
                continue
            p.mode, p.status = modes.get(p.index) or "sequential", status_of(p.summary)
            done(f"{p.label}: finished earlier, skipped (test_acc {fmt_acc(p.summary.get('final_test_acc'))})")
        write_sweep_files(out, spec, points, vectorize)
        plan = plan_points(todo, vectorize)
        n_vec = sum(len(g) for g in plan if len(g) > 1)
        log(f"spfl sweep: {len(points)} points, {len(todo)} to run ({n_vec} in {sum(len(g) > 1 for g in plan)} vectorized "
            f"group(s)) -> {out}")
        datasets: dict[tuple[Any, ...], Dataset] = {}  # loaded once per data setting, dropped after its last group
        last_use = {data_key(g[0].cfg): gi for gi, g in enumerate(plan)}
        groups_run = 0
        for gi, group in enumerate(plan):
            key = data_key(group[0].cfg)
            try:
                if key not in datasets:
                    c = group[0].cfg
                    datasets[key] = load_dataset(c.dataset, c.data_dir, c.download, synthetic_train=c.synthetic_train,
                                                 synthetic_test=c.synthetic_test)
            except SpflError as e:
                for p in group:
                    p.status, p.mode = f"failed: {e}", "sequential"
                    done(f"{p.label} -> {p.status}")
                write_sweep_files(out, spec, points, vectorize)
                continue
            if len(group) > 1 and run_group(group, datasets[key], groups_run + 1, log, on_round, train):
                groups_run += 1
                others = f"vectorized with {len(group) - 1} other" + "s" * (len(group) > 2)
                for p in group:
                    done(f"{p.label} -> {result_line(p, others)}")
            else:
                for p in group:
                    run_point(p, datasets[key], log, on_round)
                    done(f"{p.label} -> {result_line(p)}")
                    write_sweep_files(out, spec, points, vectorize)
            write_sweep_files(out, spec, points, vectorize)
            if last_use[key] == gi:
                del datasets[key]
        plot_sweep(out, spec, points)
    return points


class Progress:
    """Prints ``[k/K] <line>`` as points finish (or are skipped)."""

    def __init__(self, total: int, log: Callable[[str], None]) -> None:
        self.total, self.count, self.log = total, 0, log

    def __call__(self, line: str) -> None:
        self.count += 1
        self.log(f"[{self.count}/{self.total}] {line}")


def fmt_acc(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "-"


def result_line(p: Point, note: str = "") -> str:
    """``test_acc 0.8123 (12.3 s)``, with the point's status when not ok and ``note``."""
    s = p.summary or {}
    if p.status.startswith("failed"):
        return p.status
    extra = "".join(f", {x}" for x in (p.status if p.status != "ok" else "", note) if x)
    return f"test_acc {fmt_acc(s.get('final_test_acc'))} ({s.get('wall_s', 0.0):.1f} s{extra})"


def plan_points(todo: list[Point], vectorize: str) -> list[list[Point]]:
    """Groups to run, in sweep order within each dataset: lockstep candidates (two or more points
    equal up to :data:`VECTOR_FIELDS`, with no :func:`lockstep_blockers`) and single points."""
    first_of_data: dict[tuple[Any, ...], int] = {}
    for p in todo:
        first_of_data.setdefault(data_key(p.cfg), p.index)
    ordered = sorted(todo, key=lambda p: (first_of_data[data_key(p.cfg)], p.index))
    if vectorize == "off":
        return [[p] for p in ordered]
    groups: dict[str, list[Point]] = {}
    for p in ordered:
        groups.setdefault(group_key(p.cfg), []).append(p)
    plan, placed = [], set()
    for p in ordered:
        if p.index in placed:
            continue
        g = groups[group_key(p.cfg)]
        if len(g) > 1 and not lockstep_blockers(p.cfg):
            plan.append(g)
            placed.update(q.index for q in g)
        else:
            plan.append([p])
            placed.add(p.index)
    return plan


def quiet(log: Callable[[str], None], label: str) -> Callable[[str], None]:
    """A point's runner lines, only those that matter in a sweep (warnings, stops, resumes)."""
    def out(line: str) -> None:
        if line.startswith(("warning", "stopped", "resuming")):
            log(f"  {label}: {line}")
    return out


def prepare_point(p: Point) -> Path | None:
    """The point's run directory to resume from (its checkpoint), or None for a fresh start; a
    point killed before its first checkpoint is cleared and started again."""
    state = point_state(p.dir)
    if state == "checkpoint":
        return p.dir
    if state == "partial":
        shutil.rmtree(p.dir)
    return None


def run_point(p: Point, data: Dataset, log: Callable[[str], None], on_round) -> None:
    """One point on its own, through ``runner.run`` (exactly ``spfl run``'s run directory)."""
    p.mode = "sequential"
    try:
        hist = run(p.cfg, data, resume_dir=prepare_point(p), log=quiet(log, p.label),
                   on_round=None if on_round is None else (lambda m: on_round(p.index, m)))
    except SpflError as e:
        p.status = f"failed: {e}"
        return
    p.summary = hist.summary
    p.status = status_of(p.summary)


def run_group(group: list[Point], data: Dataset, group_no: int, log: Callable[[str], None], on_round,
              train: Train | None) -> bool:
    """A lockstep group; False (nothing written) when it must run point by point instead."""
    cfgs = [p.cfg.replace(progress=False) for p in group]  # one progress line per point, not P bars
    leader = Simulator(cfgs[0], data)
    why = trainer_blockers(leader)
    if not why:
        sims = [leader] + [Simulator(c, data) for c in cfgs[1:]]
        train = train or group_trainer(sims).train
    if why:
        log(f"note: {', '.join(p.label for p in group)} run one after another: {'; '.join(why)}")
        return False
    with ExitStack() as stack:
        recs = []
        for p, cfg, sim in zip(group, cfgs, sims):
            resume = prepare_point(p)
            out, checkpoint = stack.enter_context(open_run_dir(cfg, resume))
            cb = None if on_round is None else (lambda m, i=p.index: on_round(i, m))
            recs.append(RunRecorder(sim, out, checkpoint, cb, quiet(log, p.label)))
        run_lockstep(recs, train)
        for p, rec in zip(group, recs):
            p.summary = rec.close().summary
            p.status, p.mode = status_of(p.summary), f"vectorized (group {group_no})"
    return True


# ---- outputs ------------------------------------------------------------------------------------
def table_rows(spec: SweepSpec, points: Sequence[Point]) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and rows of ``sweep.csv`` / ``sweep.md``."""
    summaries = [p.summary or {} for p in points]
    extra = [k for k in ("asr", "asr_all", "epsilon") if any(s.get(k) is not None for s in summaries)]
    cols = ["point", *spec.swept, "final_test_acc", "best_test_acc", "final_test_loss", *extra, "rounds", "wall_s", "mode",
            "status", "dir"]
    rows = []
    for p, s in zip(points, summaries):
        row = {"point": p.index, **p.values, "final_test_acc": s.get("final_test_acc"), "best_test_acc": s.get("best_test_acc"),
               "final_test_loss": s.get("final_test_loss"), **{k: s.get(k) for k in extra}, "rounds": s.get("rounds"),
               "wall_s": round(s["wall_s"], 2) if isinstance(s.get("wall_s"), (int, float)) else None, "mode": p.mode,
               "status": p.status, "dir": str(Path("points") / p.dir.name)}
        rows.append(row)
    return cols, rows


def write_sweep_files(out: Path, spec: SweepSpec, points: Sequence[Point], vectorize: str) -> None:
    """``sweep.json`` (spec, points, modes), ``sweep.csv`` and ``sweep.md``, rewritten atomically."""
    write_json_atomic(out / "sweep.json", {
        "spec": spec.to_dict(), "version": __version__, "vectorize": vectorize,
        "points": [{"index": p.index, "values": p.values, "dir": str(Path("points") / p.dir.name), "mode": p.mode}
                   for p in points],
    })
    cols, rows = table_rows(spec, points)
    tmp = out / "sweep.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in cols})
    tmp.replace(out / "sweep.csv")

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v).replace("|", "\\|")

    md_cols = [c for c in cols if c != "dir"]
    lines = [f"# Sweep ({len(points)} points)", "", "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in md_cols) + " |" for r in rows]
    best = max((r for r in rows if isinstance(r["final_test_acc"], (int, float))), key=lambda r: r["final_test_acc"], default=None)
    if best is not None:
        lines += ["", f"Best final test accuracy: {best['final_test_acc']:.4f} at "
                  + (point_label({k: best[k] for k in spec.swept}) + f" ({best['dir']})")]
    tmp = out / "sweep.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "sweep.md")


def log_scale(name: str, values: list[Any], spec: SweepSpec) -> bool:
    """Log x for learning-rate-like flags: a log range, a name ending in ``lr``, or positive
    values spanning a decade or more."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) != len(values) or not nums or min(nums) <= 0:
        return False
    r = spec.ranges.get(name)
    return bool((r is not None and r.log) or name.endswith("lr") or max(nums) / min(nums) >= 10)


def plot_sweep(out: Path, spec: SweepSpec, points: Sequence[Point]) -> None:
    """``final_vs_<flag>.png`` per swept flag and ``curves.png`` (test accuracy per round per point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in points if p.summary and p.summary.get("final_test_acc") is not None]
    if not done:
        return
    for name in spec.swept:
        xs = [p.values[name] for p in done]
        ys = [p.summary["final_test_acc"] for p in done]
        fig, ax = plt.subplots(figsize=(5, 3.6))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        if numeric:
            ax.scatter(xs, ys, s=18)
            if log_scale(name, xs, spec):
                ax.set_xscale("log")
        else:  # categorical values, in sweep order
            cats = list(dict.fromkeys(map(str, xs)))
            ax.scatter([cats.index(str(x)) for x in xs], ys, s=18)
            ax.set_xticks(range(len(cats)), cats, rotation=30 if len(cats) > 4 else 0)
        ax.set_xlabel(name)
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / f"final_vs_{name}.png", dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for p in done:
        rows = read_rows(p.dir)
        ax.plot([r["round"] for r in rows], [r["test_acc"] for r in rows], marker="o", ms=2, lw=1, label=p.label)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    if len(done) <= 12:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
