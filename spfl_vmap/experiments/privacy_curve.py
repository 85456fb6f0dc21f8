"""``spfl privacy-curve``: accuracy vs epsilon, one calibrated run per target epsilon.

For each epsilon the noise multiplier is calibrated before training (``--target_epsilon``),
the run is trained to completion, and its final accuracy and spent epsilon are recorded,
next to a non-private baseline run of the same configuration. Writes ``privacy_curve.csv`` and
``privacy_curve.png`` in ``--out``.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import Any, Sequence

from ..cli import OneLineParser, add_config_flags, config_from_args, print_table, register_command
from ..data import load_dataset
from ..errors import ConfigError


def privacy_curve(base, epsilons: list[float], out: Path, log=print) -> list[dict[str, Any]]:
    from ..engine.runner import run

    data = load_dataset(base.dataset, base.data_dir, base.download,
                        synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    rows = []
    plain = run(base.replace(dp_mode="none", differential_privacy=False, out=str(out / "runs" / "non_private"), progress=False), data)
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


def plot_curve(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

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


@register_command("privacy-curve", "accuracy vs epsilon: one calibrated run per epsilon (CSV + PNG)")
def cmd_privacy_curve(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl privacy-curve", description="Train at each target epsilon and plot accuracy vs epsilon.")
    p.add_argument("--epsilons", required=True, help="comma-separated target epsilons, e.g. 0.5,1,2,4,8")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)
    try:
        epsilons = [float(e) for e in ns.epsilons.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers, got {ns.epsilons!r}") from None
    if not epsilons or any(not (math.isfinite(e) and e > 0) for e in epsilons):
        raise ConfigError("--epsilons must be positive numbers")
    base = config_from_args(ns)
    if base.effective_dp_mode == "none":
        raise ConfigError("privacy-curve needs --dp_mode example, user or local")
    out = Path(base.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-privacy-curve")
    out.mkdir(parents=True, exist_ok=True)
    rows = privacy_curve(base, sorted(epsilons), out)
    with open(out / "privacy_curve.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    title = f"{base.dataset} {base.model}, dp_mode {base.effective_dp_mode}, {base.comm_round} rounds"
    plot_curve(rows, out / "privacy_curve.png", title)
    print_table([(f"eps {r['target_epsilon']}", f"acc {r['final_test_acc']:.4f}  sigma {r['noise_multiplier']:.3f}") for r in rows]
                + [("csv", str(out / "privacy_curve.csv")), ("plot", str(out / "privacy_curve.png"))])
    return 0
