"""Shared pieces of the ``spfl`` commands: the one-line-error parser, config flags, tables."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

from ..config import Config, base_type, coerce, field_types, load_config_file


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports errors in one line (plus where to look) instead of a usage dump, and
    takes flags only as spelled: ``--epoch 2`` is an error, not ``--epochs 2``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per Config field, accepting ``--a_b`` and ``--a-b``; defaults are SUPPRESSed so
    that only flags actually given override the config file."""
    hints = field_types()
    for f in fields(Config):
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        help_ = f"{f.metadata.get('help', '')} (default: {f.default})".replace("%", "%%")  # argparse %-formats help
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


def write_json_result(path: str | None, result: Any) -> None:
    """Write a command's result as indented JSON to ``path`` (parents created) and say so; no-op
    for ``None``."""
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")
