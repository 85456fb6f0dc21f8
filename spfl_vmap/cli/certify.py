"""``spfl certify``: argument parsing over ``spfl_vmap.experiments.certify`` (CRFL, Xie et al. 2021).

    spfl certify --run RUN_DIR [--sigma S] [--samples M] [--alpha A] [--batch B] [--out FILE]

Writes ``certify.json`` (default in the run directory) and ``certify.csv`` beside it, and prints
the certified accuracy against the radius.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ..experiments.certify import CertifyOptions, certify, format_table, write_outputs
from .common import OneLineParser, print_table


def _radii(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="spfl certify", description=(
        "CRFL (Xie et al. ICML 2021): smooth a run's final model in parameter space (M noisy copies vote) and certify "
        "each test point against a backdoor of bounded norm. Terms of the theorem not given are taken from the run."))
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run directory with config.json and checkpoint.pt")
    p.add_argument("--sigma", type=float, default=None, help="smoothing noise sigma_T (default: the run's --crfl_sigma)")
    p.add_argument("--samples", type=int, default=1000, help="noisy models M (default 1000)")
    p.add_argument("--alpha", type=float, default=0.001, help="the vote bounds hold together with probability 1 - alpha (default 0.001)")
    p.add_argument("--batch", type=int, default=32, help="noisy models evaluated together (default 32)")
    p.add_argument("--out", default=None, metavar="FILE", help="JSON output (default RUN_DIR/certify.json); the CSV goes beside it")
    p.add_argument("--t_adv", "--t-adv", type=int, default=None, help="attack round of the theorem (default: the round before the last)")
    p.add_argument("--attackers", type=int, default=None, help="R (default: malicious clients per cohort; 1 without an attack)")
    p.add_argument("--agg_weight", "--agg-weight", type=float, default=None, help="aggregation weight p_i of an attacker (default 1 / clients per round)")
    p.add_argument("--gamma", type=float, default=None, help="attackers' scale factor (default: the run's boost, else 1)")
    p.add_argument("--poison_frac", "--poison-frac", type=float, default=None, help="poisoned fraction of a batch (default: --bd_poison_frac)")
    p.add_argument("--lipschitz", type=float, default=None, help="L_z (default sqrt(2 + 2 rho + rho^2) at the attack round's clip)")
    p.add_argument("--tau", type=int, default=None, help="local steps of an attacker in a round (default from the run's data)")
    p.add_argument("--radii", type=_radii, default=None, help="comma-separated radii of the table (default: 0 to the largest radius)")
    return p


def cmd_certify(argv: Sequence[str]) -> int:
    ns = build_parser().parse_args(argv)
    opts = CertifyOptions(sigma=ns.sigma, samples=ns.samples, alpha=ns.alpha, batch=ns.batch, t_adv=ns.t_adv,
                          attackers=ns.attackers, agg_weight=ns.agg_weight, gamma=ns.gamma, poison_frac=ns.poison_frac,
                          lipschitz=ns.lipschitz, tau=ns.tau, radii=ns.radii)
    result = certify(ns.run, opts, log=lambda s: print(s, flush=True))
    json_path = Path(ns.out) if ns.out else Path(ns.run) / "certify.json"
    csv_path = write_outputs(result, json_path)
    print(format_table(result))
    print_table([("json", str(json_path)), ("csv", str(csv_path))])
    return 0
