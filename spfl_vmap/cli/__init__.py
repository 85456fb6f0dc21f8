"""The ``spfl`` command line: a thin layer over the library and ``spfl_vmap.experiments``.

    spfl run   [flags]            train one configuration (flags: ``spfl run --help``)
    spfl matrix ...               attack x defense matrix
    spfl privacy-curve ...        accuracy vs epsilon
    spfl backdoor-curve ...       attack success and accuracy vs norm bound (and noise)
    spfl bench engine|scale ...   vectorized engine vs the per-client loop
    spfl privacy-epsilon ...      epsilon of DP-SGD without training
    spfl certify --run DIR ...    CRFL certified accuracy of a finished run
    spfl invert --attack ig ...   reconstruct clients' images from their uploads
    spfl ats-search ...           ATS policy search: ranked CSV of transformation policies
    spfl sweep --grid lr=...      many configurations in one process (grid, random search, sweep file)

Nothing in the library imports this package.

Every ``Config`` field is a flag, spelled with underscores (the original toolkit's names) or
dashes. ``--config FILE.yaml`` supplies defaults; flags given on the command line win. Errors a
user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from .. import __version__, distributed
from ..errors import SpflError
from .ats_search import cmd_ats_search
from .certify import cmd_certify
from .experiments import cmd_backdoor_curve, cmd_bench, cmd_matrix, cmd_privacy_curve
from .invert import cmd_invert
from .privacy_epsilon import privacy_epsilon_main
from .run import cmd_run
from .sweep import cmd_sweep

Command = Callable[[Sequence[str]], int]
COMMANDS: dict[str, tuple[str, Command]] = {
    "run": ("train one configuration", cmd_run),
    "matrix": ("attack x defense matrix of final accuracy, and ASR for bd: attacks (CSV, Markdown, heatmap)", cmd_matrix),
    "privacy-curve": ("accuracy vs epsilon: one calibrated run per epsilon (CSV + PNG)", cmd_privacy_curve),
    "backdoor-curve": ("backdoor success and accuracy vs norm bound and noise (Sun et al. 2019; CSV, Markdown, PNG)", cmd_backdoor_curve),
    "bench": ("benchmarks: bench engine (vectorized vs loop), bench scale (cohort size), bench backdoor (cost of a backdoor), bench inversion (batched vs looped attack)", cmd_bench),
    "privacy-epsilon": ("epsilon (or calibrated sigma) of DP-SGD, without training", privacy_epsilon_main),
    "certify": ("CRFL: smooth a run's final model, certified accuracy vs backdoor radius (JSON + CSV)", cmd_certify),
    "invert": ("gradient inversion (DLG, iDLG, Inverting Gradients) of clients' uploads: PSNR, SSIM, labels (JSON + PNG)", cmd_invert),
    "ats-search": ("ATS policy search: S_pri and S_acc of random transformation policies, ranked CSV for --ats_policy_file", cmd_ats_search),
    "sweep": ("grid / random search / sweep file over any run flags, in one process; lr-like points vectorized (CSV, Markdown, plots)", cmd_sweep),
}


def usage() -> str:
    lines = ["usage: spfl COMMAND [flags]", "", "commands:"]
    lines += [f"  {k:<18} {v[0]}" for k, v in COMMANDS.items()]
    lines += ["", "spfl COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "version"):
        print(__version__)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"spfl: error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if distributed.launched() and argv[0] != "run":
        print(f"spfl: error: under torchrun only `spfl run` shards its clients over the processes; run `spfl {argv[0]}` "
              f"without torchrun", file=sys.stderr)
        return 2
    try:
        return cmd[1](argv[1:])
    except SpflError as e:
        print(f"spfl {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse's --help and usage errors
        return e.code if isinstance(e.code, int) else 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
