"""Krum, Multi-Krum and Bulyan on hand-computed inputs (Blanchard et al. 2017; El Mhamdi et al. 2018)."""

import pytest
import torch

from spfl_vmap.aggregators import bulyan, krum, multi_krum
from spfl_vmap.errors import ConfigError


def col(*xs):
    return torch.tensor(xs, dtype=torch.float32)[:, None]


def test_krum_flower_case():
    # Flower's test (strategy/aggregate_test.py): clients 0.2, 0.7, 1.0 with f=0 give 0.7.
    # n - f - 2 = 1 neighbour: scores 0.25, 0.09, 0.09; the tie goes to the lower index.
    out, m = krum(col(0.2, 0.7, 1.0), None, f=0)
    assert m["selected"] == [1]
    torch.testing.assert_close(out, col(0.7)[0])
    torch.testing.assert_close(torch.tensor(m["scores"]), torch.tensor([0.25, 0.09, 0.09]), atol=1e-6, rtol=1e-5)


def test_krum_scores_without_ties():
    # f=1, n=5 -> 2 nearest neighbours. Scores: 0 -> 0.01+0.0625, 0.1 -> 0.01+0.0225,
    # 0.25 -> 0.0225+0.0625, 5 -> 0.04+4.75^2, 5.2 -> 0.04+4.95^2; the minimum is row 1.
    out, m = krum(col(0.0, 0.1, 0.25, 5.0, 5.2), None, f=1)
    assert m["selected"] == [1]
    expected = [0.0725, 0.0325, 0.085, 0.04 + 4.75**2, 0.04 + 4.95**2]
    torch.testing.assert_close(torch.tensor(m["scores"]), torch.tensor(expected), atol=1e-4, rtol=1e-5)


def test_multi_krum_rescoring_differs_from_score_once():
    U = col(0, 1, 4, 7, 8, 10)
    # f=1, n=6 -> 3 neighbours. Scores: 0:1+16+49=66, 1:1+9+36=46, 4:9+9+16=34, 7:1+9+9=19,
    # 8:1+4+16=21, 10:4+9+36=49. Score once, m=2 -> rows 3, 4 (values 7, 8), mean 7.5.
    once, m_once = multi_krum(U, None, f=1, m=2, rescore=False)
    assert sorted(m_once["selected"]) == [3, 4]
    torch.testing.assert_close(once, torch.tensor([7.5]))
    # Re-scored: take 7, then on {0,1,4,8,10} (2 neighbours) scores are 0:1+16=17, 1:1+9=10,
    # 4:9+16=25, 8:4+16=20, 10:4+36=40 -> value 1 (row 1); mean (7+1)/2 = 4.
    it, m_it = multi_krum(U, None, f=1, m=2)
    assert m_it["selected"] == [3, 1]
    torch.testing.assert_close(it, torch.tensor([4.0]))


def test_multi_krum_default_m_and_weighted_average():
    U = col(0.0, 1.0, 2.0, 3.0, 100.0)
    w = torch.tensor([1.0, 1, 1, 5, 1])
    # m = n - 2f = 3. f=1, n=5 -> 2 neighbours: scores 0:1+4, 1:1+1, 2:1+1, 3:1+4, 100:97^2+98^2
    # -> row 1 (tie with 2, lower index); on {0,2,3,100} (1 nbr) 0:4, 2:1, 3:1 -> row 2; on
    # {0,3,100} (1 nbr) 0:9, 3:9 -> row 0. Plain mean of 1, 2, 0 is 1.
    out, m = multi_krum(U, w, f=1)
    assert m["selected"] == [1, 2, 0]
    torch.testing.assert_close(out, torch.tensor([1.0]))
    # m = 4 adds row 3; weighted by (1, 1, 1, 5): (0 + 1 + 2 + 15) / 8
    out_w, m_w = multi_krum(U, w, f=1, m=4, weighted=True)
    assert sorted(m_w["selected"]) == [0, 1, 2, 3]
    torch.testing.assert_close(out_w, torch.tensor([(0 + 1 + 2 + 15) / 8.0]))


@pytest.mark.parametrize("rule", [krum, multi_krum])
def test_krum_never_selects_a_large_sign_flip(rule):
    g = torch.Generator().manual_seed(0)
    n, f, d = 15, 4, 23
    U = 1.0 + 0.1 * torch.randn(n, d, generator=g)
    U[:f] = -10.0 * U[:f]  # scaled sign flip
    _, m = rule(U, None, f=f)
    assert all(i >= f for i in m["selected"])


def test_krum_needs_2f_plus_3():
    with pytest.raises(ConfigError, match="2f\\+3"):
        krum(torch.zeros(6, 2), None, f=2)


def test_bulyan_hand_case():
    # f=1, n=7 -> theta = 5 rows by recursive Krum, beta = 3 values closest to the median.
    # Krum (4 neighbours) picks 2 (score 1+1+4+4=10); then on 6 rows (3 nbrs) 1 and 3 tie at 14
    # -> 1; then (2 nbrs) 3 (1+9); then (1 nbr) 0 and 4 tie at 16 -> 0; then 4 and 50 tie at
    # 46^2 -> 4. Selected values 0..4, median 2, closest three 1, 2, 3 -> 2.
    out, m = bulyan(col(0, 1, 2, 3, 4, 50, -50), None, f=1)
    assert m["selected"] == [2, 1, 3, 0, 4]
    torch.testing.assert_close(out, torch.tensor([2.0]))


def test_bulyan_with_f0_is_the_mean():
    # theta = n and beta = n: every row is selected and every value kept.
    U = torch.arange(12.0).reshape(4, 3)
    torch.testing.assert_close(bulyan(U, None, f=0)[0], U.mean(0))


def test_bulyan_refuses_n_below_4f_plus_3():
    with pytest.raises(ConfigError, match="4f\\+3"):
        bulyan(torch.zeros(10, 3), None, f=2)  # 10 < 4*2+3 = 11
