"""Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021)."""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ._base import AGGREGATORS, check_args, default_generator, normalise_weights, randperm


def outlier_scores(C: torch.Tensor) -> torch.Tensor:
    """Squared projections of the rows of a centred matrix on its top right singular vector.

    With ``C = U S V^T``, the projection of row i on ``v_1`` is ``s_1 u_1[i]``, so the scores are
    the top eigenpair of whichever Gram matrix (``C C^T`` or ``C^T C``) is smaller; that is exact
    and cheaper than a full SVD.

    Args:
        C: ``[N, b]`` centred rows.

    Returns:
        ``[N]`` fp32 scores ``(C v_1)_i^2``.
    """
    Cd = C.double()
    if Cd.shape[0] <= Cd.shape[1]:
        evals, evecs = torch.linalg.eigh(Cd @ Cd.T)  # (N,), (N, N); ascending
        s = evals[-1].clamp_min(0.0) * evecs[:, -1] ** 2
    else:
        _, evecs = torch.linalg.eigh(Cd.T @ Cd)  # (b, b)
        s = (Cd @ evecs[:, -1]) ** 2
    return s.float()


@AGGREGATORS.register("dnc")
def dnc(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    niters: int = 5,
    b: int = 10000,
    c: float = 1.0,
    weighted: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Divide-and-Conquer (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning", Algorithm 2).

    Each of ``niters`` iterations samples ``b`` coordinates at random (with ``generator``),
    centres the ``[N, b]`` sub-matrix, scores each row by its squared projection on the *top*
    right singular vector and removes the ``floor(c * f)`` highest scores. The good set is the
    intersection over iterations; the result is its mean. (The original toolkit scored against all
    singular vectors and used no coordinate sampling.)

    Called directly, a NaN row makes the SVD fail; use ``aggregate()``.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` weights, used only when ``weighted``.
        f: assumed number of Byzantine clients.
        state: unused.
        generator: source of the coordinate subsets; ``None`` uses a fixed seed 0.
        niters: number of random-subset iterations.
        b: coordinates per subset (capped at ``D``).
        c: filtering fraction: ``floor(c * f)`` rows removed per iteration.
        weighted: weight the final mean by ``weights`` instead of the paper's plain mean.

    Returns:
        ``([D] aggregate, {"selected": [good], "flagged": [removed]})``.
    """
    f = check_args(U, weights, f, "dnc")
    n, d = U.shape
    if niters < 1 or b < 1 or c < 0:
        raise ConfigError(f"dnc: needs niters >= 1, b >= 1, c >= 0; got {niters}, {b}, {c}")
    n_remove = min(int(c * f), n - 1)  # always keep at least one row
    g = default_generator(generator)
    X = U.float()
    good = torch.ones(n, dtype=torch.bool, device=U.device)
    if n_remove > 0:
        for _ in range(niters):
            idx = randperm(d, g, U.device)[: min(b, d)]  # (b,)
            sub = X[:, idx]  # (N, b)
            scores = outlier_scores(sub - sub.mean(dim=0))  # (N,)
            good[torch.topk(scores, n_remove).indices] = False
    if not bool(good.any()):  # intersection emptied: fall back to the last iteration's survivors
        good = torch.ones(n, dtype=torch.bool, device=U.device)
        good[torch.topk(scores, n_remove).indices] = False
    sel = good.nonzero().squeeze(1)
    w = normalise_weights(weights[sel] if (weighted and weights is not None) else None, sel.numel(), U.device)
    out = w @ X[sel]  # (D,)
    return out.to(U.dtype), {"selected": sel.tolist(), "flagged": (~good).nonzero().squeeze(1).tolist()}
