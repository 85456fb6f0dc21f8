"""Per-row L2 clipping, weighting, Gaussian noise and a weighted sum over clients.

Used by norm clipping (Sun et al. 2019), DP-FedAvg (McMahan et al. 2018) and weighted FedAvg.

The Triton path makes two passes over ``U``: pass 1 computes per-row squared norms (partial sums
per column chunk, added up in a fixed order so the result is deterministic), pass 2 computes the
per-column weighted sum ``sum_i c_i U[i, d]`` with ``c_i = w_i * min(1, max_norm / (|U_i| + EPS))``
and adds Philox Gaussian noise generated in the kernel. The ``[N]`` coefficient vector in between
is computed with torch, exactly as the twin does.
"""

from __future__ import annotations

import math

import torch

from .dispatch import resolve_impl

try:  # triton is optional: the torch twins work without it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing on this platform
    triton = None
    tl = None

EPS = 1e-6


def _clip_factor(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """``min(1, max_norm / (norm + EPS))`` per row; all ones when ``max_norm`` is ``inf``."""
    if math.isinf(max_norm):
        return torch.ones_like(norms)
    return (max_norm / (norms + EPS)).clamp(max=1.0)  # (N,)


def clip_rows_torch(U: torch.Tensor, max_norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip each row of ``U`` to L2 norm ``max_norm`` (``inf`` = no clipping).

    Args:
        U: ``[N, D]`` updates.
        max_norm: clipping threshold.

    Returns:
        ``([N, D] clipped rows, [N] fp32 norms before clipping)``.
    """
    norms = U.float().norm(dim=1)  # (N,)
    if math.isinf(max_norm):
        return U.clone(), norms
    factor = _clip_factor(norms, max_norm)  # (N,)
    return (U.float() * factor[:, None]).to(U.dtype), norms


def clip_scale_noise_reduce_torch(
    U: torch.Tensor,
    max_norm: float,
    weights: torch.Tensor,
    noise_std: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i * clip(U_i) + noise_std * N(0, I)``.

    Args:
        U: ``[N, D]`` updates.
        max_norm: per-row L2 clip threshold; ``inf`` disables clipping.
        weights: ``[N]`` per-row weights (not normalised here).
        noise_std: standard deviation of the Gaussian noise added to the ``[D]`` result.
        seed: seed of the noise; the same seed gives the same noise on the same device.

    Returns:
        ``([D] fp32 result, [N] fp32 row norms before clipping)``.
    """
    norms = U.float().norm(dim=1)  # (N,)
    factor = _clip_factor(norms, max_norm)  # (N,)
    out = (weights.float() * factor) @ U.float()  # (D,)
    if noise_std > 0:
        g = torch.Generator(device=U.device)
        g.manual_seed(int(seed))
        out = out + noise_std * torch.randn(out.shape, generator=g, device=U.device, dtype=out.dtype)
    return out, norms


if triton is not None:

    @triton.jit
    def _row_sqnorm_kernel(
        U,  # (N, D)
        Partial,  # (N, n_chunks) fp32
        D,
        stride_u,
        n_chunks,
        CHUNK: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Pass 1: sum of squares of ``U[row, chunk * CHUNK : (chunk + 1) * CHUNK]``."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = U + row.to(tl.int64) * stride_u
        start = chunk.to(tl.int64) * CHUNK
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, CHUNK, BLOCK_D):
            cols = start + d0 + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            x = tl.load(base + cols, mask=cols < D, other=0.0).to(tl.float32)
            acc += x * x
        tl.store(Partial + row.to(tl.int64) * n_chunks + chunk, tl.sum(acc, axis=0))

    @triton.jit
    def _clip_scale_noise_reduce_kernel(
        U,  # (N, D)
        Coef,  # (N,) fp32: w_i * clip factor_i
        Out,  # (D,) fp32
        N,
        D,
        stride_u,
        noise_std,
        seed,
        ADD_NOISE: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        """Pass 2: ``Out[d] = sum_i Coef[i] * U[i, d] + noise_std * randn(seed, d)``."""
        pid = tl.program_id(0)
        cols = pid.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask = cols < D
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        row_ptrs = U + cols  # (BLOCK_D,) advanced by one row per step: 64-bit pointer maths, no i * stride overflow
        for i in range(0, N):
            c = tl.load(Coef + i)
            x = tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += c * x
            row_ptrs += stride_u
        if ADD_NOISE:
            # Philox counter = column index, so the noise depends only on (seed, d), not on BLOCK_D.
            acc += noise_std * tl.randn(seed, cols.to(tl.int32))
        tl.store(Out + cols, acc, mask=mask)

    @triton.jit
    def _scale_rows_kernel(
        U,  # (N, D)
        Factor,  # (N,) fp32
        Out,  # (N, D), dtype of U
        D,
        stride_u,
        stride_o,
        BLOCK_D: tl.constexpr,
    ):
        """``Out[row, cols] = Factor[row] * U[row, cols]`` in fp32, stored in the output dtype."""
        row = tl.program_id(0)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask = cols < D
        f = tl.load(Factor + row)
        x = tl.load(U + row.to(tl.int64) * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
        y = f * x
        tl.store(Out + row.to(tl.int64) * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


def _row_norms_triton(U: torch.Tensor, block_d: int, chunk: int, num_warps: int) -> torch.Tensor:
    """Pass 1 over ``U`` (contiguous ``[N, D]``): fp32 L2 norm of each row, shape ``[N]``."""
    N, D = U.shape
    chunk = max(block_d, (chunk // block_d) * block_d)  # whole number of blocks per chunk
    n_chunks = max(1, triton.cdiv(D, chunk))
    partial = torch.empty((N, n_chunks), dtype=torch.float32, device=U.device)
    _row_sqnorm_kernel[(N, n_chunks)](
        U, partial, D, U.stride(0), n_chunks, CHUNK=chunk, BLOCK_D=block_d, num_warps=num_warps
    )
    return partial.sum(dim=1).sqrt()  # (N,)


def clip_scale_noise_reduce_triton(
    U: torch.Tensor,
    max_norm: float,
    weights: torch.Tensor,
    noise_std: float,
    seed: int,
    *,
    out: torch.Tensor | None = None,
    norms_out: torch.Tensor | None = None,
    block_d: int = 1024,
    chunk: int = 65536,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`clip_scale_noise_reduce_torch` (two passes over ``U``).

    The noise is Philox (``tl.randn``) keyed on ``(seed, column)``: deterministic per seed but not
    bit-equal to the torch twin's generator.

    Args:
        U: ``[N, D]`` updates, fp32 or bf16/fp16 (upcast in the kernel).
        max_norm: per-row L2 clip threshold; ``inf`` disables clipping.
        weights: ``[N]`` per-row weights (not normalised here).
        noise_std: standard deviation of the Gaussian noise; ``0`` adds none.
        seed: noise seed (taken modulo ``2**31`` so it fits the kernel's int32 argument).
        out: optional ``[D]`` fp32 contiguous output buffer.
        norms_out: optional ``[N]`` fp32 buffer for the row norms.
        block_d: columns per program in both passes.
        chunk: columns per program of pass 1 (rounded to a multiple of ``block_d``).
        num_warps: warps per program on the GPU.

    Returns:
        ``([D] fp32 result, [N] fp32 row norms before clipping)``.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if U.dim() != 2 or weights.shape != (U.shape[0],):
        raise ValueError(f"need U [N, D] and weights [N], got {tuple(U.shape)} and {tuple(weights.shape)}")
    U = U.contiguous()
    N, D = U.shape
    if out is None:
        out = torch.empty((D,), dtype=torch.float32, device=U.device)
    if out.shape != (D,) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("out must be a contiguous [D] fp32 tensor")
    norms = _row_norms_triton(U, block_d, chunk, num_warps)  # (N,)
    if norms_out is not None:
        norms = norms_out.copy_(norms)
    coef = (weights.float() * _clip_factor(norms, max_norm)).contiguous()  # (N,)
    add_noise = noise_std > 0
    _clip_scale_noise_reduce_kernel[(triton.cdiv(D, block_d),)](
        U,
        coef,
        out,
        N,
        D,
        U.stride(0),
        float(noise_std),
        int(seed) % (2**31),
        ADD_NOISE=add_noise,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out, norms


def clip_rows_triton(
    U: torch.Tensor,
    max_norm: float,
    *,
    out: torch.Tensor | None = None,
    block_d: int = 1024,
    chunk: int = 65536,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`clip_rows_torch` (two passes over ``U``: norms, then scaling).

    Args:
        U: ``[N, D]`` updates.
        max_norm: clipping threshold; ``inf`` = no clipping (an exact copy).
        out: optional ``[N, D]`` contiguous output buffer with ``U``'s dtype.
        block_d: columns per program.
        chunk: columns per program of the norm pass.
        num_warps: warps per program on the GPU.

    Returns:
        ``([N, D] clipped rows in U's dtype, [N] fp32 norms before clipping)``.
    """
    if triton is None:  # pragma: no cover
        raise RuntimeError("triton is not installed")
    if U.dim() != 2:
        raise ValueError(f"U must be [N, D], got shape {tuple(U.shape)}")
    U = U.contiguous()
    N, D = U.shape
    if out is None:
        out = torch.empty_like(U)
    if out.shape != U.shape or out.dtype != U.dtype or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor with U's shape and dtype")
    norms = _row_norms_triton(U, block_d, chunk, num_warps)  # (N,)
    factor = _clip_factor(norms, max_norm).contiguous()  # (N,)
    if N > 0 and D > 0:
        _scale_rows_kernel[(N, triton.cdiv(D, block_d))](
            U, factor, out, D, U.stride(0), out.stride(0), BLOCK_D=block_d, num_warps=num_warps
        )
    return out, norms


def clip_rows(U: torch.Tensor, max_norm: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`clip_rows_triton` or :func:`clip_rows_torch`."""
    if resolve_impl(impl, U) == "triton":
        return clip_rows_triton(U, max_norm)
    return clip_rows_torch(U, max_norm)


def clip_scale_noise_reduce(
    U: torch.Tensor,
    max_norm: float,
    weights: torch.Tensor,
    noise_std: float,
    seed: int,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to :func:`clip_scale_noise_reduce_triton` or :func:`clip_scale_noise_reduce_torch`."""
    if resolve_impl(impl, U) == "triton":
        return clip_scale_noise_reduce_triton(U, max_norm, weights, noise_std, seed)
    return clip_scale_noise_reduce_torch(U, max_norm, weights, noise_std, seed)
