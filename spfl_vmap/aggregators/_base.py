"""Shared pieces of the aggregators: the registry, input validation, weight normalisation, the
cohort-size bounds and Krum scores.

Kept apart from ``__init__`` so that every aggregator module can import the registry without a
circular import. The attacks reuse :func:`check_weights` and :func:`resolve_kwargs`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import types
import typing
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from spfl_kernels import pairwise_sqdist

from ..rng import default_generator  # noqa: F401  (re-exported for this package)

from ..errors import ConfigError
from ..registry import Registry

AGGREGATORS: Registry = Registry("aggregator")

#: Keyword arguments the engine passes to every aggregator; a rule that does not take one of them
#: simply does not get it. Any other key must be one of the rule's own hyperparameters.
#: ``client_ids`` (the rows' client ids) is taken only by rules with a per-client history,
#: ``server_update`` (the server's root-set update) only by FLTrust.
ENGINE_KWARGS = frozenset({"f", "state", "generator", "client_ids", "server_update"})

# Metric keys whose values are row indices (remapped by ``aggregate()`` when rows are excluded)
# and keys whose values hold one entry per row (expanded with ``None`` for excluded rows).
INDEX_KEYS = ("selected", "flagged", "norm_flagged", "sign_flagged")
ROW_KEYS = ("scores",)


def check_matrix(U: Any, who: str) -> None:
    """Reject anything but a floating-point ``[N, D]`` tensor (one row per client).

    Raises:
        ConfigError: naming ``who`` and what was passed instead.
    """
    if not isinstance(U, torch.Tensor):
        raise ConfigError(f"{who}: U must be a torch.Tensor of shape [N, D], got {type(U).__name__}")
    if U.dim() != 2:
        raise ConfigError(f"{who}: U must be [N, D] (one flattened update per row), got shape {tuple(U.shape)}")
    if not U.is_floating_point():
        raise ConfigError(f"{who}: U must be a floating-point tensor, got {U.dtype}")


def check_weights(weights: Any, n: int, who: str) -> None:
    """Reject weights that are not ``None`` or a tensor with one entry per row.

    Args:
        weights: ``[N]`` weights or ``None``.
        n: number of rows N.
        who: name for the error message.

    Raises:
        ConfigError: a non-tensor or a tensor with a different number of entries.
    """
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor):
        raise ConfigError(f"{who}: weights must be a torch.Tensor [N] or None, got {type(weights).__name__}")
    if weights.dim() != 1 or weights.numel() != n:
        raise ConfigError(f"{who}: weights must have one entry per row ([{n}]), got shape {tuple(weights.shape)}")


def check_f(f: Any, n: int, name: str) -> int:
    """Validate the assumed number of Byzantine clients ``f`` for ``n`` rows; return it as int."""
    if isinstance(f, bool) or not isinstance(f, numbers.Integral):
        raise ConfigError(f"{name}: f (assumed Byzantine clients) must be an int, got {f!r} ({type(f).__name__})")
    f = int(f)
    if f < 0:
        raise ConfigError(f"{name}: f (assumed Byzantine clients) must be >= 0, got {f}")
    if n < 1:
        raise ConfigError(f"{name}: needs at least one client update, got n={n}")
    return f


def check_args(U: Any, weights: Any, f: Any, name: str) -> int:
    """The checks every rule runs first: ``U`` a float ``[N, D]`` tensor with ``N >= 1``,
    ``weights`` ``None`` or ``[N]``, ``f`` a non-negative int.

    Returns:
        ``f`` as an int.

    Raises:
        ConfigError: on the first violated condition.
    """
    check_matrix(U, name)
    check_weights(weights, U.shape[0], name)
    return check_f(f, U.shape[0], name)


def normalise_weights(weights: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Non-negative weights scaled to sum 1; ``None`` or an all-zero vector means uniform.

    Args:
        weights: ``[N]`` sample counts or any non-negative weights, or ``None``.
        n: number of rows N.
        device: device of the result.

    Returns:
        ``[N]`` fp32 weights summing to 1.

    Raises:
        ConfigError: wrong length, or a negative or non-finite weight.
    """
    if weights is None:
        return torch.full((n,), 1.0 / n, device=device)
    check_weights(weights, n, "aggregator")
    w = weights.to(device=device, dtype=torch.float32).reshape(-1)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ConfigError("aggregator weights must be finite and non-negative")
    total = w.sum()
    if float(total) <= 0.0:
        return torch.full((n,), 1.0 / n, device=device)
    return w / total


def required_clients(name: str, f: int, params: Mapping[str, Any] | None = None) -> int:
    """The smallest cohort ``n`` for which rule ``name`` accepts ``f`` assumed Byzantine clients.

    The single source of these bounds: the rules check them through this function.

    - ``krum``, ``multi_krum``: ``n >= 2f + 3`` when ``f > 0`` (Blanchard et al. 2017, whose
      guarantee needs ``2f + 2 < n``); any ``n >= 1`` when ``f = 0``. Multi-Krum with an explicit
      ``m`` also needs ``n >= m``.
    - ``bulyan``: ``n >= 4f + 3`` (El Mhamdi et al. 2018), also for ``f = 0``.
    - ``trimmed_mean``: ``n >= 2k + 1`` for ``k`` values trimmed per side; ``k`` is ``params["k"]``
      if given, else ``f`` (the default trim count), and any ``n >= 1`` when only ``beta`` is given
      (``floor(beta * n)`` with ``beta < 0.5`` always leaves a value).
    - ``flame``: ``n >= 3`` (its majority cluster needs at least three clients).
    - every other rule: 1.

    Args:
        name: registry name.
        f: assumed number of Byzantine clients.
        params: the rule's hyperparameters if not the defaults (only ``trimmed_mean``'s ``k`` /
            ``beta`` and ``multi_krum``'s ``m`` matter).

    Returns:
        The minimum ``n``.

    Raises:
        ConfigError: unknown ``name`` or invalid ``f``.
    """
    AGGREGATORS.get(name)  # unknown names are a ConfigError listing the known ones
    f = check_f(f, 1, name)
    params = params or {}

    def int_param(key: str) -> int | None:
        v = params.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise ConfigError(f"{name}: {key} must be an int, got {v!r} ({type(v).__name__})")
        return None if v is None else int(v)

    if name in ("krum", "multi_krum"):
        least = 2 * f + 3 if f > 0 else 1
        m = int_param("m") if name == "multi_krum" else None
        return least if m is None else max(least, m)
    if name == "bulyan":
        return 4 * f + 3
    if name == "flame":
        return 3
    if name == "trimmed_mean":
        k = int_param("k")
        if k is None and params.get("beta") is not None:
            return 1
        return max(1, 2 * (f if k is None else k) + 1)
    return 1


def check_clients(name: str, n: int, f: int, params: Mapping[str, Any] | None = None) -> None:
    """Raise if ``n`` rows are fewer than :func:`required_clients` demands.

    Raises:
        ConfigError: e.g. ``krum needs n >= 2f+3 clients (Blanchard et al. 2017); got n=6, f=2
            (minimum 7)``.
    """
    least = required_clients(name, f, params)
    if n >= least:
        return
    if name == "trimmed_mean":
        raise ConfigError(f"trimmed_mean trims k={(least - 1) // 2} values per side, which needs n > 2k; got n={n}")
    why = {
        "krum": "2f+3 clients (Blanchard et al. 2017)",
        "multi_krum": "2f+3 clients (Blanchard et al. 2017)",
        "bulyan": "4f+3 clients (El Mhamdi et al. 2018)",
        "flame": "3 clients (its HDBSCAN majority cluster needs them)",
    }.get(name, f"{least} clients")
    raise ConfigError(f"{name} needs n >= {why}; got n={n}, f={f} (minimum {least})")


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores from squared distances (Blanchard et al. 2017).

    score(i) = sum of the squared distances from row i to its ``n - f - 2`` nearest *other* rows.
    The neighbour count is clamped to ``[1, n - 1]`` so that small sets (the tail of an iterative
    Multi-Krum/Bulyan selection) still get a defined score.

    Args:
        D: ``[..., n, n]`` squared distances (leading batch dimensions allowed).
        f: assumed number of Byzantine rows.

    Returns:
        ``[..., n]`` fp32 scores (lower is better).
    """
    n = D.shape[-1]
    if n == 1:
        return torch.zeros(D.shape[:-1], dtype=torch.float32, device=D.device)
    k = min(max(n - f - 2, 1), n - 1)
    Dm = D.float().clone()
    Dm.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # a row is not its own neighbour
    return torch.topk(Dm, k, dim=-1, largest=False).values.sum(dim=-1)  # (..., n)


def randperm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``torch.randperm`` drawn on the generator's device, moved to ``device``."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


# --- keyword-argument validation shared by ``aggregate()`` and ``attack()`` -------------------

_TYPE_NAMES = {bool: "a bool", int: "an int", float: "a number", str: "a string"}


@functools.lru_cache(maxsize=None)
def _signature(fn: Callable) -> tuple[tuple[str, ...], bool, dict[str, Any]]:
    """(keyword-only parameter names, takes ``**kwargs``, resolved annotations)."""
    ps = inspect.signature(fn).parameters.values()
    names = tuple(p.name for p in ps if p.kind is inspect.Parameter.KEYWORD_ONLY)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: no type checks for this function
        hints = {}
    return names, var_kw, hints


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits annotation ``tp`` (ints, numbers, bools, strings, classes, unions)."""
    if tp is Any:
        return True
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    origin = typing.get_origin(tp) or tp
    return isinstance(value, origin) if isinstance(origin, type) else True


def _describe(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    names = [_TYPE_NAMES.get(a, getattr(a, "__name__", str(a))) for a in args]
    return " or ".join(names) + (" or None" if len(args) < len(typing.get_args(tp)) else "")


def hyperparameters(fn: Callable, engine: frozenset[str] = ENGINE_KWARGS) -> list[str]:
    """The user-settable keyword arguments of a registered function (engine keys left out)."""
    return sorted(set(_signature(fn)[0]) - engine)


def resolve_kwargs(fn: Callable, kwargs: Mapping[str, Any], engine: frozenset[str], who: str) -> dict[str, Any]:
    """The keyword arguments to call ``fn`` with, after validation.

    Engine keys (``engine``) that ``fn`` does not take are dropped; any other key ``fn`` does not
    take is an error (a misspelled hyperparameter must not be ignored), and every passed value
    must fit ``fn``'s annotation. A function taking ``**kwargs`` gets every key.

    Args:
        fn: a registered aggregator or attack.
        kwargs: what the caller passed.
        engine: keys the engine passes to every function of the registry.
        who: name for the error message, e.g. ``"aggregator 'krum'"``.

    Returns:
        The accepted subset of ``kwargs``.

    Raises:
        ConfigError: an unknown key (listing the accepted hyperparameters) or a value of the wrong
            type.
    """
    names, var_kw, hints = _signature(fn)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in names and not var_kw:
            if key in engine:
                continue
            accepted = ", ".join(hyperparameters(fn, engine)) or "none"
            raise ConfigError(f"{who} has no hyperparameter {key!r}; it takes: {accepted}")
        tp = hints.get(key, Any)
        if not _matches(value, tp):
            raise ConfigError(f"{who}: {key} must be {_describe(tp)}, got {value!r} ({type(value).__name__})")
        out[key] = value
    return out


def std_rows(X: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise sample standard deviation (Bessel-corrected); zeros for a single row."""
    if X.shape[0] < 2:
        return torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    return X.std(dim=0, correction=1)


# ---- rows in one process or sharded over processes ----------------------------------------------
class Collectives(Protocol):
    """What sharded attacks and aggregators need of :class:`spfl_vmap.distributed.Sharding`
    (a protocol, so that the pure layer does not import the distributed module)."""

    rank: int

    def gather_rows(self, local: torch.Tensor, rows: list[list[int]]) -> torch.Tensor: ...

    def sqdist(self, local: torch.Tensor, rows: list[list[int]]) -> torch.Tensor: ...

    def reduce(self, t: torch.Tensor, op: str) -> torch.Tensor: ...


class Rows:
    """A set of ``n`` update rows (those an attacker knows, or those an aggregator keeps), and the
    statistics attacks and aggregators take of them.

    In one process it holds all of them, ``X (n, D)``, and each statistic is the plain torch
    expression the attacks and rules always used. Under torchrun each rank holds its own share
    ``X (n_r, D)`` (``parts``: every rank's positions among the ``n`` rows) and the statistics
    come from collectives, so no rank holds all rows: sums ``all_reduce`` per-rank partial sums
    (:meth:`total`; the standard deviation in two passes, as torch's), coordinate-wise extremes
    ``all_reduce`` with max/min, per-row values are gathered (``(n,)``) and pairwise distances
    come in per-rank blocks (:meth:`~spfl_vmap.distributed.Sharding.sqdist`). The results equal
    the one-process ones up to the order of the additions.
    """

    def __init__(self, X: torch.Tensor, n: Optional[int] = None, sh: Optional[Collectives] = None,
                 parts: Optional[list[list[int]]] = None) -> None:
        self.X = X  # (n_r, D) fp32: the rows held here
        self.n = X.shape[0] if n is None else n
        self.sh, self.parts = sh, parts

    @property
    def dim(self) -> int:
        return self.X.shape[1]

    def mean(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(D,)`` coordinate-wise mean, computed in ``dtype``."""
        if self.sh is None:
            return self.X.to(dtype).mean(dim=0)
        return self.sh.reduce(self.X.to(dtype).sum(dim=0), "sum") / self.n

    def std(self) -> torch.Tensor:
        """``(D,)`` coordinate-wise sample standard deviation (Bessel); zeros for one row."""
        if self.sh is None:
            return std_rows(self.X)
        if self.n < 2:
            return torch.zeros(self.dim, dtype=self.X.dtype, device=self.X.device)
        mu = self.mean()
        return (self.sh.reduce(((self.X - mu) ** 2).sum(dim=0), "sum") / (self.n - 1)).sqrt()

    def max(self) -> torch.Tensor:
        """``(D,)`` coordinate-wise maximum."""
        return self._extreme("max")

    def min(self) -> torch.Tensor:
        """``(D,)`` coordinate-wise minimum."""
        return self._extreme("min")

    def _extreme(self, op: str) -> torch.Tensor:
        if self.sh is None:
            return getattr(self.X, op)(dim=0).values
        if self.X.shape[0]:
            local = getattr(self.X, op)(dim=0).values
        else:  # no known row here: the identity of the reduction
            local = torch.full((self.dim,), -math.inf if op == "max" else math.inf, dtype=self.X.dtype, device=self.X.device)
        return self.sh.reduce(local, op)

    def total(self, partial: torch.Tensor) -> torch.Tensor:
        """``partial``, a sum over the rows held here, summed over every rank's rows."""
        return partial if self.sh is None else self.sh.reduce(partial, "sum")

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """The entries ``(n_r,)`` of ``values (n,)`` (one per row) for the rows held here."""
        if self.sh is None:
            return values
        return values[torch.tensor(self.parts[self.sh.rank], dtype=torch.long, device=values.device)]

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """The ``(n,)`` values of every row, from ``values (n_r,)`` of the rows held here."""
        return values if self.sh is None else self.sh.gather_rows(values, self.parts)

    def sqdist(self) -> torch.Tensor:
        """``(n, n)`` pairwise squared Euclidean distances (fp32)."""
        return pairwise_sqdist(self.X) if self.sh is None else self.sh.sqdist(self.X, self.parts)


def subset_parts(mask: torch.Tensor, parts: list[list[int]]) -> list[list[int]]:
    """Every rank's positions among the rows ``mask (N,)`` selects, from every rank's cohort
    positions ``parts``: the ``parts`` of :class:`Rows` over a subset of the cohort's rows."""
    order = torch.cumsum(mask.long(), 0) - 1  # (N,) position among the selected rows
    out = []
    for pos in parts:
        p = torch.tensor(pos, dtype=torch.long, device=mask.device)
        out.append(order[p][mask[p]].tolist())
    return out
