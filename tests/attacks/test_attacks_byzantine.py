"""Byzantine attacks checked against their defining formulas."""

import math
from statistics import NormalDist

import pytest
import torch

from spfl_vmap.aggregators import krum
from spfl_vmap.attacks import ATTACKS, alie_z, attack, data_poison, flip_labels, max_feasible
from spfl_vmap.errors import ConfigError

N, D, C = 12, 40, 3  # clients, parameters, malicious clients (rows 0..2)


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    U = 0.05 + 0.1 * torch.randn(N, D, generator=g)
    mal = torch.zeros(N, dtype=torch.bool)
    mal[:C] = True
    return U, mal


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", ATTACKS.names())
@pytest.mark.parametrize("knowledge", ["omniscient", "partial"])
def test_benign_rows_unchanged_and_input_not_modified(name, knowledge):
    U, mal = setup()
    before = U.clone()
    out, _ = attack(name, U, mal, generator=gen(), knowledge=knowledge, f=C, aggregator="krum")
    torch.testing.assert_close(U, before)  # input untouched
    torch.testing.assert_close(out[~mal], U[~mal])
    assert out.shape == U.shape and out.dtype == U.dtype


def test_unknown_knowledge_and_attack_are_config_errors():
    U, mal = setup()
    with pytest.raises(ConfigError):
        attack("alie", U, mal, knowledge="some")
    with pytest.raises(ConfigError, match="unknown attack"):
        attack("alie2", U, mal)


def test_gaussian_rows_have_the_requested_moments():
    U = torch.zeros(4, 20000)
    mal = torch.tensor([True, True, False, False])
    out, _ = attack("gaussian", U, mal, generator=gen(), sigma=3.0)
    x = out[mal]
    # 40000 N(0, 9) draws: the std of the sample mean is 3/200 = 0.015, of the sample std ~0.011
    assert abs(float(x.mean())) < 5 * 0.015
    assert float(x.std()) == pytest.approx(3.0, rel=0.02)
    out2, _ = attack("gaussian", U, mal, generator=gen())
    assert float(out2[mal].std()) == pytest.approx(200.0, rel=0.02)  # default sigma (Blanchard et al.)


def test_sign_flip_is_minus_scale_times_own_update():
    U, mal = setup()
    out, _ = attack("sign_flip", U, mal, scale=2.5)
    torch.testing.assert_close(out[mal], -2.5 * U[mal])


def test_label_flip_poisons_data_not_updates():
    y = torch.arange(10)
    torch.testing.assert_close(flip_labels(y, 10), 9 - y)
    assert data_poison("label_flip") is flip_labels and data_poison("alie") is None
    U, mal = setup()
    torch.testing.assert_close(attack("label_flip", U, mal)[0], U)


def test_alie_row_is_mean_minus_z_std():
    U, mal = setup()
    out, m = attack("alie", U, mal, f=C)
    # Baruch et al. 2019: s = floor(n/2 + 1) - f = floor(7) - 3 = 4; z = Phi^-1((12 - 4)/12)
    z = NormalDist().inv_cdf(8 / 12)
    assert m["z"] == pytest.approx(z) and alie_z(12, 3) == pytest.approx(z)
    benign = U[~mal]
    torch.testing.assert_close(out[0], benign.mean(0) - z * benign.std(0), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out[mal], out[0].expand(C, D))
    out_z, _ = attack("alie", U, mal, z=1.5)  # explicit override
    torch.testing.assert_close(out_z[1], benign.mean(0) - 1.5 * benign.std(0), atol=1e-6, rtol=1e-5)


def test_ipm_is_minus_epsilon_mean():
    U, mal = setup()
    out, _ = attack("ipm", U, mal, epsilon=0.7)
    torch.testing.assert_close(out[2], -0.7 * U[~mal].mean(0))


@pytest.mark.parametrize("name", ["alie", "ipm", "min_max", "min_sum", "fang"])
def test_partial_knowledge_uses_only_malicious_rows(name):
    U, mal = setup()
    V = U.clone()
    V[~mal] = 100.0 + V[~mal]  # benign rows the attacker cannot see
    kw = dict(knowledge="partial", f=C, aggregator="trimmed_mean")
    a, _ = attack(name, U, mal, generator=gen(), **kw)  # same seed for both calls
    b, _ = attack(name, V, mal, generator=gen(), **kw)
    torch.testing.assert_close(a[mal], b[mal])
    if name == "ipm":
        torch.testing.assert_close(a[0], -0.1 * U[mal].mean(0))


def _sq_dists(m, X):
    return ((X.double() - m.double()) ** 2).sum(1)  # (n,)


def _pairwise(X):
    return torch.cdist(X.double(), X.double()) ** 2  # (n, n)


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("knowledge", ["omniscient", "partial"])
def test_min_max_gamma_is_maximal(perturbation, knowledge):
    U, mal = setup()
    tol = 1e-4
    out, m = attack("min_max", U, mal, perturbation=perturbation, knowledge=knowledge, tol=tol)
    X = U[~mal] if knowledge == "omniscient" else U[mal]
    thr = _pairwise(X).max()
    mu = X.double().mean(0)
    p = (out[0].double() - mu) / m["gamma"]  # the perturbation direction used
    feasible = lambda g: _sq_dists(mu + g * p, X).max() <= thr * (1 + 1e-6)  # noqa: E731
    assert m["gamma"] > 0 and feasible(m["gamma"])
    assert not feasible(m["gamma"] * (1 + tol))  # Shejwalkar & Houmansadr: the largest gamma


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
def test_min_sum_gamma_is_maximal(perturbation):
    U, mal = setup()
    tol = 1e-4
    out, m = attack("min_sum", U, mal, perturbation=perturbation, tol=tol)
    X = U[~mal]
    thr = _pairwise(X).sum(1).max()
    mu = X.double().mean(0)
    p = (out[0].double() - mu) / m["gamma"]
    feasible = lambda g: _sq_dists(mu + g * p, X).sum() <= thr * (1 + 1e-6)  # noqa: E731
    assert feasible(m["gamma"]) and not feasible(m["gamma"] * (1 + tol))


def test_min_max_perturbations_match_definitions():
    U, mal = setup()
    X = U[~mal]
    mu, sd = X.mean(0), X.std(0)
    for kind, p in [("unit_vec", -mu / mu.norm()), ("std", -sd), ("sign", -torch.sign(mu))]:
        out, m = attack("min_max", U, mal, perturbation=kind)
        torch.testing.assert_close(out[0], mu + m["gamma"] * p, atol=1e-5, rtol=1e-5)


def test_max_feasible_brackets_a_known_threshold():
    tol = 1e-6
    g = max_feasible(lambda x: x <= 3.7, tol)
    assert 3.7 / (1 + tol) <= g <= 3.7
    assert max_feasible(lambda x: x <= 0.0, tol) == 0.0


def test_fang_trimmed_mean_variant_lies_beyond_the_benign_extremes():
    U, mal = setup()
    out, m = attack("fang", U, mal, aggregator="trimmed_mean", generator=gen())
    assert m["variant"] == "trimmed_mean"
    X = U[~mal]
    s = torch.sign(X.mean(0))
    w_max, w_min = X.max(0).values, X.min(0).values
    rows = out[mal]
    # Fang et al. 2020 (b = 2): coordinates with s_j > 0 are pushed below w_min, within a factor 2
    up = s <= 0
    lo = torch.where(up, torch.where(w_max > 0, w_max, w_max / 2), torch.where(w_min > 0, w_min / 2, 2 * w_min))
    hi = torch.where(up, torch.where(w_max > 0, 2 * w_max, w_max), w_min)
    assert bool(((rows >= lo - 1e-6) & (rows <= hi + 1e-6)).all())
    assert bool((rows[:, ~up] <= w_min[~up] + 1e-6).all()) and bool((rows[:, up] >= w_max[up] - 1e-6).all())


def test_fang_partial_knowledge_uses_3_to_4_sigma():
    U, mal = setup()
    out, _ = attack("fang", U, mal, knowledge="partial", generator=gen())
    X = U[mal]
    mu, sd = X.mean(0), X.std(0)
    dev = (out[mal] - mu) / sd  # in units of the attacker's own std
    up = mu <= 0
    assert bool(((dev[:, up] >= 3 - 1e-4) & (dev[:, up] <= 4 + 1e-4)).all())
    assert bool(((dev[:, ~up] >= -4 - 1e-4) & (dev[:, ~up] <= -3 + 1e-4)).all())


def test_fang_krum_variant_gets_selected_and_lambda_is_the_first_success():
    U, mal = setup()
    out, m = attack("fang", U, mal, aggregator="krum", f=C)
    assert m["variant"] == "krum" and m["krum_success"]
    s = torch.sign(U[~mal].mean(0))
    torch.testing.assert_close(out[0], -m["lambda"] * s)
    _, mk = krum(out, None, f=C)
    assert mk["selected"][0] < C  # Krum picks a crafted row
    # The halving stopped at the first success: twice lambda (the previous try) fails, unless
    # lambda is already Fang et al.'s upper bound.
    assert m["lambda"] <= m["lambda_max"]
    if not math.isclose(m["lambda"], m["lambda_max"]):
        V = U.clone()
        V[mal] = -2 * m["lambda"] * s
        _, mk2 = krum(V, None, f=C)
        assert mk2["selected"][0] >= C


@pytest.mark.parametrize("name,value", [("nan", float("nan")), ("inf", float("inf"))])
def test_malformed_rows(name, value):
    U, mal = setup()
    out, _ = attack(name, U, mal)
    assert bool(torch.isnan(out[mal]).all()) if name == "nan" else bool((out[mal] == value).all())
