"""The package's layering rules (docs/architecture.md), checked on the import statements.

* the pure layer (kernels, aggregators, attacks, privacy maths and accountants, certified defenses)
  imports no engine, config, module, builder or command-line code;
* the stage protocols import nothing above the base utilities;
* the engine imports the stage protocols, not the module packages;
* nothing in the library imports the command line;
* an import inside a function is only for an optional or heavy third-party dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BASE = {"spfl_vmap", "spfl_vmap.errors", "spfl_vmap.registry", "spfl_vmap.rng"}
PURE = ("spfl_kernels", "spfl_vmap.aggregators", "spfl_vmap.attacks", "spfl_vmap.privacy", "spfl_vmap.defenses")
ABOVE_ENGINE = ("spfl_vmap.modules", "spfl_vmap.builder", "spfl_vmap.aggregators", "spfl_vmap.attacks",
                "spfl_vmap.privacy", "spfl_vmap.defenses", "spfl_vmap.runner", "spfl_vmap.experiments", "spfl_vmap.cli")
# third-party packages that may be imported inside a function: optional, or slow to import
LAZY_OK = {"matplotlib", "opacus", "sklearn", "tqdm", "yaml", "wandb", "torchvision", "scipy", "triton", "torchmetrics"}


def package_sources() -> dict[str, str]:
    """``{module name: source}`` of the installed layout (``kernels/`` is ``spfl_kernels``)."""
    out = {}
    for folder, pkg in ((ROOT / "spfl_vmap", "spfl_vmap"), (ROOT / "kernels", "spfl_kernels")):
        for p in folder.rglob("*.py"):
            parts = list(p.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = p.read_text()
    return out


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        if not is_pkg:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" if node.module is None else base for a in node.names]


def imports(module: str, source: str, packages: set[str]) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` of every import outside ``if TYPE_CHECKING``."""
    tree = ast.parse(source)
    is_pkg = module in packages
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_func: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                found.extend((a.name, in_func, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.extend((m, in_func, child.lineno) for m in _resolve(module, is_pkg, child))
            visit(child, in_func or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _under(name: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(sources: dict[str, str]) -> list[str]:
    """Every broken layering rule, as ``module:line: message``."""
    packages = {m for m in sources if any(k.startswith(m + ".") for k in sources)} | {"spfl_vmap", "spfl_kernels"}
    bad = []
    for mod, src in sorted(sources.items()):
        for name, in_func, line in imports(mod, src, packages):
            ours = _under(name, ("spfl_vmap", "spfl_kernels"))
            where = f"{mod}:{line}: imports {name}"
            if in_func and (ours or name.split(".")[0] not in LAZY_OK) and name != "__future__":
                bad.append(f"{where} inside a function (only optional or heavy third-party packages may be)")
            if not ours:
                continue
            if _under(mod, PURE) and not (_under(name, PURE) or name in BASE):
                bad.append(f"{where}: the pure layer imports only itself and the base utilities")
            if mod == "spfl_vmap.stages" and name not in BASE:
                bad.append(f"{where}: the stage protocols import only the base utilities")
            if _under(mod, ("spfl_vmap.engine",)) and _under(name, ABOVE_ENGINE):
                bad.append(f"{where}: the engine imports the stage protocols, not the modules or what sits above them")
            if not _under(mod, ("spfl_vmap.cli", "spfl_vmap.__main__")) and _under(name, ("spfl_vmap.cli",)):
                bad.append(f"{where}: the library does not import the command line")
    return bad


def test_package_respects_layering():
    assert violations(package_sources()) == []


@pytest.mark.parametrize("module,line", [
    ("spfl_vmap.aggregators.averaging", "from ..engine.simulator import RoundLoop"),
    ("spfl_vmap.privacy.accountant", "from ..config import Config"),
    ("spfl_kernels.order_stats", "from spfl_vmap.modules import byzantine"),
    ("spfl_vmap.engine.local", "from ..modules.privacy import DPFedAvg"),
    ("spfl_vmap.experiments.matrix", "from ..cli.common import print_table"),
    ("spfl_vmap.runner", "def f():\n    from .builder import build\n"),
    ("spfl_vmap.stages", "from .config import Config"),
])
def test_layering_check_catches_a_forbidden_import(module, line):
    """The check above can fail: each forbidden import, added to a real module, is reported."""
    sources = package_sources()
    assert violations(sources) == []
    sources[module] = sources[module] + "\n" + line + "\n"
    found = violations(sources)
    assert len(found) == 1 and found[0].startswith(module), found


def test_type_checking_imports_are_exempt():
    sources = package_sources()
    sources["spfl_vmap.aggregators.averaging"] += "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..engine import RoundLoop\n"
    assert violations(sources) == []
