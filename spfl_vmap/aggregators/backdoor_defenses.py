"""Backdoor defenses that replace aggregation: Robust Learning Rate (Ozdayi, Kantarcioglu & Gel,
AAAI 2021) and FoolsGold (Fung, Yoon & Beschastnikh, RAID 2020)."""

from __future__ import annotations

import math

import torch

from spfl_kernels import clip_scale_noise_reduce

from ..errors import ConfigError
from ._base import AGGREGATORS, Rows, check_args, normalise_weights

#: ``state`` keys of :func:`foolsgold`: the client ids seen so far (``[K]`` int64, sorted) and
#: their summed updates (``[K, D]`` fp32, row ``k`` belongs to id ``ids[k]``).
FG_IDS_KEY = "foolsgold.ids"
FG_HISTORY_KEY = "foolsgold.history"


@AGGREGATORS.register("rlr")
def rlr(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    theta: int = 4,
    eta: float = 1.0,
    weighted: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Robust Learning Rate (Ozdayi, Kantarcioglu & Gel 2021, "Defending against Backdoors in
    Federated Learning with Robust Learning Rate").

    Per coordinate ``k`` the server learning rate is ``+eta`` if ``|sum_i sign(U_ik)| >= theta``
    (enough clients agree on the direction) and ``-eta`` otherwise; the aggregate is
    ``lr * weighted_mean(U)``. As in the authors' code (``src/aggregation.py``:
    ``compute_robustLR`` and ``agg_avg``) the mean is weighted by the sample counts and
    ``sign(0) = 0``; with ``eta = 1`` and no flipped coordinate the result is FedAvg's mean, and
    ``theta = 0`` disables the defense. ``theta = 4`` is the authors' value for FMNIST with 10
    agents (``runner.sh``; 8 for CIFAR-10 with 40 agents). Coordinates with ``theta`` above the
    cohort size are always flipped.

    Called directly, a NaN/Inf row makes the result non-finite; use ``aggregate()``.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` sample counts, used when ``weighted``.
        f: unused.
        state: unused.
        generator: unused.
        theta: sign-agreement threshold, ``>= 0``.
        eta: server learning rate magnitude, ``> 0``.
        weighted: weight the mean by ``weights`` (the authors' FedAvg); ``False`` gives the plain
            mean.

    Returns:
        ``([D] aggregate, {"flipped_frac": float})``: the fraction of coordinates whose learning
        rate is ``-eta``.

    Raises:
        ConfigError: ``theta < 0``, ``eta`` not finite and positive, or malformed ``U`` /
            ``weights`` / ``f``.
    """
    check_args(U, weights, f, "rlr")
    return _rlr(Rows(U), weights, theta=theta, eta=eta, weighted=weighted)


def _rlr(R: Rows, weights: torch.Tensor | None, *, theta: int = 4, eta: float = 1.0, weighted: bool = True) -> tuple[torch.Tensor, dict]:
    """:func:`rlr` on rows that may be sharded over processes (see :class:`Rows`): the sign sums
    (integers, exact in any order) and the weighted sum are ``all_reduce``d."""
    if theta < 0:
        raise ConfigError(f"rlr: theta (sign-agreement threshold) must be >= 0, got {theta}")
    if not (math.isfinite(eta) and eta > 0):
        raise ConfigError(f"rlr: eta (server learning rate) must be finite and > 0, got {eta}")
    agreement = R.total(torch.sign(R.X.float()).sum(dim=0)).abs()  # (D,) |sum_i sign(U_ik)|
    keep = agreement >= theta  # (D,)
    lr = torch.where(keep, float(eta), -float(eta))  # (D,)
    w = normalise_weights(weights if weighted else None, R.n, R.X.device)  # (N,)
    avg, _ = clip_scale_noise_reduce(R.X, math.inf, R.local(w), 0.0, 0)  # (D,) weighted mean of the rows here
    out = lr * R.total(avg).float()
    return out.to(R.X.dtype), {"flipped_frac": float((~keep).float().mean()) if keep.numel() else 0.0}


rlr.on_rows = _rlr  # type: ignore[attr-defined]


def foolsgold_weights(H: torch.Tensor, kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-client weights from the clients' update histories.

    Follows the authors' ``foolsgold()`` (``DistributedML/FoolsGold``, ``deep-fg/fg/foolsgold.py``
    and ``ML/code/model_aggregator.py``), vectorized:

    1. ``cs = cos(H_i, H_j) - I`` (a zero history has cosine 0 with everything, as in sklearn);
       the diagonal is taken as exactly ``0`` (``-1`` for a zero history), the value the authors'
       expression has up to rounding. ``maxcs_i = max_j cs_ij`` (diagonal included, as there).
    2. Pardoning: ``cs_ij *= maxcs_i / maxcs_j`` for ``i != j`` where ``maxcs_i < maxcs_j``.
       Where ``maxcs_j = 0`` (only possible when row ``i`` is a zero history, whose ``cs_ij`` is
       0) the entry is left alone; the authors' code divides by zero there.
    3. ``wv = clip(1 - max_j cs_ij, 0, 1)``, divided by its maximum, ``1`` replaced by ``0.99``.
    4. ``wv = clip(kappa * (ln(wv / (1 - wv)) + 0.5), 0, 1)`` (``wv = 0`` gives 0).

    If every ``wv`` is 0 in step 3 (all histories parallel: every client looks like a sybil)
    the authors' code gives NaN; here all weights are 0.

    Args:
        H: ``[N, D]`` histories (summed updates) of this round's clients.
        kappa: the paper's confidence parameter ``kappa > 0`` (the authors' code uses 1).

    Returns:
        ``[N]`` fp32 weights in ``[0, 1]``.
    """
    n = H.shape[0]
    X = H.float()
    norms = X.norm(dim=1)  # (N,)
    nonzero = norms > 0
    Xn = X / torch.where(nonzero, norms, torch.ones_like(norms))[:, None]  # (N, D) unit rows; zero rows stay 0
    cs = Xn @ Xn.T  # (N, N)
    eye = torch.eye(n, dtype=torch.bool, device=H.device)
    cs = torch.where(eye, torch.where(nonzero, 0.0, -1.0)[:, None].expand(n, n), cs)  # cos_ii - 1
    maxcs = cs.max(dim=1).values  # (N,)
    mi, mj = maxcs[:, None], maxcs[None, :]  # (N, 1), (1, N)
    pardon = (mi < mj) & (mj != 0) & ~eye  # (N, N)
    cs = torch.where(pardon, cs * mi / torch.where(pardon, mj, torch.ones_like(mj)), cs)
    wv = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)  # (N,)
    top = wv.max()
    if float(top) <= 0.0:
        return torch.zeros(n, device=H.device)
    wv = wv / top
    wv = torch.where(wv == 1.0, torch.full_like(wv, 0.99), wv)
    logit = kappa * (torch.log(wv / (1.0 - wv)) + 0.5)  # -inf where wv == 0
    return logit.clamp(0.0, 1.0)


def _ids_tensor(client_ids: list[int] | torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Client ids as a ``[N]`` int64 tensor (row positions when ``None``), checked."""
    if client_ids is None:
        return torch.arange(n, device=device)
    try:
        ids = torch.as_tensor(client_ids, device=device)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"foolsgold: client_ids must be a list of ints or an int tensor ({e})") from None
    if ids.dim() != 1 or ids.numel() != n or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ConfigError(f"foolsgold: client_ids must be {n} ints (one per row), got {client_ids!r}")
    ids = ids.long()
    if torch.unique(ids).numel() != n:
        raise ConfigError("foolsgold: client_ids must not repeat an id")
    return ids


def _update_history(state: dict, ids: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """Add this round's rows to the per-id history in ``state``; return the cohort's ``[N, D]`` rows.

    ``state[FG_IDS_KEY]`` stays sorted; ids seen for the first time get a zero history first.
    """
    d, dev = U.shape[1], U.device
    known = state.get(FG_IDS_KEY)
    hist = state.get(FG_HISTORY_KEY)
    if known is None or hist is None:
        known = torch.zeros(0, dtype=torch.long, device=dev)
        hist = torch.zeros(0, d, device=dev)
    known = torch.as_tensor(known, device=dev).long()
    hist = hist.to(device=dev, dtype=torch.float32)
    if hist.dim() != 2 or hist.shape[1] != d or hist.shape[0] != known.numel():
        raise ConfigError(
            f"foolsgold: the history in state has shape {tuple(hist.shape)} for {known.numel()} ids, "
            f"but the updates have D={d}; use a fresh state for a different model"
        )
    new = ids[~torch.isin(ids, known)]  # (n_new,)
    if new.numel():
        merged = torch.sort(torch.cat([known, new])).values  # (K',)
        grown = torch.zeros(merged.numel(), d, device=dev)
        grown[torch.searchsorted(merged, known)] = hist
        known, hist = merged, grown
    rows = torch.searchsorted(known, ids)  # (N,) positions of this cohort's ids
    hist = hist.index_add(0, rows, U.float())
    state[FG_IDS_KEY] = known
    state[FG_HISTORY_KEY] = hist
    return hist[rows]


@AGGREGATORS.register("foolsgold")
def foolsgold(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    client_ids: list[int] | torch.Tensor | None = None,
    kappa: float = 1.0,
    normalize: bool = False,
) -> tuple[torch.Tensor, dict]:
    """FoolsGold (Fung, Yoon & Beschastnikh 2020, "The Limitations of Federated Learning in Sybil
    Settings").

    Sybils pushing the same poisoned objective keep sending similar updates. Each client's
    updates are summed across rounds (its history, kept in ``state`` per client id); the
    clients' pairwise cosine similarities of histories give each client a weight in ``[0, 1]``
    (:func:`foolsgold_weights`, near 0 for a group of near-identical clients, 1 for a client
    unlike every other), and the aggregate is ``sum_i wv_i U_i / N``, the authors' weighting
    (``deep-fg/fg/trainer.py``: the weighted sum divided by the number of clients, so with all
    weights 1 it is the plain mean). ``normalize=True`` divides by ``sum_i wv_i`` instead
    (weights summing to 1, as BackFed does). Sample counts are not used.

    History: row ``i`` of ``U`` belongs to client ``client_ids[i]`` (the engine passes the
    cohort's ids); without ids, rows are keyed by position, which is only meaningful when every
    round has the same clients in the same order. The history is updated before the
    similarities are computed (as in the authors' code); ``state`` holds it as tensors
    (:data:`FG_IDS_KEY` ``[K]`` int64, :data:`FG_HISTORY_KEY` ``[K, D]`` fp32 for the ``K``
    clients seen so far), so it is checkpointable. With ``state=None`` only this round's updates
    are compared (FoolsGold without memory). Similarity uses the whole update; the authors'
    deep-learning code uses the output layer's weights only, and FLPoison's the top 10% of
    them.

    Called directly, a NaN/Inf row poisons the history; use ``aggregate()``, which excludes such
    rows before they reach it.

    Args:
        U: ``[N, D]`` client updates.
        weights: ignored, but must have N entries if given.
        f: unused.
        state: mutable dict kept by the engine across rounds (the history).
        generator: unused.
        client_ids: ``[N]`` distinct client ids of the rows, or ``None`` for row positions.
        kappa: confidence parameter of the logit, ``> 0`` (paper's ``kappa``; 1 in the authors'
            code).
        normalize: divide by the sum of the weights instead of ``N``.

    Returns:
        ``([D] aggregate, metrics)`` with ``scores`` (the ``N`` weights), ``flagged`` (rows with
        weight 0), ``zero_weight`` (their number) and ``weight_min`` / ``weight_mean`` /
        ``weight_max``.

    Raises:
        ConfigError: ``kappa`` not finite and positive, malformed or repeated ``client_ids``, a
            history in ``state`` of another ``D``, or malformed ``U`` / ``weights`` / ``f``.
    """
    check_args(U, weights, f, "foolsgold")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ConfigError(f"foolsgold: kappa must be finite and > 0, got {kappa}")
    n = U.shape[0]
    ids = _ids_tensor(client_ids, n, U.device)
    H = U.float() if state is None else _update_history(state, ids, U)  # (N, D)
    wv = foolsgold_weights(H, kappa)  # (N,)
    denom = float(wv.sum()) if normalize else float(n)
    out = (wv @ U.float()) / denom if denom > 0 else torch.zeros(U.shape[1], device=U.device)
    zero = (wv == 0).nonzero().squeeze(1).tolist()
    metrics = {
        "scores": wv.tolist(),
        "flagged": zero,
        "zero_weight": len(zero),
        "weight_min": float(wv.min()),
        "weight_mean": float(wv.mean()),
        "weight_max": float(wv.max()),
    }
    return out.to(U.dtype), metrics
