"""FLAME (Nguyen et al., "FLAME: Taming Backdoors in Federated Learning", USENIX Security 2022)
and FLTrust (Cao, Fang, Liu & Gong, "FLTrust: Byzantine-robust Federated Learning via Trust
Bootstrapping", NDSS 2021): two backdoor defenses that replace aggregation.

Shapes: ``U [N, D]`` (N client updates of D parameters), ``[N, N]`` pairwise matrices.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spfl_kernels import clip_rows, pairwise_sqdist

from ..errors import ConfigError
from ._base import AGGREGATORS, Rows, check_args, check_clients, default_generator, normalise_weights

FLAME_NOISE = ("paper", "dp", "none")


def cosine_distances(U: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` fp32 cosine distances ``1 - cos(U_i, U_j)`` of the rows of ``U [N, D]``.

    Computed with the pairwise-distance kernel on the unit rows (``|a - b|^2 / 2 = 1 - cos``
    for unit ``a, b``). A zero row has cosine 0 with every other row (distance 1), as in
    scikit-learn's ``cosine_distances``; the diagonal is exactly 0.
    """
    return _cosine_distances(Rows(U))


def _cosine_distances(R: Rows) -> torch.Tensor:
    """:func:`cosine_distances` of rows that may be sharded over processes (see :class:`Rows`):
    the unit rows' distances in per-process blocks, the zero-row flags gathered."""
    X = R.X.float()
    norms = X.norm(dim=1)  # (n_r,)
    here = norms > 0
    unit = X / torch.where(here, norms, torch.ones_like(norms))[:, None]  # (n_r, D)
    d = (Rows(unit.contiguous(), R.n, R.sh, R.parts).sqdist() / 2).clamp(0.0, 2.0)  # (N, N)
    nonzero = R.per_row(here.to(torch.uint8)).bool()  # (N,)
    either_zero = ~(nonzero[:, None] & nonzero[None, :])
    d = torch.where(either_zero, torch.ones_like(d), d)
    d.fill_diagonal_(0.0)
    return d


def hdbscan_majority(distances: torch.Tensor, min_cluster_size: int | None = None) -> tuple[torch.Tensor, int]:
    """FLAME's clustering step: the rows in the largest HDBSCAN cluster.

    scikit-learn's ``HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
    allow_single_cluster=True)`` on the ``[N, N]`` distances, the setting of the peer codes
    (FLPoison, BackFed, zhmzm/FLAME, which use the PyPI ``hdbscan`` package with the same
    parameters). The largest cluster is kept (the lowest label on a tie); if HDBSCAN labels every
    row as noise, every row is kept, as BackFed and zhmzm/FLAME do.

    Args:
        distances: ``[N, N]`` symmetric distances with a zero diagonal, ``N >= 3``.
        min_cluster_size: HDBSCAN's ``min_cluster_size`` (default ``N // 2 + 1``: the kept
            cluster is a majority).

    Returns:
        ``([N] bool mask of the kept rows, number of clusters found)``.
    """
    from sklearn.cluster import HDBSCAN

    n = distances.shape[0]
    m = n // 2 + 1 if min_cluster_size is None else min_cluster_size
    D = distances.detach().double().cpu().numpy()
    D = np.maximum((D + D.T) / 2, 0.0)  # exact symmetry for sklearn
    np.fill_diagonal(D, 0.0)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=m, min_samples=1, allow_single_cluster=True, copy=True).fit_predict(D)
    found = sorted(set(labels.tolist()) - {-1})
    if not found:
        return torch.ones(n, dtype=torch.bool, device=distances.device), 0
    sizes = [(int((labels == c).sum()), -c) for c in found]
    best = -max(sizes)[1]
    return torch.as_tensor(labels == best, device=distances.device), len(found)


@AGGREGATORS.register("flame")
def flame(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    noise: str = "paper",
    lamda: float = 0.001,
    epsilon: float = 3705.0,
    delta: float = 0.001,
    min_cluster_size: int | None = None,
    weighted: bool = False,
) -> tuple[torch.Tensor, dict]:
    """FLAME (Nguyen et al. 2022): cluster, clip to the median norm, add noise.

    1. **Filter**: HDBSCAN on the pairwise cosine distances of the updates
       (:func:`hdbscan_majority`); the rows outside the largest cluster are dropped. The paper
       clusters the local models ``W_i = G + U_i``; every client shares ``G``, so the
       distances here are those of the updates, as in FLPoison (BackFed uses only the last two
       layers). Every row is kept if no cluster is found.
    2. **Clip**: ``S = median_i ||U_i||`` over *all* rows (the paper's median of the Euclidean
       distances to the global model); every kept row is clipped to norm ``S``
       (``spfl_kernels.clip_rows``).
    3. **Aggregate**: the plain mean of the kept, clipped rows (``weighted=True``: weighted by
       the sample counts).
    4. **Noise**: ``N(0, sigma^2 I)`` added to the aggregate, ``sigma = lamda * S``. The
       implementations disagree on ``lamda``; the choices (``noise``):

       * ``"paper"`` (default): ``sigma = lamda * S`` with ``lamda = 0.001``, the paper's value
         for image classification and zhmzm/FLAME's ``--noise 0.001``;
       * ``"dp"``: the paper's (epsilon, delta)-DP form ``lamda = sqrt(2 ln(1.25 / delta)) /
         epsilon`` (``epsilon = 3705`` gives about 0.001 at ``delta = 0.001``);
       * ``"none"``: no noise (filter and clip only).

       FLPoison and BackFed scale the noise of each tensor by the global model's standard
       deviation of that tensor (FLPoison ``lamda = 1.2e-5``); that form needs the global model,
       which an aggregator does not see, and is not offered. With a server learning rate
       ``eta != 1`` the noise on the model is ``eta * sigma``.

    Needs ``N >= 3`` (:func:`~spfl_vmap.aggregators.required_clients`; the config checks the
    cohort, and ``aggregate()`` rejects a round whose non-finite rows leave fewer).

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` sample counts, used when ``weighted``.
        f: unused.
        state: unused.
        generator: source of the noise (``None``: seed 0).
        noise: ``"paper"``, ``"dp"`` or ``"none"``.
        lamda: noise factor of ``"paper"``, ``>= 0``.
        epsilon: privacy parameter of ``"dp"``, ``> 0``.
        delta: privacy parameter of ``"dp"``, in ``(0, 1)``.
        min_cluster_size: HDBSCAN's ``min_cluster_size``, ``>= 2`` (default ``N // 2 + 1``).
        weighted: weight the mean by ``weights``.

    Returns:
        ``([D] aggregate, metrics)``: ``selected`` (kept rows), ``flagged`` (dropped rows),
        ``clusters``, ``clip_bound`` (S), ``clipped`` (kept rows whose norm exceeded S),
        ``noise_std``.

    Raises:
        ConfigError: ``N < 3``, an unknown ``noise``, a negative ``lamda``, ``epsilon`` / ``delta`` out of
            range, ``min_cluster_size < 2``, or malformed ``U`` / ``weights`` / ``f``.
    """
    check_args(U, weights, f, "flame")
    check_clients("flame", U.shape[0], f)
    return _flame(Rows(U), weights, generator=generator, noise=noise, lamda=lamda, epsilon=epsilon, delta=delta,
                  min_cluster_size=min_cluster_size, weighted=weighted)


def _flame(R: Rows, weights: torch.Tensor | None, *, generator: torch.Generator | None = None, noise: str = "paper",
           lamda: float = 0.001, epsilon: float = 3705.0, delta: float = 0.001, min_cluster_size: int | None = None,
           weighted: bool = False) -> tuple[torch.Tensor, dict]:
    """:func:`flame` on rows that may be sharded over processes (see :class:`Rows`): the cosine
    distances in per-process blocks, the norms gathered, the clipped sum ``all_reduce``d; the
    clustering and the noise are the same on every process."""
    if noise not in FLAME_NOISE:
        raise ConfigError(f"flame: noise must be one of {', '.join(FLAME_NOISE)}, got {noise!r}")
    if not (math.isfinite(lamda) and lamda >= 0):
        raise ConfigError(f"flame: lamda must be finite and >= 0, got {lamda}")
    if not (math.isfinite(epsilon) and epsilon > 0) or not (0 < delta < 1):
        raise ConfigError(f"flame: epsilon must be > 0 and delta in (0, 1), got epsilon={epsilon}, delta={delta}")
    if min_cluster_size is not None and min_cluster_size < 2:
        raise ConfigError(f"flame: min_cluster_size must be >= 2, got {min_cluster_size}")
    n, dev = R.n, R.X.device
    keep, clusters = hdbscan_majority(_cosine_distances(R), min(min_cluster_size or n // 2 + 1, n))
    norms = R.per_row(R.X.float().norm(dim=1))  # (N,)
    S = float(norms.quantile(0.5))  # the mean of the middle two for even N, as np.median
    kept = keep.nonzero().squeeze(1)  # (n_kept,)
    mine = R.local(keep.to(dev))  # (n_r,) this process's kept rows
    clipped, kept_norms = clip_rows(R.X[mine].contiguous(), S)  # (n_kept_r, D), (n_kept_r,)
    w = normalise_weights(weights[kept] if (weighted and weights is not None) else None, kept.numel(), dev)  # (n_kept,)
    w_all = torch.zeros(n, dtype=w.dtype, device=dev)
    w_all[kept.to(dev)] = w
    out = R.total(R.local(w_all)[mine] @ clipped.float())  # (D,)
    lam = {"paper": lamda, "dp": math.sqrt(2 * math.log(1.25 / delta)) / epsilon, "none": 0.0}[noise]
    sigma = lam * S
    if sigma > 0:
        g = default_generator(generator)
        out = out + sigma * torch.randn(out.shape, generator=g, device=g.device).to(out.device)
    metrics = {
        "selected": kept.tolist(),
        "flagged": (~keep).nonzero().squeeze(1).tolist(),
        "clusters": clusters,
        "clip_bound": S,
        "clipped": int(R.total((kept_norms > S).sum())),
        "noise_std": sigma,
    }
    return out.to(R.X.dtype), metrics


flame.on_rows = _flame  # type: ignore[attr-defined]


@AGGREGATORS.register("fltrust")
def fltrust(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    server_update: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """FLTrust (Cao et al. 2021): trust scores from the server's own update on a root set.

    With ``g0`` the server's update (trained from the global model on its small clean root set
    with the clients' local procedure; the engine computes it, see ``--root_samples``):

    * trust score ``TS_i = ReLU(cos(U_i, g0))``;
    * each update rescaled to the server's norm, ``U_i * ||g0|| / ||U_i||`` (a zero row stays 0);
    * aggregate ``sum_i TS_i U_i' / sum_i TS_i``; zeros (the model is kept) when every score is 0.

    Sample counts are not used (``weights`` only checked), as in the paper.

    Args:
        U: ``[N, D]`` client updates.
        weights: ignored, but must have N entries if given.
        f: unused.
        state: unused.
        generator: unused.
        server_update: ``[D]`` the server's update ``g0`` (required).

    Returns:
        ``([D] aggregate, metrics)``: ``scores`` (the N trust scores), ``flagged`` (rows with
        score 0), ``server_norm``, ``trust_sum``.

    Raises:
        ConfigError: no ``server_update`` or one of the wrong shape, or malformed ``U`` /
            ``weights`` / ``f``.
    """
    check_args(U, weights, f, "fltrust")
    return _fltrust(Rows(U), weights, server_update=server_update)


def _fltrust(R: Rows, weights: torch.Tensor | None, *, server_update: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """:func:`fltrust` on rows that may be sharded over processes (see :class:`Rows`): the
    scores are per row, the weighted sum and the scores' total ``all_reduce``d."""
    d = R.dim
    if not isinstance(server_update, torch.Tensor) or server_update.reshape(-1).numel() != d:
        got = tuple(server_update.shape) if isinstance(server_update, torch.Tensor) else type(server_update).__name__
        raise ConfigError(f"fltrust: needs server_update, the server's [D={d}] update on its root set "
                          f"(spfl run computes it from --root_samples); got {got}")
    dev = R.X.device
    g0 = server_update.reshape(-1).to(device=dev, dtype=torch.float32)  # (D,)
    X = R.X.float()  # (n_r, D)
    norms = X.norm(dim=1)  # (n_r,)
    g0_norm = g0.norm()
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = (X @ g0) / (safe * torch.where(g0_norm > 0, g0_norm, torch.ones_like(g0_norm)))  # (n_r,) 0 for zero rows
    ts_here = torch.relu(cos)  # (n_r,)
    rescaled = X * (g0_norm / safe)[:, None]  # (n_r, D)
    ts = R.per_row(ts_here)  # (N,)
    total = float(ts.sum())
    out = R.total(ts_here @ rescaled) / total if total > 0 else torch.zeros(d, device=dev)
    metrics = {
        "scores": ts.tolist(),
        "flagged": (ts == 0).nonzero().squeeze(1).tolist(),
        "server_norm": float(g0_norm),
        "trust_sum": total,
    }
    return out.to(R.X.dtype), metrics


fltrust.on_rows = _fltrust  # type: ignore[attr-defined]
