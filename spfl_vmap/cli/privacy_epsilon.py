"""``spfl privacy-epsilon``: epsilon of a DP-SGD / DP-FedAvg configuration, or the noise it needs.

Like Opacus's ``compute_dp_sgd_privacy`` script::

    spfl privacy-epsilon --sample_rate 0.04 --noise_multiplier 1.5 --steps 2250 --delta 1e-5
    epsilon = 7.329111

    spfl privacy-epsilon --sample-rate 0.04 --target-epsilon 8 --steps 2250 --delta 1e-5
    noise_multiplier = 1.425...
    epsilon = 7.9...

Flags accept dashes and underscores alike. Bad or missing flags print one ``error: ...`` line
on stderr and return 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from ..errors import SpflError
from ..privacy.accountant import ACCOUNTANTS, calibrate_noise_multiplier, compute_epsilon

USAGE_EXAMPLE = (
    "spfl privacy-epsilon --sample_rate Q (--noise_multiplier SIGMA | --target_epsilon E) "
    "--steps T --delta D [--accountant rdp|prv]"
)


class _ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise _ParseError(message)


def _normalize(argv: list[str]) -> list[str]:
    """``--sample-rate=0.1`` -> ``--sample_rate=0.1``: flag names only, never values."""
    out = []
    for tok in argv:
        if tok.startswith("--") and len(tok) > 2:
            name, eq, value = tok[2:].partition("=")
            tok = "--" + name.replace("-", "_") + eq + value
        out.append(tok)
    return out


def _build_parser() -> _Parser:
    p = _Parser(
        prog="spfl privacy-epsilon",
        description=(
            "Epsilon of the Poisson-subsampled Gaussian mechanism composed over T steps "
            "(DP-SGD, Abadi et al. 2016; DP-FedAvg, McMahan et al. 2018), or the smallest noise "
            "multiplier that meets --target_epsilon."
        ),
        allow_abbrev=False,
    )
    p.add_argument("--sample_rate", type=float, required=True, metavar="Q",
                   help="probability that a record takes part in a step, in (0, 1]")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--noise_multiplier", type=float, metavar="SIGMA",
                       help="noise std divided by the clip norm")
    group.add_argument("--target_epsilon", type=float, metavar="E",
                       help="calibrate the noise multiplier to this epsilon")
    p.add_argument("--steps", type=int, required=True, metavar="T", help="number of steps")
    p.add_argument("--delta", type=float, required=True, metavar="D", help="delta, in (0, 1)")
    p.add_argument("--accountant", default="rdp", choices=ACCOUNTANTS.names(),
                   help="rdp (Mironov 2017) or prv (Gopi et al. 2021); default rdp")
    p.add_argument("--epsilon_tolerance", type=float, default=0.01, metavar="TOL",
                   help="relative tolerance of --target_epsilon calibration; default 0.01")
    return p


def privacy_epsilon_main(argv: list[str]) -> int:
    """Entry point of ``spfl privacy-epsilon``.

    Args:
        argv: Arguments after the subcommand name, e.g.
            ``["--sample_rate", "0.04", "--noise_multiplier", "1.5", "--steps", "2250",
            "--delta", "1e-5"]``.

    Returns:
        0 on success (result on stdout), 2 on a user error (one ``error: ...`` line on stderr).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(_normalize(list(argv)))
    except _ParseError as e:
        print(f"error: {e} (usage: {USAGE_EXAMPLE})", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    try:
        if args.noise_multiplier is not None:
            eps = compute_epsilon(
                args.sample_rate, args.noise_multiplier, args.steps, args.delta, args.accountant
            )
            print(f"epsilon = {eps:.6f}")
        else:
            sigma = calibrate_noise_multiplier(
                args.target_epsilon,
                args.sample_rate,
                args.steps,
                args.delta,
                args.accountant,
                args.epsilon_tolerance,
            )
            eps = compute_epsilon(args.sample_rate, sigma, args.steps, args.delta, args.accountant)
            print(f"noise_multiplier = {sigma:.6f}")
            print(f"epsilon = {eps:.6f}")
    except SpflError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

