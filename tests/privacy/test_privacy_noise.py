"""Tests for spfl_vmap.privacy.noise: noise scales (checked by moments) and adaptive clipping."""

from __future__ import annotations

import math

import pytest
import torch

from spfl_vmap.errors import ConfigError
from spfl_vmap.privacy.noise import (
    adaptive_clip_noise_multiplier,
    adaptive_clip_update,
    dp_fedavg_noise_std,
    dp_sgd_noise_std,
)


def test_noise_std_values():
    assert dp_sgd_noise_std(1.1, 1.0, 256) == pytest.approx(1.1 / 256)
    assert dp_fedavg_noise_std(1.0, 0.5, 100) == pytest.approx(0.005)
    assert dp_sgd_noise_std(0.0, 1.0, 10) == 0.0  # noise off is allowed


def test_dp_sgd_noise_std_matches_simulated_moments():
    # Abadi et al. 2016: noise N(0, sigma^2 C^2) on the sum, then divide by the expected batch L.
    g = torch.Generator().manual_seed(0)
    sigma, clip, batch = 1.3, 0.7, 64
    noise_on_sum = torch.randn(200_000, generator=g, dtype=torch.float64) * sigma * clip
    averaged = noise_on_sum / batch
    std = dp_sgd_noise_std(sigma, clip, batch)
    assert averaged.mean().item() == pytest.approx(0.0, abs=4 * std / math.sqrt(200_000))
    assert averaged.std().item() == pytest.approx(std, rel=0.01)


def test_noise_std_broadcasts_over_tensors():
    sigmas = torch.tensor([[0.5], [1.0], [2.0]])  # (3, 1) sweep dimension
    clips = torch.tensor([0.1, 1.0])  # (2,)
    out = dp_fedavg_noise_std(sigmas, clips, 50)
    assert out.shape == (3, 2)
    torch.testing.assert_close(out, sigmas * clips / 50)


@pytest.mark.parametrize("bad", [dict(clip=0.0), dict(expected=0), dict(sigma=-1.0)])
def test_noise_std_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        dp_sgd_noise_std(bad.get("sigma", 1.0), bad.get("clip", 1.0), bad.get("expected", 10))


def test_adaptive_clip_update_moves_towards_quantile():
    # Andrew et al. 2021: C <- C * exp(-lr * (b - gamma)).
    assert adaptive_clip_update(1.0, 0.8, 0.5, 0.2) == pytest.approx(math.exp(-0.2 * 0.3))
    assert adaptive_clip_update(1.0, 0.8, 0.5, 0.2) < 1.0  # most updates fit: shrink
    assert adaptive_clip_update(1.0, 0.2, 0.5, 0.2) > 1.0  # most are clipped: grow
    assert adaptive_clip_update(2.0, 0.5, 0.5, 0.2) == 2.0
    c = adaptive_clip_update(torch.tensor([1.0, 2.0]), torch.tensor([0.9, 0.1]), 0.5, 0.2)
    torch.testing.assert_close(c, torch.tensor([math.exp(-0.08), 2 * math.exp(0.08)]))
    with pytest.raises(ConfigError):
        adaptive_clip_update(1.0, 0.5, 1.5, 0.2)


def test_adaptive_clip_noise_multiplier():
    # Andrew et al. 2021: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), e.g. z=1, sigma_b=m/20 large.
    z_delta = adaptive_clip_noise_multiplier(1.0, 5.0)
    assert z_delta == pytest.approx((1.0 - 0.01) ** -0.5)
    assert z_delta > 1.0
    with pytest.raises(ConfigError):
        adaptive_clip_noise_multiplier(1.0, 0.5)
