"""The ``spfl`` command line.

    spfl run   [flags]            train one configuration (flags: ``spfl run --help``)
    spfl bench engine|scale ...   vectorized engine vs the per-client loop
    spfl privacy-epsilon ...      epsilon of DP-SGD without training

Every ``Config`` field is a flag, spelled with underscores (the original toolkit's names) or
dashes. ``--config FILE.yaml`` supplies defaults; flags given on the command line win. Errors a
user can cause print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any, Callable, NoReturn, Sequence

from .config import Config, base_type, coerce, field_types, load_config_file
from .errors import SpflError


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus where to look) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Config field, accepting ``--a_b`` and ``--a-b``; defaults are SUPPRESSed so
    that only flags actually given override the config file."""
    hints = field_types()
    for f in fields(Config):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})"
        bt = base_type(hints[f.name])
        if bt is bool:
            p.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            p.add_argument(*names, dest=f.name, type=str, default=argparse.SUPPRESS, metavar=bt.__name__.upper(), help=help_)


def config_from_args(ns: argparse.Namespace, extra_defaults: dict[str, Any] | None = None) -> Config:
    values: dict[str, Any] = dict(extra_defaults or {})
    if getattr(ns, "config", None):
        values.update({k.replace("-", "_"): v for k, v in load_config_file(ns.config).items()})
    hints = field_types()
    for f in fields(Config):
        if f.name in vars(ns):
            values[f.name] = coerce(f.name, getattr(ns, f.name), hints[f.name])
    return Config.from_dict(values)


def print_table(rows: list[tuple[str, str]]) -> None:
    w = max(len(k) for k, _ in rows)
    line = "-" * (w + 2 + max(len(v) for _, v in rows))
    print(line)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print(line)


def cmd_run(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl run", description="Train one federated configuration.")
    p.add_argument("--config", help="YAML/JSON file of flag values (command-line flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a checkpointed run (its config is reused)")
    add_config_flags(p)
    ns = p.parse_args(argv)
    from .engine.runner import default_run_dir, load_run_config, run

    if ns.resume:
        base = load_run_config(ns.resume).to_dict()
        given = {f.name: getattr(ns, f.name) for f in fields(Config) if f.name in vars(ns)}
        cfg = Config.from_dict({**base, **given})
        out = ns.resume
    else:
        cfg = config_from_args(ns)
        if cfg.out is None:
            cfg = cfg.replace(out=str(default_run_dir(cfg)))
        out = cfg.out

    def on_start_log(msg: str) -> None:
        print(msg, flush=True)

    print(f"spfl run: {cfg.dataset} / {cfg.model} / {cfg.partition_method} / {cfg.client_num_per_round} of {cfg.client_num_in_total} clients x {cfg.comm_round} rounds -> {out}")
    def on_round(m: dict[str, Any]) -> None:
        if "test_acc" in m and not sys.stderr.isatty():
            print(f"round {m['round']:>4}  test_acc {m['test_acc']:.4f}  test_loss {m['test_loss']:.4f}  train_loss {m['train_loss']:.4f}  wall {m['wall_s']:.1f}s", flush=True)

    hist = run(cfg, resume_dir=ns.resume, on_round=on_round, log=on_start_log)
    s = hist.summary
    print_table([
        ("dataset / model", f"{cfg.dataset} / {cfg.model} ({s['num_params']:,} params)"),
        ("engine / strategy", f"{s['engine']} / {s['strategy']} (chunk {s['client_chunk']}) on {s['device']}"),
        ("rounds", str(s["rounds"])),
        ("final test acc", f"{s['final_test_acc']:.4f}" if s["final_test_acc"] is not None else "-"),
        ("best test acc", f"{s['best_test_acc']:.4f}" if s["best_test_acc"] is not None else "-"),
        ("final test loss", f"{s['final_test_loss']:.4f}" if s["final_test_loss"] is not None else "-"),
        *([("epsilon", f"{s['epsilon']:.3f} (delta {s['privacy']['delta']:.2g})")] if "epsilon" in s else []),
        *([("epsilon per client", f"min {s['eps_min']:.3f} median {s['eps_median']:.3f} max {s['eps_max']:.3f}")] if "eps_max" in s and "eps_min" in s else []),
        *([("stopped", s["stopped"])] if s.get("stopped") else []),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("clients / s", f"{s['mean_clients_per_s']:.1f}" if s["mean_clients_per_s"] else "-"),
        ("run directory", str(out)),
    ])
    return 0


def cmd_privacy_epsilon(argv: Sequence[str]) -> int:
    from .privacy.cli_epsilon import privacy_epsilon_main

    return privacy_epsilon_main(list(argv))


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "run": ("train one configuration", cmd_run),
    "privacy-epsilon": ("epsilon (or calibrated sigma) of DP-SGD, without training", cmd_privacy_epsilon),
}


def register_command(name: str, help_: str) -> Callable[[Callable[[Sequence[str]], int]], Callable[[Sequence[str]], int]]:
    def deco(fn: Callable[[Sequence[str]], int]) -> Callable[[Sequence[str]], int]:
        COMMANDS[name] = (help_, fn)
        return fn

    return deco


def _load_optional_commands() -> None:
    """Commands that live with their modules register themselves on import."""
    import importlib

    for mod in ("spfl_vmap.bench_cli", "spfl_vmap.matrix", "spfl_vmap.privacy.curve"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def usage() -> str:
    lines = ["usage: spfl COMMAND [flags]", "", "commands:"]
    lines += [f"  {k:<18} {v[0]}" for k, v in COMMANDS.items()]
    lines += ["", "spfl COMMAND --help shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_optional_commands()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "version"):
        from . import __version__

        print(__version__)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"spfl: error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
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
