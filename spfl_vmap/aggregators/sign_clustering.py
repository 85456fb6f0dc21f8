"""SignGuard (Xu, Huang, Wei & Tsang 2022)."""

from __future__ import annotations

import torch

from spfl_kernels import clip_rows

from ..errors import ConfigError
from ._base import AGGREGATORS, check_args, default_generator, randperm


def mean_shift_labels(P: torch.Tensor, quantile: float = 0.5, max_iter: int = 50) -> torch.Tensor:
    """Flat-kernel mean-shift clustering seeded at every point; deterministic.

    Follows scikit-learn's ``MeanShift`` (which the SignGuard authors used): the bandwidth ``h``
    is ``estimate_bandwidth``'s, the mean over points of the distance to their
    ``floor(quantile * N)``-th nearest neighbour (the point itself included); every seed climbs
    to a mode; modes are visited by decreasing number of points within ``h`` and a mode within
    ``h`` of an already kept one is dropped; each point takes the label of its nearest kept mode.

    Args:
        P: ``[N, k]`` feature points.
        quantile: bandwidth quantile.
        max_iter: maximum mean-shift iterations.

    Returns:
        ``[N]`` int64 labels in ``[0, n_clusters)``, label 0 being the densest mode.
    """
    n = P.shape[0]
    P = P.double()
    dist = torch.cdist(P, P)  # (N, N)
    kq = min(max(int(n * quantile), 1), n)
    h = max(float(dist.sort(dim=1).values[:, kq - 1].mean()), 1e-12)
    modes = P.clone()
    for _ in range(max_iter):
        W = (torch.cdist(modes, P) <= h).double()  # (N, N) flat kernel
        cnt = W.sum(dim=1, keepdim=True)  # (N, 1)
        new = torch.where(cnt > 0, (W @ P) / cnt.clamp_min(1.0), modes)
        shift = float((new - modes).norm(dim=1).max())
        modes = new
        if shift <= 1e-3 * h:
            break
    intensity = (torch.cdist(modes, P) <= h).sum(dim=1)  # (N,)
    # Stable sort: equal intensities keep seed order, so ties resolve deterministically.
    order = torch.sort(intensity, descending=True, stable=True).indices
    kept: list[torch.Tensor] = []
    # Loop over candidate modes; seeds that converged together are suppressed at once, so this
    # runs once per distinct mode, not once per client.
    alive = torch.ones(n, dtype=torch.bool)
    for i in order.tolist():
        if not alive[i]:
            continue
        kept.append(modes[i])
        alive &= (modes - modes[i]).norm(dim=1).cpu() > h
    centers = torch.stack(kept)  # (C, k)
    return torch.cdist(P, centers).argmin(dim=1)


@AGGREGATORS.register("signguard")
def signguard(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    lower: float = 0.1,
    upper: float = 3.0,
    coord_frac: float = 0.1,
    quantile: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """SignGuard (Xu et al. 2022, "SignGuard: Byzantine-robust Federated Learning through
    Collaborative Malicious Gradient Filtering", ICDCS).

    1. Norm filter: keep rows with ``lower * M < |U_i| < upper * M``, ``M`` the median row norm.
    2. Sign filter: on a random subset of ``coord_frac * D`` coordinates (drawn with
       ``generator``), each row's features are the fractions of positive, zero and negative
       entries, each divided by its maximum over rows (as the authors' code does). A
       deterministic flat mean-shift (:func:`mean_shift_labels`) clusters them; the largest
       cluster is kept (ties: lowest label).
    3. Aggregate: plain mean of the rows kept by both filters, each clipped to norm ``M``.

    If no row passes both filters, the norm filter alone is used, then all rows. Called directly,
    a NaN row makes ``M`` NaN; use ``aggregate()``.

    Args:
        U: ``[N, D]`` client updates.
        weights: ignored (the paper's mean is unweighted).
        f: unused (SignGuard does not need ``f``).
        state: unused.
        generator: source of the coordinate subset; ``None`` uses a fixed seed 0.
        lower: lower norm bound relative to the median norm.
        upper: upper norm bound relative to the median norm.
        coord_frac: fraction of coordinates used for the sign statistics.
        quantile: mean-shift bandwidth quantile.

    Returns:
        ``([D] aggregate, {"selected": [...], "flagged": [...], "norm_flagged": [...],
        "sign_flagged": [...], "clip_norm": float})``.
    """
    check_args(U, weights, f, "signguard")
    n, d = U.shape
    if not (0 <= lower < upper) or not 0 < coord_frac <= 1:
        raise ConfigError(f"signguard: needs 0 <= lower < upper and 0 < coord_frac <= 1; got {lower}, {upper}, {coord_frac}")
    X = U.float()
    norms = X.norm(dim=1)  # (N,)
    M = float(norms.quantile(0.5))
    ok_norm = (norms > lower * M) & (norms < upper * M)  # (N,)
    if M == 0.0:  # all-zero round: nothing to filter by norm
        ok_norm = torch.ones_like(ok_norm)

    g = default_generator(generator)
    idx = randperm(d, g, U.device)[: max(1, int(coord_frac * d))]
    S = torch.sign(X[:, idx])  # (N, k)
    feats = torch.stack([(S > 0).float().mean(1), (S == 0).float().mean(1), (S < 0).float().mean(1)], dim=1)  # (N, 3)
    feats = feats / (feats.max(dim=0).values + 1e-8)
    labels = mean_shift_labels(feats, quantile)  # (N,)
    counts = torch.bincount(labels, minlength=n)
    ok_sign = labels == int(torch.argmax(counts))  # largest cluster; ties: densest mode

    good = ok_norm & ok_sign
    if not bool(good.any()):
        good = ok_norm if bool(ok_norm.any()) else torch.ones_like(ok_norm)
    sel = good.nonzero().squeeze(1)
    clipped, _ = clip_rows(X[sel], M)  # (|sel|, D)
    out = clipped.float().mean(dim=0)

    def idx_list(mask: torch.Tensor) -> list[int]:
        return mask.nonzero().squeeze(1).tolist()

    return out.to(U.dtype), {
        "selected": sel.tolist(),
        "flagged": idx_list(~good),
        "norm_flagged": idx_list(~ok_norm),
        "sign_flagged": idx_list(~ok_sign),
        "clip_norm": M,
    }
