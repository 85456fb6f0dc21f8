"""Privacy-utility curves (``spfl privacy-curve``): accuracy vs epsilon, one calibrated run per target epsilon.

For each epsilon the noise multiplier is calibrated before training (``--target_epsilon``),
the run is trained to completion, and its final accuracy and spent epsilon are recorded,
next to a non-private baseline run of the same configuration. Writes ``privacy_curve.csv`` and
``privacy_curve.png`` in ``--out``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from ..data import load_dataset
from ..runner import run


def privacy_curve(base, epsilons: list[float], out: Path, log=print) -> list[dict[str, Any]]:
    data = load_dataset(base.dataset, base.data_dir, base.download,
                        synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    rows = []
    plain_cfg = base.replace(dp_mode="none", differential_privacy=False, dp_sigma=None, target_epsilon=None, dp_delta=None,
                             dp_adaptive_clip=False, dp_epsilon_json=False, grad_norm=1.0,
                             out=str(out / "runs" / "non_private"), progress=False)
    plain = run(plain_cfg, data)
    rows.append({"target_epsilon": "inf", "noise_multiplier": 0.0, "epsilon": "inf", "final_test_acc": plain.final["test_acc"],
                 "best_test_acc": max(plain.column("test_acc"))})
    log(f"non-private: test_acc {plain.final['test_acc']:.4f}")
    for eps in epsilons:
        cfg = base.replace(target_epsilon=eps, dp_sigma=None, out=str(out / "runs" / f"eps_{eps:g}"), progress=False)
        hist = run(cfg, data)
        s = hist.summary
        spent = s.get("epsilon", s.get("eps_max"))
        rows.append({"target_epsilon": eps, "noise_multiplier": s["privacy"]["noise_multiplier"], "epsilon": spent,
                     "final_test_acc": hist.final["test_acc"], "best_test_acc": max(hist.column("test_acc"))})
        log(f"epsilon {eps:g}: sigma {s['privacy']['noise_multiplier']:.3f}, spent {spent:.3f}, test_acc {hist.final['test_acc']:.4f}")
    return rows


def write_curve(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """``privacy_curve.csv`` and ``privacy_curve.png`` in ``out``."""
    with open(out / "privacy_curve.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_curve(rows, out / "privacy_curve.png", title)


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib  # heavy: imported when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dp = [r for r in rows if r["target_epsilon"] != "inf"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["target_epsilon"] for r in dp], [r["final_test_acc"] for r in dp], marker="o", label="DP")
    ax.axhline(rows[0]["final_test_acc"], ls="--", color="gray", label="non-private")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epsilon")
    ax.set_ylabel("final test accuracy")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
