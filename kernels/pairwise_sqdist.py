"""Pairwise squared Euclidean distances between client updates.

Used by Krum and Multi-Krum (Blanchard et al. 2017), Bulyan (El Mhamdi et al. 2018), DnC and
FLAME. Both implementations form the Gram matrix ``G = U U^T`` and return
``|a|^2 + |b|^2 - 2 a.b`` clamped at 0, with exact zeros on the diagonal. The Triton kernel tiles
the ``[N, N]`` output and loops over ``D``, so ``D`` in the tens of millions needs no extra memory.
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


def pairwise_sqdist_torch(U: torch.Tensor) -> torch.Tensor:
    """Squared distances ``|a|^2 + |b|^2 - 2ab`` with fp32 accumulation, clamped at 0.

    Args:
        U: ``[N, D]`` updates (fp32, or bf16/fp16 which are upcast).

    Returns:
        ``[N, N]`` fp32 distances with exact zeros on the diagonal.
    """
    X = U.float()
    sq = (X * X).sum(dim=1)  # (N,)
    G = X @ X.T  # (N, N)
    d = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_min_(0.0)
    d.fill_diagonal_(0.0)
    return d


if triton is not None:

    @triton.jit
    def _pairwise_sqdist_kernel(
        U,  # (N, D) fp32/bf16/fp16, rows contiguous
        Out,  # (N, N) fp32
        N,
        D,
        stride_u,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One ``[BLOCK_M, BLOCK_N]`` output tile; only tiles on or above the diagonal do work.

        The distance matrix is symmetric, so a program with ``pid_n < pid_m`` does nothing and
        its mirror program stores the tile twice (at ``[m, n]`` and ``[n, m]``), halving the flops.
        """
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        if pid_n >= pid_m:  # a structured if, not an early return: safe on every Triton version
            rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
            rk = tl.arange(0, BLOCK_K)  # (BK,)
            # int64 row offsets: N * D overflows int32 already at N=100, D=25M.
            a_rows = U + rm.to(tl.int64)[:, None] * stride_u  # (BM, 1)
            b_rows = U + rn.to(tl.int64)[:, None] * stride_u  # (BN, 1)
            m_mask = rm[:, None] < N
            n_mask = rn[:, None] < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            sq_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
            sq_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + rk  # (BK,)
                k_mask = kk[None, :] < D
                # Upcast right after the load: bf16 maths is wrong in the interpreter and we want fp32.
                a = tl.load(a_rows + kk[None, :], mask=m_mask & k_mask, other=0.0).to(tl.float32)  # (BM, BK)
                b = tl.load(b_rows + kk[None, :], mask=n_mask & k_mask, other=0.0).to(tl.float32)  # (BN, BK)
                # "ieee": tf32 would lose ~1e-3 relative accuracy and |a|^2 + |b|^2 - 2ab cancels badly.
                acc += tl.dot(a, tl.trans(b), input_precision="ieee")  # (BM, BN)
                sq_m += tl.sum(a * a, axis=1)
                sq_n += tl.sum(b * b, axis=1)
            d = sq_m[:, None] + sq_n[None, :] - 2.0 * acc  # (BM, BN)
            d = tl.maximum(d, 0.0)
            d = tl.where(rm[:, None] == rn[None, :], 0.0, d)
            mask = (rm[:, None] < N) & (rn[None, :] < N)
            rm64 = rm.to(tl.int64)
            rn64 = rn.to(tl.int64)
            tl.store(Out + rm64[:, None] * N + rn64[None, :], d, mask=mask)
            tl.store(Out + rn64[None, :] * N + rm64[:, None], d, mask=mask)  # mirror tile [n, m]


def pairwise_sqdist_triton(
    U: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:
    """Triton version of :func:`pairwise_sqdist_torch`.

    Args:
        U: ``[N, D]`` updates, fp32 or bf16/fp16 (upcast to fp32 in the kernel).
        out: optional ``[N, N]`` fp32 contiguous output buffer (the tests poison it with NaN).
        block_m: output tile rows; ``tl.dot`` needs ``>= 16``.
        block_n: output tile columns; ``>= 16``. Must equal ``block_m`` (mirror stores).
        block_k: reduction chunk over ``D``; ``>= 16``.
        num_warps: warps per program on the GPU.

    Returns:
        ``[N, N]`` fp32 distances with exact zeros on the diagonal.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if U.dim() != 2:
        raise ValueError(f"U must be [N, D], got shape {tuple(U.shape)}")
    if block_m != block_n or min(block_m, block_k) < 16:
        raise ValueError("need block_m == block_n >= 16 and block_k >= 16")
    U = U.contiguous()
    N, D = U.shape
    if out is None:
        out = torch.empty((N, N), dtype=torch.float32, device=U.device)
    if out.shape != (N, N) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous [N, N] fp32 tensor")
    if N == 0:
        return out
    grid = (triton.cdiv(N, block_m), triton.cdiv(N, block_n))
    _pairwise_sqdist_kernel[grid](
        U, out, N, D, U.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps
    )
    return out


def pairwise_sqdist(U: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Dispatch to :func:`pairwise_sqdist_triton` or :func:`pairwise_sqdist_torch`.

    Args:
        U: ``[N, D]`` updates.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere; ``SPFL_IMPL`` overrides), ``"torch"``
            or ``"triton"``.

    Returns:
        ``[N, N]`` fp32 squared distances.
    """
    if resolve_impl(impl, U) == "triton":
        return pairwise_sqdist_triton(U)
    return pairwise_sqdist_torch(U)
