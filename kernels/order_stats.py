"""Coordinate-wise order statistics over the client dimension.

``median`` and ``trimmed_mean`` (Yin et al. 2018) and Bulyan's mean of the ``k`` values closest
to the median (El Mhamdi et al. 2018).

NaN handling: NaN entries are excluded per coordinate (treated as missing), so one NaN row does
not turn the result into NaN; a coordinate whose values are all NaN gives NaN. ``+-inf`` are
ordinary values that the order statistic can trim away.

Ties: the median and trimmed mean depend only on the sorted values, so ties do not matter. Bulyan
keeps the ``k`` values with the smallest ``|x - median|``; equal distances are broken by the lower
row index (a stable sort), and a NaN distance (``inf - inf``) counts as larger than ``inf``, as in
``torch.sort``. The Triton kernel reproduces this rule exactly, so both implementations select the
same rows even with ties.

The Triton kernel ranks values by counting, for each row, how many rows come before it: ``O(N^2)``
comparisons per coordinate with an ``[N, BLOCK_D]`` tile in registers. That suits the tens to a few
hundred clients of a simulation; above :data:`MAX_TRITON_N` rows the launcher falls back to the
torch twin (a sort).
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl

try:  # triton is optional: the torch twin works without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing on this platform
    triton = None
    tl = None

OPS = ("median", "trimmed_mean", "bulyan_mean")

#: Above this many rows ``order_stats_triton`` uses the torch twin: the ``[N, BLOCK_D]`` register
#: tile would force ``BLOCK_D`` below 16 and the ``O(N^2)`` rank counting stops paying off.
MAX_TRITON_N = 256

#: Elements of the ``[N_POW2, BLOCK_D]`` register tile per program (keeps register use bounded).
_TILE_ELEMS = 4096


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
        # summed down each column in row order (a scan): a column's result does not depend on the
        # matrix's width, so a block of columns gives the same bits as the whole (U sharded by
        # columns under torch.distributed); a plain sum(dim=0) vectorizes differently per width
        out = torch.where(keep, S, torch.zeros_like(S)).cumsum(dim=0)[-1] / cnt.clamp(min=1)
        out = torch.where(cnt > 0, out, torch.full_like(out, float("nan")))
    else:
        dist = torch.where(torch.isnan(X), torch.full_like(X, float("inf")), (X - med[None]).abs())
        idx = dist.argsort(dim=0, stable=True)[:k]  # (k, D)
        vals = X.gather(0, idx)
        valid = ~torch.isnan(vals)
        cnt = valid.sum(dim=0)
        out = torch.where(valid, vals, torch.zeros_like(vals)).sum(dim=0) / cnt.clamp(min=1)
    return torch.where(nan_only, torch.full_like(out, float("nan")), out)


if triton is not None:

    @triton.jit
    def _order_stats_kernel(
        U,  # (N, D)
        Out,  # (D,) fp32
        N,
        D,
        stride_u,
        k,
        OP: tl.constexpr,  # 0 median, 1 trimmed_mean, 2 bulyan_mean
        N_POW2: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Order statistic of ``BLOCK_D`` columns; ranks by counting rows that sort before.

        ``rank_i = #{j : x_j < x_i} + #{j < i : x_j == x_i}`` is the position of row ``i`` in a
        stable ascending sort, so each rank is taken by exactly one row and selecting "the row with
        rank r" reproduces ``torch.sort`` / ``argsort(stable=True)`` of the twin.
        """
        pid = tl.program_id(0)
        cols = pid.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,)
        cmask = cols < D
        rows = tl.arange(0, N_POW2)  # (NP,)
        rmask = rows[:, None] < N  # (NP, 1)
        X = tl.load(
            U + rows.to(tl.int64)[:, None] * stride_u + cols[None, :],
            mask=rmask & cmask[None, :],
            other=float("nan"),
        ).to(tl.float32)  # (NP, BD); padding rows are NaN, i.e. missing
        valid = X == X  # (NP, BD)
        n_valid = tl.sum(valid.to(tl.int32), axis=0)  # (BD,)
        Xs = tl.where(valid, X, float("inf"))  # NaN sorts last, as +inf

        # 1. Stable ranks of the values.
        rank = tl.zeros((N_POW2, BLOCK_D), dtype=tl.int32)
        row_ptrs = U + cols  # (BD,) 64-bit pointers, advanced one row per step
        for j in range(0, N):
            xj = tl.load(row_ptrs, mask=cmask, other=0.0).to(tl.float32)  # (BD,)
            xj = tl.where(xj == xj, xj, float("inf"))[None, :]  # (1, BD)
            before = (xj < Xs) | ((xj == Xs) & (j < rows[:, None]))  # (NP, BD)
            rank += before.to(tl.int32)
            row_ptrs += stride_u

        # 2. Median: mean of the values ranked (n - 1) // 2 and n // 2 among the n valid ones.
        n = tl.maximum(n_valid, 1)
        lo = ((n - 1) // 2)[None, :]
        hi = (n // 2)[None, :]
        # Exactly one row has each rank, so these sums add zeros to one value: exact.
        v_lo = tl.sum(tl.where(rmask & (rank == lo), Xs, 0.0), axis=0)  # (BD,)
        v_hi = tl.sum(tl.where(rmask & (rank == hi), Xs, 0.0), axis=0)  # (BD,)
        med = 0.5 * (v_lo + v_hi)  # (BD,)

        if OP == 0:
            out = med
        elif OP == 1:
            # 3a. Trimmed mean: drop ranks below k and at or above n - k.
            keep = rmask & (rank >= k) & (rank < (n - k)[None, :])  # (NP, BD)
            cnt = tl.sum(keep.to(tl.int32), axis=0)
            total = tl.sum(tl.where(keep, Xs, 0.0), axis=0)
            out = tl.where(cnt > 0, total / tl.maximum(cnt, 1).to(tl.float32), float("nan"))
        else:
            # 3b. Bulyan: mean of the k values closest to the median, stable ranks of |x - med|.
            dist = tl.where(valid, tl.abs(X - med[None, :]), float("inf"))  # (NP, BD)
            dist_nan = dist != dist  # inf - inf: sorts after inf, as in torch.sort
            rank2 = tl.zeros((N_POW2, BLOCK_D), dtype=tl.int32)
            row_ptrs = U + cols
            for j in range(0, N):
                xj = tl.load(row_ptrs, mask=cmask, other=0.0).to(tl.float32)  # (BD,)
                dj = tl.where(xj == xj, tl.abs(xj - med), float("inf"))[None, :]  # (1, BD)
                dj_nan = dj != dj
                less = (dj < dist) | ((dj == dj) & dist_nan)
                equal = (dj == dist) | (dj_nan & dist_nan)
                rank2 += (less | (equal & (j < rows[:, None]))).to(tl.int32)
                row_ptrs += stride_u
            pick = rmask & valid & (rank2 < k)  # (NP, BD)
            cnt = tl.sum(pick.to(tl.int32), axis=0)
            total = tl.sum(tl.where(pick, X, 0.0), axis=0)
            out = total / tl.maximum(cnt, 1).to(tl.float32)
        out = tl.where(n_valid > 0, out, float("nan"))
        tl.store(Out + cols, out, mask=cmask)


def order_stats_triton(
    U: torch.Tensor,
    op: str,
    k: int = 0,
    *,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    num_warps: int = 8,
) -> torch.Tensor:
    """Triton version of :func:`order_stats_torch`; falls back to it above ``MAX_TRITON_N`` rows.

    Args:
        U: ``[N, D]`` updates, fp32 or bf16/fp16 (upcast in the kernel).
        op: ``median``, ``trimmed_mean`` or ``bulyan_mean`` (see :func:`order_stats_torch`).
        k: trim count per side (``trimmed_mean``) or number of values kept (``bulyan_mean``).
        out: optional ``[D]`` fp32 contiguous output buffer (also filled on the fallback path).
        block_d: columns per program (a power of two); default keeps the register tile at
            ``_TILE_ELEMS`` elements.
        num_warps: warps per program on the GPU; 8 keeps the rank tiles at ~120 registers per
            thread without spills (ptxas, sm_90, ``N_POW2 * BLOCK_D = 4096``).

    Returns:
        ``[D]`` fp32.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if U.dim() != 2:
        raise ValueError(f"U must be [N, D], got shape {tuple(U.shape)}")
    N, D = U.shape
    if out is None:
        out = torch.empty((D,), dtype=torch.float32, device=U.device)
    if out.shape != (D,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous [D] fp32 tensor")
    if triton is None or N > MAX_TRITON_N or N == 0:
        return out.copy_(order_stats_torch(U, op, k))
    U = U.contiguous()
    n_pow2 = max(16, triton.next_power_of_2(N))
    if block_d is None:
        block_d = max(16, min(1024, _TILE_ELEMS // n_pow2))
    if D > 0:
        _order_stats_kernel[(triton.cdiv(D, block_d),)](
            U, out, N, D, U.stride(0), int(k), OP=OPS.index(op), N_POW2=n_pow2, BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return out


def order_stats(U: torch.Tensor, op: str, k: int = 0, impl: str = "auto") -> torch.Tensor:
    """Dispatch to :func:`order_stats_triton` or :func:`order_stats_torch`.

    Args:
        U: ``[N, D]`` updates.
        op: ``median``, ``trimmed_mean`` or ``bulyan_mean``.
        k: see :func:`order_stats_torch`.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere; ``SPFL_IMPL`` overrides), ``"torch"``
            or ``"triton"``.

    Returns:
        ``[D]`` fp32.
    """
    if resolve_impl(impl, U) == "triton":
        return order_stats_triton(U, op, k)
    return order_stats_torch(U, op, k)
