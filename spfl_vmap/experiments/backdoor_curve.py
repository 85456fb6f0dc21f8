"""Backdoor success against the norm bound (``spfl backdoor-curve``): one run per (bound, noise).

Sun, Kairouz, Suresh and McMahan, "Can You Really Backdoor Federated Learning?" (2019), defend
against backdoors by clipping every client update to an L2 norm bound ``M`` ("norm bounding")
and adding Gaussian noise of std ``sigma`` to the aggregate ("weak differential privacy"); their
figures show the attack success rate and the main-task accuracy as ``M`` and ``sigma`` vary. This
sweep draws the same curves for the configured backdoor attack: each point is a full run with
``--bd_defense norm_bound --bd_clip M --bd_noise sigma`` (stages
:class:`~spfl_vmap.modules.backdoor.NormBound` and
:class:`~spfl_vmap.modules.backdoor.AggregateNoise`), next to an undefended baseline run of the
same configuration. The dataset is loaded once and shared by all runs.

Outputs in ``out``: ``curve.csv`` (one row per run), ``curve.md`` (``acc / asr`` by bound and
noise), ``curve.png`` (ASR and accuracy against the bound, one line per noise level; with more
than one noise level, a second panel against the noise, one line per bound), and each run's
directory under ``runs/``.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any

from ..config import Config, need
from ..data import load_dataset
from .matrix import asr_columns
from ..modules.backdoor import backdoor_on, defense, num_malicious
from ..runner import run

NO_DEFENSE = "inf"  # the bound column of the undefended baseline


def curve_configs(base: Config, bounds: list[float], noises: list[float], out: Path) -> list[tuple[float | str, float, Config]]:
    """``(bound, noise, config)`` of every run, the undefended baseline first, then bounds x noises
    in increasing order; every config is validated here, before any training.

    Args:
        base: a configuration with a backdoor attack (``--bd_attack``) and no backdoor defense.
        bounds: norm bounds ``M > 0`` (L2 norm of a whole client update).
        noises: std ``sigma >= 0`` of the Gaussian noise on the aggregate.
        out: the sweep directory; runs go to ``out/runs/``.
    """
    need(backdoor_on(base), "backdoor-curve needs a backdoor attack: add --bd_attack badnets or dba")
    need(defense(base) == "none", "backdoor-curve sets --bd_defense norm_bound itself: drop --bd_defense / --backdoor_defense")
    need(bool(bounds), "--bounds needs at least one norm bound")
    need(bool(noises), "--noises needs at least one noise level")
    need(all(math.isfinite(b) and b > 0 for b in bounds), f"--bounds must be finite numbers > 0, got {bounds}")
    need(all(math.isfinite(s) and s >= 0 for s in noises), f"--noises must be finite numbers >= 0, got {noises}")
    runs: list[tuple[float | str, float, Config]] = [
        (NO_DEFENSE, 0.0, base.replace(out=str(out / "runs" / "no_defense"), progress=False))]
    for b in sorted(set(bounds)):
        for s in sorted(set(noises)):
            runs.append((b, s, base.replace(bd_defense="norm_bound", bd_clip=b, bd_noise=s,
                                            out=str(out / "runs" / f"bound_{b:g}__noise_{s:g}"), progress=False)))
    return runs


def backdoor_curve(base: Config, bounds: list[float], noises: list[float], out: Path, log=print) -> list[dict[str, Any]]:
    """Run every point of :func:`curve_configs`; one row per run.

    Row columns: ``bound`` (``"inf"`` for the undefended baseline), ``noise``, ``final_test_acc``,
    ``best_test_acc``, ``final_asr`` and ``final_asr_all`` (the run summary's), ``max_asr`` (over
    the evaluations), ``seconds``.
    """
    runs = curve_configs(base, bounds, noises, out)
    data = load_dataset(base.dataset, base.data_dir, base.download,
                        synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    rows = []
    for bound, noise, cfg in runs:
        t0 = time.perf_counter()
        hist = run(cfg, data)
        rows.append({"bound": bound, "noise": noise, "final_test_acc": hist.final["test_acc"],
                     "best_test_acc": max(hist.column("test_acc")), **asr_columns(hist),
                     "seconds": round(time.perf_counter() - t0, 2)})
        r = rows[-1]
        what = "no defense" if bound == NO_DEFENSE else f"bound {bound:g}, noise {noise:g}"
        log(f"{what}: test_acc {r['final_test_acc']:.4f}, asr {r['final_asr']:.4f}  ({r['seconds']} s)")
    return rows


def title_of(base: Config) -> str:
    return (f"{base.dataset} {base.model}, {base.bd_attack}, {num_malicious(base)} malicious of {base.client_num_in_total}, "
            f"{base.comm_round} rounds: norm bound + weak DP (Sun et al. 2019)")


def write_curve(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """``curve.csv``, ``curve.md`` and ``curve.png`` in ``out``."""
    with open(out / "curve.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    base, points = split_rows(rows)
    bounds = sorted({r["bound"] for r in points})
    noises = sorted({r["noise"] for r in points})
    cell = {(r["bound"], r["noise"]): r for r in points}
    lines = [f"Final test accuracy / final attack success rate (asr): {title}", "",
             "| bound \\ noise | " + " | ".join(f"{s:g}" for s in noises) + " |", "|---|" + "---|" * len(noises)]
    lines += [f"| {b:g} | " + " | ".join(f"{cell[(b, s)]['final_test_acc']:.3f} / {cell[(b, s)]['final_asr']:.3f}"
                                         for s in noises) + " |" for b in bounds]
    if base is not None:
        lines += ["", f"No defense: {base['final_test_acc']:.3f} / {base['final_asr']:.3f}"]
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    plot_curve(rows, out / "curve.png", title)


def split_rows(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The undefended baseline row (or None) and the norm-bound rows."""
    base = next((r for r in rows if r["bound"] == NO_DEFENSE), None)
    return base, [r for r in rows if r["bound"] != NO_DEFENSE]


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """ASR (solid) and accuracy (dashed) against the bound, one colour per noise level; with
    several noise levels, a second panel against the noise, one colour per bound. The
    undefended baseline is a grey horizontal pair of lines in each panel."""
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base, points = split_rows(rows)
    bounds = sorted({r["bound"] for r in points})
    noises = sorted({r["noise"] for r in points})
    panels = [("bound", "noise", bounds, noises, "norm bound M (L2 of a client update)")]
    if len(noises) > 1:
        panels.append(("noise", "bound", noises, bounds, "noise std on the aggregate (weak DP)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (x_key, line_key, xs, levels, xlabel) in zip(axes[0], panels):
        for i, level in enumerate(levels):
            line = sorted((r for r in points if r[line_key] == level), key=lambda r: r[x_key])
            x = [r[x_key] for r in line]
            ax.plot(x, [r["final_asr"] for r in line], marker="o", color=f"C{i}", label=f"asr, {line_key} {level:g}")
            ax.plot(x, [r["final_test_acc"] for r in line], marker="s", ls="--", color=f"C{i}", label=f"acc, {line_key} {level:g}")
        if base is not None:
            ax.axhline(base["final_asr"], color="gray", label="asr, no defense")
            ax.axhline(base["final_test_acc"], color="gray", ls="--", label="acc, no defense")
        if x_key == "bound":
            ax.set_xscale("log", base=2)
        elif min(xs) == 0 and len(xs) > 1:
            ax.set_xscale("symlog", linthresh=xs[1])  # the noise levels include 0
        elif min(xs) > 0:
            ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final attack success rate / test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
