"""``pyproject.toml`` lists its packages explicitly (``kernels/`` installs as ``spfl_kernels``), so
a new sub-package missing from that list would be absent from a non-editable install."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"spfl_kernels"} | {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "spfl_vmap").rglob("__init__.py")
    }
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
