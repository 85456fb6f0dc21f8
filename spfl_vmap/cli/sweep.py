"""``spfl sweep``: argument parsing over ``spfl_vmap.experiments.sweep``."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from ..config import Config, load_config_file
from ..errors import ConfigError
from ..experiments.sweep import (
    SweepSpec,
    default_sweep_dir,
    field_name,
    load_sweep_file,
    load_sweep_spec,
    parse_choice,
    parse_grid,
    parse_range,
    parse_value,
    run_sweep,
)
from .common import OneLineParser, add_config_flags, print_table

EPILOG = """examples:
  spfl sweep --grid lr=0.01,0.03,0.1 seed=0,1,2 --dataset digits --comm_round 20
  spfl sweep --random 8 --range lr=log:0.001:0.1 --range momentum=0:0.9 --choice by_defense=krum,median
  spfl sweep --sweep_file sweep.yaml --out runs/my-sweep      (later: spfl sweep --resume runs/my-sweep)
values holding commas themselves are separated by ';': --grid 'by_defense_params=tau=5,n_iter=3;tau=10,n_iter=3'"""


def cmd_sweep(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl sweep", description="Run many configurations in one process: a grid, a random search or a "
                      "sweep file over any spfl run flags; the other flags are shared by every point. Points that differ "
                      "only in --lr/--momentum/--wd/--server_lr train together (vectorized).", epilog=EPILOG,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("the sweep")
    g.add_argument("--grid", nargs="+", action="extend", default=[], metavar="NAME=V1,V2",
                   help="cartesian product over these flags' values")
    g.add_argument("--random", type=int, default=0, metavar="N", help="N random points drawn from --range and --choice")
    g.add_argument("--range", dest="ranges", action="append", default=[], metavar="NAME=[log:]LOW:HIGH",
                   help="uniform (or log-uniform) range of a numeric flag for --random")
    g.add_argument("--choice", dest="choices", action="append", default=[], metavar="NAME=A,B",
                   help="values of a flag drawn uniformly for --random")
    g.add_argument("--sweep_seed", "--sweep-seed", type=int, default=None, help="seed of the random draws (default 0)")
    g.add_argument("--sweep_file", "--sweep-file", metavar="FILE",
                   help="YAML/JSON with base, grid and/or random sections (the command line adds to and overrides it)")
    g.add_argument("--resume", metavar="SWEEP_DIR", help="continue the sweep in this directory (its sweep.json)")
    g.add_argument("--vectorize", choices=("auto", "off"), default="auto",
                   help="auto: points differing only in continuous hyperparameters (client/server lr, momentum, wd, DP sigma and clip, attack/aggregator params) train together; off: one by one")
    p.add_argument("--config", help="YAML/JSON file of base flag values (command-line flags override it)")
    add_config_flags(p)
    ns = p.parse_args(argv)

    given = {f.name: getattr(ns, f.name) for f in fields(Config) if f.name in vars(ns)}
    out = given.pop("out", None) or ns.resume
    defines_spec = bool(ns.grid or ns.random or ns.ranges or ns.choices or ns.sweep_file or ns.config or given
                        or ns.sweep_seed is not None)
    if ns.resume and not defines_spec:
        spec = load_sweep_spec(Path(ns.resume))
    else:
        spec = build_spec(ns, given)
    out_dir = Path(out) if out else default_sweep_dir(spec)
    points = run_sweep(spec, out_dir, vectorize=ns.vectorize)
    best = max((q for q in points if q.summary and q.summary.get("final_test_acc") is not None),
               key=lambda q: q.summary["final_test_acc"], default=None)
    failed = [q for q in points if q.status.startswith("failed")]
    print_table([
        ("points", f"{len(points)} ({sum(q.mode.startswith('vectorized') for q in points)} vectorized)"),
        ("best final test acc", f"{best.summary['final_test_acc']:.4f} at {best.label}" if best else "-"),
        *([("failed", ", ".join(q.label for q in failed))] if failed else []),
        ("sweep directory", f"{out_dir} (sweep.csv, sweep.md, curves.png, points/)"),
    ])
    return 1 if failed else 0


def build_spec(ns: argparse.Namespace, given: dict[str, Any]) -> SweepSpec:
    """The spec from ``--config`` (base flags), ``--sweep_file`` and the command line, in rising
    priority; a swept flag drops out of ``--config``'s base values, and one both given as a
    base flag on the command line and swept is an error."""
    parts: dict[str, Any] = load_sweep_file(ns.sweep_file) if ns.sweep_file else {}
    base: dict[str, Any] = {}
    if ns.config:
        for k, v in load_config_file(ns.config).items():
            name = field_name(k, f"--config {ns.config}", sweepable=False)
            base[name] = parse_value(name, v, f"--config {ns.config}")
    grid = {**parts.get("grid", {}), **parse_grid(ns.grid)}
    ranges = {**parts.get("ranges", {}), **dict(parse_range(i) for i in ns.ranges)}
    choices = {**parts.get("choices", {}), **dict(parse_choice(i) for i in ns.choices)}
    swept = set(grid) | set(ranges) | set(choices)
    both = sorted(swept & set(given))
    if both:
        raise ConfigError(f"--{both[0]} is given as a base flag and swept; drop one of them")
    base = {k: v for k, v in base.items() if k not in swept}  # --config values of swept flags give way
    base.update(parts.get("base", {}))
    base.update({k: parse_value(k, v, f"--{k}") for k, v in given.items()})
    return SweepSpec(
        base=base,
        grid=grid,
        random=ns.random or parts.get("random", 0),
        ranges=ranges,
        choices=choices,
        sweep_seed=ns.sweep_seed if ns.sweep_seed is not None else parts.get("sweep_seed", 0),
    )
