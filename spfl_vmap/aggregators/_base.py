"""Shared pieces of the aggregators: the registry, weight normalisation and Krum scores.

Kept apart from ``__init__`` so that every aggregator module can import the registry without a
circular import.
"""

from __future__ import annotations

import torch

from ..rng import default_generator  # noqa: F401  (re-exported for this package)

from ..errors import ConfigError
from ..registry import Registry

AGGREGATORS: Registry = Registry("aggregator")

# Metric keys whose values are row indices (remapped by ``aggregate()`` when rows are excluded)
# and keys whose values hold one entry per row (expanded with ``None`` for excluded rows).
INDEX_KEYS = ("selected", "flagged", "norm_flagged", "sign_flagged")
ROW_KEYS = ("scores",)


def check_f(f: int, n: int, name: str) -> int:
    """Validate the assumed number of Byzantine clients ``f`` for ``n`` rows."""
    f = int(f)
    if f < 0:
        raise ConfigError(f"{name}: f (assumed Byzantine clients) must be >= 0, got {f}")
    if n < 1:
        raise ConfigError(f"{name}: needs at least one client update, got n={n}")
    return f


def normalise_weights(weights: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """Non-negative weights scaled to sum 1; ``None`` or an all-zero vector means uniform.

    Args:
        weights: ``[N]`` sample counts or any non-negative weights, or ``None``.
        n: number of rows N.
        device: device of the result.

    Returns:
        ``[N]`` fp32 weights summing to 1.
    """
    if weights is None:
        return torch.full((n,), 1.0 / n, device=device)
    w = weights.to(device=device, dtype=torch.float32).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"weights has {w.numel()} entries for {n} rows")
    if bool((w < 0).any()):
        raise ConfigError("aggregator weights must be non-negative")
    total = w.sum()
    if float(total) <= 0.0:
        return torch.full((n,), 1.0 / n, device=device)
    return w / total


def krum_scores(D: torch.Tensor, f: int) -> torch.Tensor:
    """Krum scores from squared distances (Blanchard et al. 2017).

    score(i) = sum of the squared distances from row i to its ``n - f - 2`` nearest *other* rows.
    The neighbour count is clamped to ``[1, n - 1]`` so that small sets (the tail of an iterative
    Multi-Krum/Bulyan selection) still get a defined score.

    Args:
        D: ``[..., n, n]`` squared distances (leading batch dimensions allowed).
        f: assumed number of Byzantine rows.

    Returns:
        ``[..., n]`` fp32 scores (lower is better).
    """
    n = D.shape[-1]
    if n == 1:
        return torch.zeros(D.shape[:-1], dtype=torch.float32, device=D.device)
    k = min(max(n - f - 2, 1), n - 1)
    Dm = D.float().clone()
    Dm.diagonal(dim1=-2, dim2=-1).fill_(float("inf"))  # a row is not its own neighbour
    return torch.topk(Dm, k, dim=-1, largest=False).values.sum(dim=-1)  # (..., n)


def randperm(n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """``torch.randperm`` drawn on the generator's device, moved to ``device``."""
    return torch.randperm(n, generator=generator, device=generator.device).to(device)
