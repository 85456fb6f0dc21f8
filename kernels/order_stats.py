"""Coordinate-wise order statistics over the client dimension.

``median`` and ``trimmed_mean`` (Yin et al. 2018) and Bulyan's mean of the ``k`` values closest
to the median (El Mhamdi et al. 2018).

NaN handling: NaN entries are excluded per coordinate (treated as missing), so one NaN row does
not turn the result into NaN; a coordinate whose values are all NaN gives NaN. ``+-inf`` are
ordinary values that the order statistic can trim away.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl

OPS = ("median", "trimmed_mean", "bulyan_mean")


def order_stats_torch(U: torch.Tensor, op: str, k: int = 0) -> torch.Tensor:
    """Coordinate-wise order statistic of ``U`` over rows.

    Args:
        U: ``[N, D]`` updates.
        op: ``median`` (mean of the two middle values for even counts), ``trimmed_mean`` (drop
            the ``k`` largest and ``k`` smallest values per coordinate, average the rest), or
            ``bulyan_mean`` (average the ``k`` values closest to the coordinate's median).
        k: trim count per side for ``trimmed_mean``; number of values kept for ``bulyan_mean``.

    Returns:
        ``[D]`` fp32.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    X = U.float()
    n_valid = (~torch.isnan(X)).sum(dim=0)  # (D,)
    # NaNs sort last with +inf substituted; counts exclude them.
    S, _ = torch.sort(torch.where(torch.isnan(X), torch.full_like(X, float("inf")), X), dim=0)  # (N, D)
    nan_only = n_valid == 0
    n = n_valid.clamp(min=1)
    lo = (n - 1) // 2
    hi = n // 2
    med = 0.5 * (S.gather(0, lo[None]) + S.gather(0, hi[None]))[0]  # (D,)
    if op == "median":
        out = med
    elif op == "trimmed_mean":
        rank = torch.arange(X.shape[0], device=X.device)[:, None]  # (N, 1)
        keep = (rank >= k) & (rank < n - k)  # (N, D)
        cnt = keep.sum(dim=0)
        out = torch.where(keep, S, torch.zeros_like(S)).sum(dim=0) / cnt.clamp(min=1)
        out = torch.where(cnt > 0, out, torch.full_like(out, float("nan")))
    else:
        dist = torch.where(torch.isnan(X), torch.full_like(X, float("inf")), (X - med[None]).abs())
        idx = dist.argsort(dim=0, stable=True)[:k]  # (k, D)
        vals = X.gather(0, idx)
        valid = ~torch.isnan(vals)
        cnt = valid.sum(dim=0)
        out = torch.where(valid, vals, torch.zeros_like(vals)).sum(dim=0) / cnt.clamp(min=1)
    return torch.where(nan_only, torch.full_like(out, float("nan")), out)


def order_stats(U: torch.Tensor, op: str, k: int = 0, impl: str = "auto") -> torch.Tensor:
    """Dispatch to the Triton kernel or :func:`order_stats_torch`."""
    if resolve_impl(impl, U) == "triton":
        from .order_stats import order_stats_triton  # type: ignore[attr-defined]

        return order_stats_triton(U, op, k)
    return order_stats_torch(U, op, k)
