"""Gradient pruning against gradient inversion (the pure layer).

Zhu, Liu & Han, "Deep Leakage from Gradients", NeurIPS 2019, section 5: before sharing, each
client sets the gradient entries of small magnitude to zero; with more than about 20% pruned,
DLG's reconstructions are no longer recognisable (their Fig. 7). The defense as coded by
Soteria's ``GS_attack/reconstruct_image.py`` (``--defense prune``, ``--pruning_rate`` in percent)
and breaching: per parameter tensor ``g``, ``t = np.percentile(|g|, rate)`` and
``g[|g| < t] = 0``. Here ``rate`` is a fraction and the quantile is numpy's default (linear
interpolation between order statistics), taken per client and per layer over ``U (N, D)``.
"""

from __future__ import annotations

from typing import Sequence

import torch


def row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q`` quantile of each row, numpy's ``linear`` method: ``a_(k) + f (a_(k+1) - a_(k))``
    with ``k + f = q (n - 1)`` over the sorted row.

    Args:
        a: ``(N, n)`` values.
        q: Quantile in ``[0, 1]``.

    Returns:
        ``(N,)``. Two ``kthvalue`` calls (linear time), not a sort; ``torch.quantile`` refuses
        inputs of more than ``2**24`` entries, which a wide layer times many clients exceeds.
    """
    n = a.shape[1]
    pos = q * (n - 1)
    k = min(int(pos), n - 1)
    f = pos - k
    lo = a.kthvalue(k + 1, dim=1).values  # (N,)
    if f == 0.0 or k + 1 >= n:
        return lo
    hi = a.kthvalue(k + 2, dim=1).values
    return lo + f * (hi - lo)


def prune_per_layer(U: torch.Tensor, numels: Sequence[int], rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero each row's entries whose magnitude is below the ``rate`` quantile of its layer.

    Args:
        U: ``(N, D)`` updates (or gradients), one row per client, layers concatenated in
            ``numels`` order (``ParamSpec.numels``).
        numels: Sizes of the layers (parameter tensors), summing to ``D``.
        rate: Fraction pruned per layer, in ``(0, 1)`` (Soteria's ``--pruning_rate`` / 100).

    Returns:
        ``(U' (N, D), kept (N,))``: the pruned updates and the fraction of each row's entries
        kept. Entries equal to the threshold are kept (``|g| < t`` is pruned), as in the reference.
    """
    if sum(numels) != U.shape[1]:
        raise ValueError(f"layer sizes sum to {sum(numels)}, but U has {U.shape[1]} columns")
    out = torch.empty_like(U)
    kept = torch.zeros(U.shape[0], dtype=torch.long, device=U.device)
    off = 0
    for n in numels:
        seg = U[:, off : off + n]  # (N, n)
        mag = seg.abs()
        t = row_quantile(mag, rate)  # (N,)
        keep = (mag >= t[:, None]) | mag.isnan()  # a NaN stays visible to the round's divergence check
        out[:, off : off + n] = torch.where(keep, seg, torch.zeros_like(seg))
        kept += keep.sum(dim=1)
        off += n
    return out, kept.to(U.dtype) / max(U.shape[1], 1)


__all__ = ["prune_per_layer", "row_quantile"]
