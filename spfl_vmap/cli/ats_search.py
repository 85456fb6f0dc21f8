"""``spfl ats-search``: argument parsing over ``spfl_vmap.experiments.ats_search`` (ATS, Gao et al. CVPR 2021).

    spfl ats-search --dataset fashion_mnist --model cnn --num_candidates 32 --max_len 3 \\
        --threshold -85 --train_steps 100 --seed 0 --out runs/ats

Writes ``ats_search.csv`` (ranked: rank, policy, S_pri, S_acc, kept, ops) and ``ats_search.json``
to ``--out``; ``spfl run --data_recovery_protection --ats_policy_file OUT/ats_search.csv --topn K``
trains with the top ``K`` kept policies.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from ..config import Config
from ..experiments.ats_search import SearchSpec, run_ats_search
from .common import OneLineParser, print_table

D = SearchSpec()


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="spfl ats-search", description=(
        "ATS policy search (Gao et al. CVPR 2021): score random transformation policies by S_pri (gradient similarity "
        "from noise to the transformed image on a briefly trained model; lower is more private) and S_acc (Jacobian "
        "correlation on the untrained model; kept when >= --threshold), batched over candidates. Writes a ranked CSV "
        "for --ats_policy_file."))
    p.add_argument("--dataset", default="fashion_mnist", help="dataset (default fashion_mnist)")
    p.add_argument("--model", default="cnn", help="model (default cnn)")
    p.add_argument("--model_width", "--model-width", type=int, default=64, help="convnet width (default 64)")
    p.add_argument("--data_dir", "--data-dir", default="./data", help="dataset root (default ./data)")
    p.add_argument("--num_candidates", "--num-candidates", type=int, default=D.num_candidates,
                   help=f"random policies scored (default {D.num_candidates}; ATS 1600)")
    p.add_argument("--max_len", "--max-len", type=int, default=D.max_len, help=f"sub-policies per policy, at most (default {D.max_len})")
    p.add_argument("--threshold", type=float, default=D.threshold, help=f"keep policies with S_acc >= this (default {D.threshold:g}, ATS's)")
    p.add_argument("--train_steps", "--train-steps", type=int, default=D.train_steps,
                   help=f"SGD steps of the S_pri model (default {D.train_steps})")
    p.add_argument("--train_lr", "--train-lr", type=float, default=D.train_lr, help=f"its lr, momentum 0.9 (default {D.train_lr:g})")
    p.add_argument("--train_batch", "--train-batch", type=int, default=D.train_batch, help=f"its batch size (default {D.train_batch})")
    p.add_argument("--pri_per_class", "--pri-per-class", type=int, default=D.pri_per_class,
                   help=f"S_pri test images per class (default {D.pri_per_class}; ATS 5)")
    p.add_argument("--acc_runs", "--acc-runs", type=int, default=D.acc_runs, help=f"S_acc windows of the test set (default {D.acc_runs}, ATS's)")
    p.add_argument("--policies", default=None, help="score these policies instead of random ones, comma-separated (e.g. 3-1-7,43-18-18)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, training, candidates and draws (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="output directory (default runs/<time>-ats-search)")
    return p


def cmd_ats_search(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(argv)
    cfg = Config(dataset=ns.dataset, model=ns.model, model_width=ns.model_width, data_dir=ns.data_dir, seed=ns.seed,
                 device=ns.device, progress=False)
    policies = tuple(s.strip() for s in ns.policies.split(",") if s.strip()) if ns.policies else None
    spec = SearchSpec(ns.num_candidates, ns.max_len, ns.threshold, ns.train_steps, ns.train_lr, ns.train_batch,
                      ns.pri_per_class, ns.acc_runs, policies)
    out = Path(ns.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-ats-search")
    rep = run_ats_search(cfg, spec, out, log=lambda s: print(s, flush=True))
    top = [r for r in rep["rows"] if r["kept"]][:5]
    print(f"{'rank':>4}  {'policy':<12} {'S_pri':>8} {'S_acc':>9}  ops")
    for r in top:
        print(f"{r['rank']:>4}  {r['policy']:<12} {r['S_pri']:8.4f} {r['S_acc']:9.2f}  {r['ops']}")
    b = rep["baseline"]
    print_table([
        ("candidates", f"{rep['num_candidates']} scored, {rep['num_kept']} kept (S_acc >= {spec.threshold:g})"),
        ("identity", f"S_pri {b['S_pri']:.4f}, S_acc {b['S_acc']:.2f} (no transform)"),
        ("S_pri model", f"{spec.train_steps} steps, test accuracy {rep['trained_test_acc']:.3f}"),
        ("time", f"{rep['score_s']:.1f} s scoring, {rep['total_s']:.1f} s in all"),
        ("csv", str(out / "ats_search.csv")),
        ("use", rep["use"] if rep["num_kept"] else "no policy kept: lower --threshold or score more candidates"),
    ])
    return 0
