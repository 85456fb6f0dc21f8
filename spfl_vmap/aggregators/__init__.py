"""Robust aggregators: pure functions from the update matrix ``U [N, D]`` to a ``[D]`` vector.

Every aggregator is registered in :data:`AGGREGATORS` by one decorator and has the signature::

    fn(U: Tensor[N, D], weights: Tensor[N] | None, *, f: int = 0, state: dict | None = None,
       generator: torch.Generator | None = None, **own_hyperparameters) -> (Tensor[D], dict)

- ``weights``: sample counts or any non-negative weights (normalised inside; ``None`` or all
  zero means uniform). Only ``mean``, ``norm_clip``, ``geomed`` use them by default; the
  selection rules take ``weighted=True`` to weight their final average, and the coordinate-wise
  rules ignore them (robust rules should not trust self-reported counts).
- ``f``: the assumed number of Byzantine clients.
- ``state``: a mutable dict the engine keeps across rounds and checkpoints (values are tensors,
  floats or ints). Only ``centered_clipping`` uses it (key ``CC_STATE_KEY``).
- ``generator``: the source of randomness (``dnc``, ``signguard``); ``None`` means a fixed seed 0.
  The global RNG is never used.
- The returned dict holds metrics for the round's log line. ``selected`` / ``flagged`` (and
  ``norm_flagged`` / ``sign_flagged``) are lists of row indices; ``scores`` has one float per row.

Registered names: ``mean``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan``,
``dnc``, ``geomed``, ``centered_clipping``, ``signguard``, ``norm_clip``.

For the engine, use :func:`aggregate`::

    out, metrics = aggregate(cfg.aggregator, U, weights, f=cfg.f, state=agg_state,
                             generator=rng.generator(seed, "aggregator", round), **cfg.agg_kwargs)
    if metrics["round_rejected"]:
        ...  # keep the global model unchanged this round

It looks the name up, passes only the keyword arguments the function accepts (so the engine can
pass ``f``, ``state`` and ``generator`` to every rule; an unknown hyperparameter is dropped, not
an error), and applies the non-finite policy: a row with any NaN/Inf entry never reaches the
global model. Such rows (and finite rows whose squared norm overflows fp32, which no distance can
handle) are excluded before aggregation (``nonfinite_excluded`` lists them), ``f``
is lowered by their number (they are counted as detected Byzantine clients, so e.g. Bulyan's
``n >= 4f+3`` is checked on the remaining rows with the remaining ``f``), and index metrics are
mapped back to the original row numbers. If every row is non-finite, or the result itself is not
finite (e.g. finite rows that overflow), the aggregate is zeros and ``round_rejected`` is
``True``. Aggregators called directly do not apply this policy; each docstring says how it treats
NaN/Inf (``median`` and ``trimmed_mean`` tolerate NaN entries natively).

Users of other frameworks can call the rules directly::

    from spfl_vmap.aggregators import krum
    agg, metrics = krum(U, weights, f=3)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch

from ._base import AGGREGATORS, INDEX_KEYS, ROW_KEYS, krum_scores, normalise_weights
from .averaging import mean, median, trimmed_mean
from .clipping import CC_STATE_KEY, centered_clipping, norm_clip
from .distance import bulyan, krum, krum_select, multi_krum
from .geometric_median import geomed
from .sign_clustering import mean_shift_labels, signguard
from .spectral import dnc, outlier_scores

__all__ = [
    "AGGREGATORS",
    "CC_STATE_KEY",
    "aggregate",
    "accepted_kwargs",
    "bulyan",
    "centered_clipping",
    "dnc",
    "geomed",
    "krum",
    "krum_scores",
    "krum_select",
    "mean",
    "median",
    "multi_krum",
    "norm_clip",
    "signguard",
    "trimmed_mean",
]


@functools.lru_cache(maxsize=None)
def _params(fn: Callable) -> tuple[frozenset[str], bool]:
    ps = inspect.signature(fn).parameters.values()
    return frozenset(p.name for p in ps), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps)


def accepted_kwargs(fn: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``fn`` accepts (all of them if it takes ``**kwargs``)."""
    names, var_kw = _params(fn)
    return dict(kwargs) if var_kw else {k: v for k, v in kwargs.items() if k in names}


def aggregate(
    name: str,
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict]:
    """Run the registered aggregator ``name`` with the non-finite-row policy.

    Args:
        name: registry name (see :data:`AGGREGATORS`).
        U: ``[N, D]`` client updates.
        weights: ``[N]`` non-negative weights, or ``None`` for uniform.
        **kwargs: ``f``, ``state``, ``generator`` and the rule's hyperparameters; keys the rule
            does not accept are dropped.

    Returns:
        ``([D] aggregate in U's dtype, metrics)``. ``metrics`` always has
        ``nonfinite_excluded`` (list of row indices) and ``round_rejected`` (bool), plus the
        rule's own metrics with row indices referring to ``U``'s rows.

    Raises:
        ConfigError: unknown name, or parameters the rule refuses (e.g. Bulyan with n < 4f+3).
    """
    fn = AGGREGATORS.get(name)
    n, d = U.shape
    # A NaN/Inf entry makes the squared norm non-finite, and so does a finite row too large for
    # distances to be representable (|x| > ~1.8e19 in fp32); both kinds are malformed.
    X = U.float()
    finite = torch.isfinite(torch.einsum("nd,nd->n", X, X))  # (N,)
    kept = finite.nonzero().squeeze(1)  # (n_kept,)
    excluded = (~finite).nonzero().squeeze(1).tolist()
    metrics: dict[str, Any] = {"nonfinite_excluded": excluded, "round_rejected": False}
    rejected = (torch.zeros(d, dtype=U.dtype, device=U.device), {**metrics, "round_rejected": True})
    if kept.numel() == 0:
        return rejected

    call = accepted_kwargs(fn, kwargs)
    if excluded:
        U = U[kept]
        weights = None if weights is None else weights[kept]
        if "f" in call:
            call["f"] = max(0, int(call["f"]) - len(excluded))
    out, own = fn(U, weights, **call)
    if not bool(torch.isfinite(out).all()):
        return rejected

    if excluded:
        kept_list = kept.tolist()
        own = dict(own)
        for key in INDEX_KEYS:
            if key in own:
                own[key] = [kept_list[i] for i in own[key]]
        for key in ROW_KEYS:
            if key in own:
                full: list[Any] = [None] * n
                for i, v in zip(kept_list, own[key]):
                    full[i] = v
                own[key] = full
    metrics.update(own)
    return out, metrics
