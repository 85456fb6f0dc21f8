"""The attack x defense matrix (``spfl matrix``): every pair on one configuration.

The dataset is loaded once and shared by all runs (partition and packing are cheap and
depend only on the seed); each pair is a full run with its own aggregator and attack.
Outputs in ``--out``: ``matrix.csv`` (one row per pair), ``matrix.md`` (final test accuracy
table), ``matrix.png`` (heatmap), and each pair's run directory under ``runs/``.

Backdoors share the axes under the prefix ``bd:``. An attack ``bd:NAME`` is ``--bd_attack NAME``
(``bd:badnets``, ``bd:dba``; the Byzantine attack is then ``none``); a defense ``bd:NAME`` is the
backdoor defense stage ``--bd_defense NAME`` (``bd:norm_bound``, ``bd:toolkit_clip_noise``, with
``--bd_clip`` / ``--bd_noise``) in front of the aggregator ``--by_defense`` (default ``mean``).
Plain names are Byzantine attacks and registered aggregators, as before. A matrix with a
backdoor attack adds the attack success rate (``asr``, ``asr_all``; see
:class:`~spfl_vmap.modules.backdoor.AttackSuccess`) to the CSV, an ``acc / asr`` cell to the
Markdown table and an ASR panel to the heatmap; a matrix without one writes exactly what it
always did.
"""

from __future__ import annotations

import csv
import inspect
import math
import time
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..aggregators import AGGREGATORS
from ..attacks import ATTACKS
from ..config import ENGINE_KWARGS, Config, need, parse_params
from ..data import load_dataset
from ..errors import ConfigError, SpflError
from ..modules.backdoor import BD_ATTACKS, BD_DEFENSES
from ..runner import run

BD = "bd:"  # prefix of the backdoor attacks and defense stages on the matrix axes
# Config fields that only a backdoor attack takes (the backdoor section refuses them without one):
# back to their defaults in the rows without a backdoor attack, so that a `none` baseline next to
# `bd:badnets --bd_boost 10` stays a valid run. tests/test_backdoor_experiments.py checks they are fields.
ATTACK_ONLY = ("bd_attack", "bd_boost", "bd_boost_auto", "bd_source", "bd_project", "bd_neurotoxin", "bd_schedule",
               "backdoor_test", "backdoor_test_frequency", "backdoor_test_boost")
ASR_COLUMNS = ("final_asr", "final_asr_all", "max_asr")


def params_for(registry, name: str, params: dict[str, Any]) -> str:
    """The subset of ``params`` that ``name`` accepts, as a ``k=v`` string."""
    accepted = set(inspect.signature(registry.get(name)).parameters) - ENGINE_KWARGS
    return ",".join(f"{k}={v}" for k, v in params.items() if k in accepted)


def split_params(registry, names: list[str], text: str, flag: str) -> dict[str, str]:
    """Per-name parameter strings; a key that no listed function accepts is an error."""
    params = parse_params(text)
    per = {n: params_for(registry, n, params) for n in names}
    for k in params:
        if not any(k in dict(kv.split("=", 1) for kv in per[n].split(",") if kv) for n in names):
            raise ConfigError(f"{flag}: none of {', '.join(names)} takes a hyperparameter {k!r}")
    return per


def backdoor_name(name: str) -> str | None:
    """``"badnets"`` for the axis entry ``"bd:badnets"``; None for a Byzantine attack or an aggregator."""
    return name[len(BD):] if name.startswith(BD) else None


def attack_names() -> list[str]:
    """Every valid ``--attacks`` entry: the registered Byzantine attacks, then ``bd:`` + each backdoor attack."""
    return ATTACKS.names() + [BD + a for a in BD_ATTACKS if a != "none"]


def defense_names() -> list[str]:
    """Every valid ``--defenses`` entry: the registered aggregators, then ``bd:`` + each backdoor defense stage."""
    return AGGREGATORS.names() + [BD + d for d in BD_DEFENSES if d != "none"]


def check_axes(attacks: list[str], defenses: list[str]) -> None:
    """One-line :class:`ConfigError` for an unknown or repeated name, listing the valid ones."""
    for flag, names, valid in (("--attacks", attacks, attack_names()), ("--defenses", defenses, defense_names())):
        for n in names:
            need(n in valid, f"{flag}: unknown name {n!r}; choose one of: {', '.join(valid)}")
        need(len(set(names)) == len(names), f"{flag}: {', '.join(sorted({n for n in names if names.count(n) > 1}))} listed twice")
    need(bool(attacks) and bool(defenses), "--attacks and --defenses need at least one name each")


def attack_off() -> dict[str, Any]:
    """The :data:`ATTACK_ONLY` fields at their defaults: a row without a backdoor attack."""
    return {f.name: f.default for f in fields(Config) if f.name in ATTACK_ONLY and f.default is not MISSING}


def run_dir_name(attack: str, defense: str) -> str:
    return f"{attack}__{defense}".replace(":", "-")


def cell_config(base: Config, attack: str, defense: str, out: Path, attack_params: dict[str, str] | None = None,
                defense_params: dict[str, str] | None = None) -> Config:
    """The configuration of one cell of the matrix (validated: a refused pair raises ConfigError).

    Args:
        base: the shared configuration; its ``--bd_clip`` / ``--bd_noise`` bound the ``bd:`` defense
            stages, its ``--by_defense`` is the aggregator behind them.
        attack: a Byzantine attack name or ``bd:`` + a backdoor attack.
        defense: an aggregator name or ``bd:`` + a backdoor defense stage.
        out: the matrix directory; the run goes to ``out/runs/<attack>__<defense>``.
        attack_params, defense_params: per-name hyperparameter strings (:func:`split_params`).
    """
    bd_attack, bd_defense = backdoor_name(attack), backdoor_name(defense)
    aggregator = base.by_defense if bd_defense else defense
    changes: dict[str, Any] = {
        "by_attack": "none" if bd_attack else attack,
        "by_attack_params": "" if bd_attack else (attack_params or {}).get(attack, ""),
        "by_defense": aggregator,
        "by_defense_params": (defense_params or {}).get(aggregator, ""),
        "out": str(out / "runs" / run_dir_name(attack, defense)),
        "progress": False,
    }
    changes.update({"bd_attack": bd_attack} if bd_attack else attack_off())
    if bd_defense:
        changes["bd_defense"] = bd_defense
    return base.replace(**changes)


def asr_columns(hist: Any) -> dict[str, float]:
    """:data:`ASR_COLUMNS` of a backdoor run's :class:`~spfl_vmap.engine.simulator.History`: the
    summary's final ``asr`` and ``asr_all``, and the highest ``asr`` of any evaluation (an ``asr``
    of nan, a test set without an eligible image, is skipped; nan if every one is)."""
    asr = [v for v in hist.column("asr") if v is not None and math.isfinite(v)]
    return {"final_asr": hist.summary["asr"], "final_asr_all": hist.summary["asr_all"], "max_asr": max(asr) if asr else float("nan")}


def run_matrix(base, attacks: list[str], defenses: list[str], out: Path, log=print,
               attack_params: dict[str, str] | None = None, defense_params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Run every (attack, defense) cell; one result row per cell, a refused or failed cell as ``error``.

    Rows of a matrix with a ``bd:`` attack also carry :data:`ASR_COLUMNS`: the run's final ``asr``
    and ``asr_all`` (the summary's) and the highest ``asr`` of any evaluation (empty for a row
    without a backdoor attack).
    """
    check_axes(attacks, defenses)
    with_asr = any(backdoor_name(a) for a in attacks)
    data = load_dataset(base.dataset, base.data_dir, base.download,
                        synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    rows: list[dict[str, Any]] = []
    for a in attacks:
        for d in defenses:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"attack": a, "defense": d, "final_test_acc": "", "best_test_acc": "", "final_test_loss": "",
                                   "mean_malicious_selected": "", **({k: "" for k in ASR_COLUMNS} if with_asr else {}), "error": ""}
            try:
                hist = run(cell_config(base, a, d, out, attack_params, defense_params), data)
                sel = [r["malicious_selected"] for r in hist.rows if "malicious_selected" in r]
                row.update(final_test_acc=hist.final["test_acc"], best_test_acc=max(hist.column("test_acc")),
                           final_test_loss=hist.final["test_loss"],
                           mean_malicious_selected=(sum(sel) / len(sel)) if sel else "")
                if with_asr and "asr" in hist.summary:
                    row.update(asr_columns(hist))
            except SpflError as e:
                row["error"] = str(e)
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            acc = f"{row['final_test_acc']:.4f}" if row["final_test_acc"] != "" else f"n/a ({row['error'][:60]})"
            asr_txt = f"  asr {row['final_asr']:.4f}" if row.get("final_asr", "") != "" else ""
            log(f"{a:>12} x {d:<18} test_acc {acc}{asr_txt}  ({row['seconds']} s)")
    return rows


def write_outputs(rows: list[dict[str, Any]], attacks: list[str], defenses: list[str], out: Path, title: str) -> None:
    """``matrix.csv``, ``matrix.md`` and ``matrix.png`` in ``out``; with ASR columns (a backdoor
    matrix) the table cells read ``acc / asr`` and the heatmap gets an ASR panel."""
    with open(out / "matrix.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cell = {(r["attack"], r["defense"]): r for r in rows}
    with_asr = "final_asr" in rows[0]

    def fmt(r: dict[str, Any]) -> str:
        if r["final_test_acc"] == "":
            return "n/a"
        acc = f"{r['final_test_acc']:.3f}"
        if not with_asr or not backdoor_name(r["attack"]):
            return acc
        return acc + " / " + (f"{r['final_asr']:.3f}" if r["final_asr"] != "" else "-")

    head = ("Final test accuracy / final attack success rate (asr; a row without a backdoor attack: accuracy only)"
            if with_asr else "Final test accuracy")
    lines = [f"{head}: {title}", "", "| attack \\ defense | " + " | ".join(defenses) + " |",
             "|---|" + "---|" * len(defenses)]
    lines += [f"| {a} | " + " | ".join(fmt(cell[(a, d)]) for d in defenses) + " |" for a in attacks]
    errs = [r for r in rows if r["error"]]
    if errs:
        lines += ["", "n/a: " + "; ".join(f"{r['attack']} x {r['defense']}: {r['error']}" for r in errs)]
    (out / "matrix.md").write_text("\n".join(lines) + "\n")

    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def grid(key: str) -> np.ndarray:
        """``(attacks, defenses)`` values of ``key``; NaN where a cell has none."""
        return np.array([[cell[(a, d)][key] if cell[(a, d)][key] != "" else np.nan for d in defenses] for a in attacks], dtype=float)

    panels = [(grid("final_test_acc"), "final test accuracy", "viridis")]
    if with_asr:
        panels.append((grid("final_asr"), "final attack success rate (asr)", "Reds"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * (1.1 * len(defenses) + 2.5), 0.55 * len(attacks) + 1.8),
                             squeeze=False)
    missing = [["n/a" if cell[(a, d)]["error"] else "-" for d in defenses] for a in attacks]  # text of a NaN cell
    for ax, (M, label, cmap) in zip(axes[0], panels):
        heatmap(ax, M, attacks, defenses, label, cmap, missing)
        ax.set_title(title if len(panels) == 1 else f"{label}\n{title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)


def heatmap(ax: Any, M: np.ndarray, attacks: list[str], defenses: list[str], label: str, cmap: str,
            missing: list[list[str]]) -> None:
    """``M (attacks, defenses)`` in [0, 1] as an annotated heatmap on ``ax``; a NaN cell reads
    ``missing[i][j]`` (n/a for a failed run, - for a value the run does not have)."""
    im = ax.imshow(M, vmin=0, vmax=1, cmap=cmap)
    ax.set_xticks(range(len(defenses)), defenses, rotation=35, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    dark = (lambda v: v < 0.6) if cmap == "viridis" else (lambda v: v > 0.6)  # cells whose colour needs white text
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            ax.text(j, i, missing[i][j] if np.isnan(M[i, j]) else f"{M[i, j]:.2f}", ha="center", va="center",
                    color="gray" if np.isnan(M[i, j]) else "white" if dark(M[i, j]) else "black", fontsize=8)
    ax.figure.colorbar(im, ax=ax, label=label)
