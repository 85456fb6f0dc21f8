"""Hand-computable cases for mean, median, trimmed mean and norm clipping."""

import pytest
import torch

from spfl_vmap.aggregators import mean, median, norm_clip, trimmed_mean
from spfl_vmap.errors import ConfigError

T = lambda rows: torch.tensor(rows, dtype=torch.float32)  # noqa: E731


def test_mean_is_weighted_by_sample_counts():
    U = T([[1, 2], [3, 4], [5, 6]])
    out, _ = mean(U, torch.tensor([1.0, 1.0, 2.0]))
    # (1*1 + 1*3 + 2*5) / 4 = 3.5 ; (2 + 4 + 12) / 4 = 4.5
    torch.testing.assert_close(out, T([3.5, 4.5]))


def test_mean_zero_or_missing_weights_mean_uniform():
    U = T([[1, 2], [3, 4], [5, 6]])
    expected = T([3.0, 4.0])  # (1+3+5)/3, (2+4+6)/3
    torch.testing.assert_close(mean(U, torch.zeros(3))[0], expected)
    torch.testing.assert_close(mean(U, None)[0], expected)


def test_median_odd_and_even():
    U = T([[1, 10], [2, 20], [100, -5]])
    # column 0 sorted: 1, 2, 100 -> 2 ; column 1 sorted: -5, 10, 20 -> 10
    torch.testing.assert_close(median(U, None)[0], T([2, 10]))
    # even count: mean of the two middle values (2 + 3) / 2
    torch.testing.assert_close(median(T([[1], [2], [3], [10]]), None)[0], T([2.5]))


def test_median_ignores_weights_and_tolerates_nan_entries():
    U = T([[1.0], [2.0], [float("nan")], [4.0]])
    # NaN is dropped per coordinate: median of 1, 2, 4 is 2
    torch.testing.assert_close(median(U, torch.tensor([100.0, 1, 1, 1]))[0], T([2.0]))


@pytest.mark.parametrize("kw", [{"k": 1}, {"beta": 0.2}, {"f": 1}])
def test_trimmed_mean_k_beta_and_f_default(kw):
    U = T([[1, -3], [2, 0], [3, 0], [4, 3], [100, 1000]])
    # n=5: k=1, floor(0.2*5)=1, and f=1 all trim one value per side.
    # col 0: drop 1 and 100 -> (2+3+4)/3 = 3 ; col 1: drop -3 and 1000 -> (0+0+3)/3 = 1
    out, m = trimmed_mean(U, None, **kw)
    torch.testing.assert_close(out, T([3, 1]))
    assert m["trim_k"] == 1


def test_trimmed_mean_refuses_trimming_everything():
    with pytest.raises(ConfigError, match="n > 2k"):
        trimmed_mean(torch.zeros(4, 2), None, k=2)
    with pytest.raises(ConfigError, match="beta"):
        trimmed_mean(torch.zeros(4, 2), None, beta=0.5)


def test_norm_clip_whole_update_then_weighted_mean():
    U = T([[3, 4], [0, 1]])  # norms 5 and 1
    out, m = norm_clip(U, torch.tensor([1.0, 3.0]), max_norm=1.0)
    # row 0 clipped to (0.6, 0.8); weights 1/4, 3/4 -> (0.15, 0.2 + 0.75) = (0.15, 0.95)
    torch.testing.assert_close(out, T([0.15, 0.95]), atol=1e-5, rtol=1e-5)
    assert m["clipped_frac"] == 0.5


def test_norm_clip_default_threshold_is_median_norm():
    U = T([[3, 4], [0, 1], [0, 2]])  # norms 5, 1, 2 -> median 2
    out, m = norm_clip(U, None)
    assert m["clip_norm"] == pytest.approx(2.0)
    # row 0 -> 2*(0.6, 0.8) = (1.2, 1.6); mean of (1.2,1.6), (0,1), (0,2) = (0.4, 4.6/3)
    torch.testing.assert_close(out, T([0.4, 4.6 / 3]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule", [median, trimmed_mean])
def test_coordinatewise_rules_stay_in_honest_range_under_huge_outliers(rule):
    g = torch.Generator().manual_seed(0)
    n, f, d = 11, 5, 17  # f < n/2
    U = torch.randn(n, d, generator=g)
    U[:f] = 1e6
    out, _ = rule(U, None, f=f)
    honest = U[f:]
    assert bool((out >= honest.min(0).values - 1e-5).all()) and bool((out <= honest.max(0).values + 1e-5).all())
