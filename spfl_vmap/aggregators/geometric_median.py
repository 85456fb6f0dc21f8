"""Geometric median by smoothed Weiszfeld (RFA, Pillutla, Kakade & Harchaoui 2022)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._base import AGGREGATORS, check_args, normalise_weights


@AGGREGATORS.register("geomed")
def geomed(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    nu: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-6,
    weighted: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Weighted geometric median ``argmin_v sum_i a_i |v - U_i|`` (Pillutla et al. 2022, "Robust
    Aggregation for Federated Learning", IEEE TSP; RFA).

    Smoothed Weiszfeld: ``beta_i = a_i / max(nu, |v - U_i|)``, ``v <- sum_i beta_i U_i /
    sum_i beta_i``, starting from the weighted mean, until the relative decrease of the objective
    is at most ``tol`` or ``max_iter`` iterations. ``nu > 0`` keeps the step defined when ``v``
    lands on a row. Weighted by sample counts as in RFA.

    Called directly, a NaN/Inf row makes the result non-finite; use ``aggregate()``.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` weights ``a_i`` (normalised inside), used when ``weighted``.
        f: unused.
        state: unused.
        generator: unused.
        nu: smoothing floor of the distances.
        max_iter: maximum Weiszfeld iterations.
        tol: relative objective-change tolerance.
        weighted: use ``weights``; ``False`` gives the unweighted geometric median.

    Returns:
        ``([D] aggregate, {"iterations": int, "objective": float})``.
    """
    check_args(U, weights, f, "geomed")
    n = U.shape[0]
    if nu <= 0 or max_iter < 1:
        raise ConfigError(f"geomed: needs nu > 0 and max_iter >= 1, got {nu}, {max_iter}")
    # fp32 at least; fp64 input stays fp64 (tight tolerances need it).
    X = U.to(torch.promote_types(U.dtype, torch.float32))
    a = normalise_weights(weights if weighted else None, n, U.device).to(X.dtype)  # (N,)
    v = a @ X  # (D,)
    obj = float((a * (X - v).norm(dim=1)).sum())
    it = 0
    for it in range(1, max_iter + 1):
        beta = a / (X - v).norm(dim=1).clamp_min(nu)  # (N,)
        v = (beta @ X) / beta.sum()
        new_obj = float((a * (X - v).norm(dim=1)).sum())
        converged = abs(obj - new_obj) <= tol * max(new_obj, 1e-30)
        obj = new_obj
        if converged:
            break
    return v.to(U.dtype), {"iterations": it, "objective": obj}
