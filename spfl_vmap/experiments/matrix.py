"""The attack x defense matrix (``spfl matrix``): every pair on one configuration.

The dataset is loaded once and shared by all runs (partition and packing are cheap and
depend only on the seed); each pair is a full run with its own aggregator and attack.
Outputs in ``--out``: ``matrix.csv`` (one row per pair), ``matrix.md`` (final test accuracy
table), ``matrix.png`` (heatmap), and each pair's run directory under ``runs/``.
"""

from __future__ import annotations

import csv
import inspect
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ENGINE_KWARGS, parse_params
from ..data import load_dataset
from ..errors import ConfigError, SpflError
from ..runner import run


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


def run_matrix(base, attacks: list[str], defenses: list[str], out: Path, log=print,
               attack_params: dict[str, str] | None = None, defense_params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    data = load_dataset(base.dataset, base.data_dir, base.download,
                        synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    rows: list[dict[str, Any]] = []
    for a in attacks:
        for d in defenses:
            t0 = time.perf_counter()
            row: dict[str, Any] = {"attack": a, "defense": d}
            try:
                cfg = base.replace(by_attack=a, by_defense=d, by_attack_params=(attack_params or {}).get(a, ""),
                                   by_defense_params=(defense_params or {}).get(d, ""), out=str(out / "runs" / f"{a}__{d}"), progress=False)
                hist = run(cfg, data)
                sel = [r["malicious_selected"] for r in hist.rows if "malicious_selected" in r]
                row.update(final_test_acc=hist.final["test_acc"], best_test_acc=max(hist.column("test_acc")),
                           final_test_loss=hist.final["test_loss"],
                           mean_malicious_selected=(sum(sel) / len(sel)) if sel else "", error="")
            except SpflError as e:
                row.update(final_test_acc="", best_test_acc="", final_test_loss="", mean_malicious_selected="", error=str(e))
            row["seconds"] = round(time.perf_counter() - t0, 2)
            rows.append(row)
            acc = f"{row['final_test_acc']:.4f}" if row["final_test_acc"] != "" else f"n/a ({row['error'][:60]})"
            log(f"{a:>12} x {d:<18} test_acc {acc}  ({row['seconds']} s)")
    return rows


def write_outputs(rows: list[dict[str, Any]], attacks: list[str], defenses: list[str], out: Path, title: str) -> None:
    with open(out / "matrix.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cell = {(r["attack"], r["defense"]): r for r in rows}

    def fmt(r: dict[str, Any]) -> str:
        return f"{r['final_test_acc']:.3f}" if r["final_test_acc"] != "" else "n/a"

    lines = [f"Final test accuracy: {title}", "", "| attack \\ defense | " + " | ".join(defenses) + " |",
             "|---|" + "---|" * len(defenses)]
    lines += [f"| {a} | " + " | ".join(fmt(cell[(a, d)]) for d in defenses) + " |" for a in attacks]
    errs = [r for r in rows if r["error"]]
    if errs:
        lines += ["", "n/a: " + "; ".join(f"{r['attack']} x {r['defense']}: {r['error']}" for r in errs)]
    (out / "matrix.md").write_text("\n".join(lines) + "\n")

    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.array([[cell[(a, d)]["final_test_acc"] if cell[(a, d)]["final_test_acc"] != "" else np.nan for d in defenses] for a in attacks])
    fig, ax = plt.subplots(figsize=(1.1 * len(defenses) + 2.5, 0.55 * len(attacks) + 1.8))
    im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(defenses)), defenses, rotation=35, ha="right")
    ax.set_yticks(range(len(attacks)), attacks)
    for i in range(len(attacks)):
        for j in range(len(defenses)):
            ax.text(j, i, "n/a" if np.isnan(M[i, j]) else f"{M[i, j]:.2f}", ha="center", va="center",
                    color="white" if np.isnan(M[i, j]) or M[i, j] < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="final test accuracy")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "matrix.png", dpi=110)
    plt.close(fig)
