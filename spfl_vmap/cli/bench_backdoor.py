"""``spfl bench backdoor``: a backdoor run's cost against the clean run of the same size."""

from __future__ import annotations

from typing import Sequence

import torch

from ..experiments.backdoor_bench import VARIANTS, bench_backdoor, format_backdoor_rows
from .common import OneLineParser, add_config_flags, config_from_args, write_json_result


def cmd_bench_backdoor(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench backdoor",
                      description="Median seconds per round and per evaluation of backdoor runs against the clean run of the "
                                  "same size, alternating in one process. Takes every spfl run flag for the base workload.")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per variant (after one warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    base = config_from_args(ns, extra_defaults={"progress": False})
    variants = [v.strip() for v in ns.variants.split(",") if v.strip()]
    res = bench_backdoor(base, variants, ns.repeats, log=lambda s: print(s, flush=True))
    c = res["config"]
    print(f"spfl bench backdoor: {c['dataset']} {c['model']} ({c['strategy']}), {c['per_round']} of {c['clients']} clients "
          f"({c['partition']}), attackers by_frac {c['by_frac']} / by_workers {c['by_workers']}, {c['device']}, "
          f"{c['threads']} threads, median of {c['repeats']} alternating rounds; run x = evaluation every {c['eval_every']} rounds")
    print(format_backdoor_rows(res["rows"]))
    write_json_result(ns.json, res)
    return 0
