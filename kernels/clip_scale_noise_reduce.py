"""Per-row L2 clipping, weighting, Gaussian noise and a weighted sum over clients, in one pass.

Used by norm clipping (Sun et al. 2019), DP-FedAvg (McMahan et al. 2018) and weighted FedAvg.
"""

from __future__ import annotations

import math

import torch

from .dispatch import resolve_impl

EPS = 1e-6


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
    factor = (max_norm / (norms + EPS)).clamp(max=1.0)  # (N,)
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
    factor = torch.ones_like(norms) if math.isinf(max_norm) else (max_norm / (norms + EPS)).clamp(max=1.0)
    out = (weights.float() * factor) @ U.float()  # (D,)
    if noise_std > 0:
        g = torch.Generator(device=U.device)
        g.manual_seed(int(seed))
        out = out + noise_std * torch.randn(out.shape, generator=g, device=U.device, dtype=out.dtype)
    return out, norms


def clip_rows(U: torch.Tensor, max_norm: float, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the Triton kernel or :func:`clip_rows_torch`."""
    if resolve_impl(impl, U) == "triton":
        from .clip_scale_noise_reduce import clip_rows_triton  # type: ignore[attr-defined]

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
    """Dispatch to the Triton kernel or :func:`clip_scale_noise_reduce_torch`."""
    if resolve_impl(impl, U) == "triton":
        from .clip_scale_noise_reduce import clip_scale_noise_reduce_triton  # type: ignore[attr-defined]

        return clip_scale_noise_reduce_triton(U, max_norm, weights, noise_std, seed)
    return clip_scale_noise_reduce_torch(U, max_norm, weights, noise_std, seed)
