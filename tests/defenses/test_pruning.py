"""Gradient pruning (Zhu et al. 2019): the vectorized per-layer prune against Soteria's
per-tensor numpy reference, one client at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spfl_vmap.defenses.pruning import prune_per_layer, row_quantile

NUMELS = [37, 5, 120, 11, 1]  # layer sizes, deliberately odd; a one-entry layer too


def reference(U: torch.Tensor, numels: list[int], rate: float) -> torch.Tensor:
    """Soteria ``GS_attack/reconstruct_image.py`` (``--defense prune``), per client:
    ``thresh = np.percentile(|g|, rate); g = np.where(|g| < thresh, 0, g)`` for each tensor."""
    out = []
    for row in U.numpy():
        parts, off = [], 0
        for n in numels:
            g = row[off : off + n]
            thresh = np.percentile(np.abs(g), 100 * rate)
            parts.append(np.where(np.abs(g) < thresh, 0, g))
            off += n
        out.append(np.concatenate(parts))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("rate", [0.1, 0.37, 0.6, 0.95])
def test_prune_equals_per_client_reference(rate):
    U = torch.randn(7, sum(NUMELS), generator=torch.Generator().manual_seed(0))
    out, kept = prune_per_layer(U, NUMELS, rate)
    ref = reference(U, NUMELS, rate)
    assert torch.equal(out, ref)
    assert torch.equal(kept, (ref != 0).to(U.dtype).mean(dim=1))
    for n, lo in zip(NUMELS, np.cumsum([0] + NUMELS[:-1])):
        if n > 1:  # per layer, about (1 - rate) of the entries survive in every row
            frac = (out[:, lo : lo + n] != 0).double().mean(dim=1)
            assert bool((frac >= 1 - rate - 1.0 / n - 1e-9).all() and (frac <= 1 - rate + 1.0 / n + 1e-9).all())


def test_row_quantile_is_numpy_linear():
    a = torch.randn(5, 23, generator=torch.Generator().manual_seed(1))
    for q in (0.0, 0.1, 0.5, 0.77, 1.0):
        expected = np.percentile(a.numpy(), 100 * q, axis=1)
        np.testing.assert_allclose(row_quantile(a, q).numpy(), expected, rtol=1e-6, atol=1e-7)


def test_prune_keeps_nan_visible_and_checks_sizes():
    U = torch.randn(2, 10, generator=torch.Generator().manual_seed(2))
    U[1, 3] = float("nan")
    out, _ = prune_per_layer(U, [10], 0.5)
    assert bool(out[1, 3].isnan())  # the round's divergence check must still see it
    with pytest.raises(ValueError):
        prune_per_layer(U, [4, 5], 0.5)
