"""Averaging rules: weighted FedAvg, coordinate-wise median and trimmed mean."""

from __future__ import annotations

import math

import torch

from spfl_kernels import clip_scale_noise_reduce, order_stats

from ..errors import ConfigError
from ._base import AGGREGATORS, Rows, check_args, check_clients, normalise_weights


@AGGREGATORS.register("mean")
def mean(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Weighted mean ``sum_i w_i U_i / sum_i w_i`` (FedAvg, McMahan et al. 2017).

    Not robust: one Byzantine row moves the result arbitrarily far. Called directly, a NaN/Inf
    row makes the result non-finite; :func:`~spfl_vmap.aggregators.aggregate` excludes such rows.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` sample counts or other non-negative weights; ``None`` or all zero means
            uniform.
        f: unused (uniform signature).
        state: unused.
        generator: unused.

    Returns:
        ``([D] aggregate, {})``.
    """
    check_args(U, weights, f, "mean")
    return _mean(Rows(U), weights)


def _mean(R: Rows, weights: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """:func:`mean` on rows that may be sharded over processes (see :class:`Rows`): each
    process's weighted sum, ``all_reduce``d."""
    w = normalise_weights(weights, R.n, R.X.device)  # (N,)
    # The fused kernel with no clipping and no noise is exactly the weighted sum.
    out, _ = clip_scale_noise_reduce(R.X, math.inf, R.local(w), 0.0, 0)
    return R.total(out).to(R.X.dtype), {}


mean.on_rows = _mean  # type: ignore[attr-defined]


@AGGREGATORS.register("median")
def median(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict]:
    """Coordinate-wise median (Yin et al. 2018, "Byzantine-Robust Distributed Learning").

    Unweighted, as in the paper (weights are self-reported in real FL, so a robust rule must not
    trust them). For an even count the two middle values are averaged. Robust to any ``f < N/2``.
    Called directly it tolerates NaN entries natively (they are ignored per coordinate) and Inf
    values (they are ordinary extreme values).

    Args:
        U: ``[N, D]`` client updates.
        weights: ignored.
        f: unused by the rule itself (kept for the uniform signature).
        state: unused.
        generator: unused.

    Returns:
        ``([D] aggregate, {})``.
    """
    check_args(U, weights, f, "median")
    return order_stats(U, "median").to(U.dtype), {}


@AGGREGATORS.register("trimmed_mean")
def trimmed_mean(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    beta: float | None = None,
    k: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    Per coordinate, drop the ``k`` largest and ``k`` smallest values and average the rest
    (unweighted, as in the paper). ``k`` is, in order of precedence: the explicit ``k``;
    ``floor(beta * N)`` when ``beta`` is given; otherwise ``f`` (trim as many per side as there
    may be Byzantine clients). Called directly it ignores NaN entries per coordinate; Inf values
    are trimmed like any extreme value.

    Args:
        U: ``[N, D]`` client updates.
        weights: ignored.
        f: assumed number of Byzantine clients; the default trim count.
        state: unused.
        generator: unused.
        beta: fraction trimmed per side, in ``[0, 0.5)``.
        k: number trimmed per side; needs ``2k < N``.

    Returns:
        ``([D] aggregate, {"trim_k": k})``.

    Raises:
        ConfigError: if ``beta`` is outside ``[0, 0.5)``, ``k < 0`` or ``2k >= N`` (see
            :func:`~spfl_vmap.aggregators.required_clients`).
    """
    f = check_args(U, weights, f, "trimmed_mean")
    n = U.shape[0]
    if k is None:
        if beta is not None:
            if not 0.0 <= beta < 0.5:
                raise ConfigError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
            k = math.floor(beta * n)
        else:
            k = f
    k = int(k)
    if k < 0:
        raise ConfigError(f"trimmed_mean: k (values trimmed per side) must be >= 0, got {k}")
    check_clients("trimmed_mean", n, f, {"k": k})  # n > 2k
    return order_stats(U, "trimmed_mean", k).to(U.dtype), {"trim_k": k}
