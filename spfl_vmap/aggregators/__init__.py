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
  floats or ints). ``centered_clipping`` (key ``CC_STATE_KEY``) and ``foolsgold`` (keys
  ``FG_IDS_KEY``, ``FG_HISTORY_KEY``) use it.
- ``client_ids``: the ``[N]`` client ids of the rows (``foolsgold`` keys its history by them).
- ``server_update``: the ``[D]`` update of the server on its root set (``fltrust`` only).
- ``generator``: the source of randomness (``dnc``, ``signguard``); ``None`` means a fixed seed 0.
  The global RNG is never used.
- The returned dict holds metrics for the round's log line. ``selected`` / ``flagged`` (and
  ``norm_flagged`` / ``sign_flagged``) are lists of row indices; ``scores`` has one float per row.

Registered names: ``mean``, ``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan``,
``dnc``, ``geomed``, ``centered_clipping``, ``signguard``, ``norm_clip``, and the backdoor
defenses ``rlr``, ``foolsgold``, ``flame`` and ``fltrust`` (which takes the server's root-set
update as the engine keyword ``server_update``).

For the engine, use :func:`aggregate`::

    out, metrics = aggregate(cfg.aggregator, U, weights, f=cfg.f, state=agg_state,
                             generator=rng.generator(seed, "aggregator", round), **cfg.agg_kwargs)
    if metrics["round_rejected"]:
        ...  # keep the global model unchanged this round

It looks the name up, validates the inputs and passes the keyword arguments on: the engine's
``f``, ``state``, ``generator`` and ``client_ids`` (:data:`ENGINE_KWARGS`) are dropped for a rule
that does not take them, but any other key the rule does not take is a
:class:`~spfl_vmap.errors.ConfigError` naming it and listing the rule's hyperparameters (a
misspelled hyperparameter is never ignored), and so is a value of the wrong type (``f="3"``,
``beta="abc"``), a ``U`` that is not a float ``[N, D]`` tensor, or ``weights`` (or
``client_ids``) without one entry per row. It then applies the non-finite policy: a row with any
NaN/Inf entry never reaches the global model. Such rows (and finite rows whose squared norm
overflows fp32, which no distance can handle) are excluded before aggregation
(``nonfinite_excluded`` lists them), ``f`` is lowered by their number (they are counted as
detected Byzantine clients, so e.g. Bulyan's ``n >= 4f+3`` is checked on the remaining rows with
the remaining ``f``), ``client_ids`` is cut to the kept rows, and index metrics are mapped back
to the original row numbers. If every row is non-finite, or the result itself is not finite
(e.g. finite rows that overflow), the aggregate is zeros and ``round_rejected`` is ``True``; so
it is when the rows left are fewer than the rule needs (:func:`required_clients`, with the
lowered ``f``), with ``too_few_rows`` set to their number.
Aggregators called directly do not apply this policy; each docstring says how it treats NaN/Inf
(``median`` and ``trimmed_mean`` tolerate NaN entries natively).

Users of other frameworks can call the rules directly (they check ``U``, ``weights`` and ``f``
too)::

    from spfl_vmap.aggregators import krum
    agg, metrics = krum(U, weights, f=3)

:func:`required_clients` gives the smallest cohort a rule accepts for a given ``f`` (Krum's
``2f + 3``, Bulyan's ``4f + 3``, ...); the rules check their bound through it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ._base import (
    AGGREGATORS,
    ENGINE_KWARGS,
    INDEX_KEYS,
    ROW_KEYS,
    Rows,
    check_clients,
    check_matrix,
    check_weights,
    hyperparameters,
    krum_scores,
    normalise_weights,
    required_clients,
    resolve_kwargs,
    subset_parts,
)
from .averaging import mean, median, trimmed_mean
from .backdoor_defenses import FG_HISTORY_KEY, FG_IDS_KEY, foolsgold, foolsgold_weights, rlr
from .flame import cosine_distances, flame, fltrust, hdbscan_majority
from .clipping import CC_STATE_KEY, centered_clipping, norm_clip
from .distance import bulyan, krum, krum_select, krum_select_batch, multi_krum
from .geometric_median import geomed
from .sign_clustering import mean_shift_labels, signguard
from .spectral import dnc, outlier_scores

__all__ = [
    "AGGREGATORS",
    "CC_STATE_KEY",
    "ENGINE_KWARGS",
    "FG_HISTORY_KEY",
    "FG_IDS_KEY",
    "INDEX_KEYS",
    "Rows",
    "aggregate",
    "bulyan",
    "centered_clipping",
    "cosine_distances",
    "dnc",
    "flame",
    "fltrust",
    "foolsgold",
    "foolsgold_weights",
    "geomed",
    "hdbscan_majority",
    "hyperparameters",
    "krum",
    "krum_scores",
    "krum_select",
    "krum_select_batch",
    "mean",
    "median",
    "multi_krum",
    "norm_clip",
    "required_clients",
    "rlr",
    "check_clients",
    "signguard",
    "subset_parts",
    "trimmed_mean",
]


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
        **kwargs: ``f``, ``state``, ``generator``, ``client_ids`` (dropped if the rule does not
            take them) and the rule's hyperparameters.

    Returns:
        ``([D] aggregate in U's dtype, metrics)``. ``metrics`` always has
        ``nonfinite_excluded`` (list of row indices) and ``round_rejected`` (bool), plus the
        rule's own metrics with row indices referring to ``U``'s rows.

    Raises:
        ConfigError: unknown name; an unknown hyperparameter or a value of the wrong type; ``U``
            not a float ``[N, D]`` tensor; ``weights`` or ``client_ids`` without N entries; or
            parameters the rule refuses (e.g. Bulyan with n < 4f+3).
    """
    fn = AGGREGATORS.get(name)
    who = f"aggregator {name!r}"
    check_matrix(U, who)
    n, d = U.shape
    check_weights(weights, n, who)
    call = resolve_kwargs(fn, kwargs, ENGINE_KWARGS, who)
    ids = call.get("client_ids")
    if ids is not None and (not hasattr(ids, "__len__") or len(ids) != n):
        got = len(ids) if hasattr(ids, "__len__") else type(ids).__name__
        raise ConfigError(f"{who}: client_ids must have one entry per row ({n}), got {got}")
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

    if excluded:
        U = U[kept]
        weights = None if weights is None else weights[kept]
        if "f" in call:
            call["f"] = max(0, int(call["f"]) - len(excluded))
        if ids is not None:
            keep = kept.tolist()
            call["client_ids"] = (
                ids[kept.to(ids.device)] if isinstance(ids, torch.Tensor) else [ids[i] for i in keep]
            )
    if excluded and U.shape[0] < required_clients(name, int(call.get("f", 0)), call):
        # the rows left are too few for the rule (e.g. FLAME's 3): keep the model this round
        return rejected[0], {**rejected[1], "too_few_rows": U.shape[0]}
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
