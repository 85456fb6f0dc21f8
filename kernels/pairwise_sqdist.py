"""Pairwise squared Euclidean distances between client updates.

Used by Krum, Multi-Krum, Bulyan, DnC and FLAME. The Triton kernel lands with the kernels issue;
until then the dispatcher always uses the torch twin.
"""

from __future__ import annotations

import torch

from .dispatch import resolve_impl


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


def pairwise_sqdist(U: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Dispatch to the Triton kernel or :func:`pairwise_sqdist_torch`."""
    if resolve_impl(impl, U) == "triton":
        from .pairwise_sqdist import pairwise_sqdist_triton  # type: ignore[attr-defined]

        return pairwise_sqdist_triton(U)
    return pairwise_sqdist_torch(U)
