"""AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021), its batched Krum simulation, and the
hypergeometric attackers-per-cohort quantile."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from spfl_vmap.aggregators import aggregate, krum, krum_select, krum_select_batch, multi_krum
from spfl_vmap.attacks import AGR_TAL_RULES, attack, attackers_quantile
from spfl_vmap.errors import ConfigError

SHAPES = [(12, 40, 3), (20, 100, 4)]  # (clients N, parameters D, malicious C = rows 0..C-1)


def setup(n=12, d=40, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = 0.05 + 0.1 * torch.randn(n, d, generator=g)
    mal = torch.zeros(n, dtype=torch.bool)
    mal[:c] = True
    return U, mal


def dev(rule, V, ref, f):
    """|AGR(V) - ref|."""
    return float((aggregate(rule, V, None, f=f)[0] - ref).norm())


# --- Krum / Multi-Krum: the crafted rows must be selected -------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_krum_selects_a_crafted_row_and_gamma_is_near_the_boundary(shape, seed):
    n, d, c = shape
    U, mal = setup(n, d, c, seed)
    out, m = attack("agr_tal", U, mal, f=c, aggregator="krum")
    assert m["objective"] == "selection" and m["agr_success"] is True
    assert 0 < m["gamma"] < math.inf
    _, mk = krum(out, None, f=c)
    assert mk["selected"][0] < c  # Krum picks a crafted row
    mu = U[~mal].mean(0)
    # The crafted aggregate moves away from the benign mean; a gamma = 0 row (the mean itself,
    # which Krum also selects) does not move it at all.
    zero = U.clone()
    zero[mal] = mu
    assert dev("krum", out, mu, c) > dev("krum", zero, mu, c) + 1e-3
    # The largest selected gamma (up to tol): twice as far, Krum no longer picks a crafted row.
    p = (out[0] - mu) / m["gamma"]
    far = U.clone()
    far[mal] = mu + 2 * m["gamma"] * p
    assert krum(far, None, f=c)[1]["selected"][0] >= c


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES)
def test_multi_krum_selects_every_crafted_row(shape, seed):
    n, d, c = shape
    U, mal = setup(n, d, c, seed)
    out, m = attack("agr_tal", U, mal, f=c, aggregator="multi_krum")
    assert m["agr_success"] is True and 0 < m["gamma"] < math.inf
    _, mk = multi_krum(out, None, f=c)
    assert set(range(c)) <= set(mk["selected"])  # the authors' criterion: all attackers selected
    mu = U[~mal].mean(0)
    zero = U.clone()
    zero[mal] = mu
    assert dev("multi_krum", out, mu, c) > dev("multi_krum", zero, mu, c)


# --- median / trimmed mean / Bulyan: maximal deviation ----------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_deviation_at_least_min_max_and_gaussian(rule, shape, seed):
    n, d, c = shape
    U, mal = setup(n, d, c, seed)
    out, m = attack("agr_tal", U, mal, f=c, aggregator=rule)
    assert m["objective"] == "deviation" and 0 < m["gamma"] < math.inf
    clean = aggregate(rule, U, None, f=c)[0]  # the aggregate without attack
    mm, _ = attack("min_max", U, mal, f=c, aggregator=rule)  # its defaults: unit_vec, tol 1e-4
    ga, _ = attack("gaussian", U, mal, generator=torch.Generator().manual_seed(seed))
    tal = dev(rule, out, clean, c)
    slack = 1e-6 * tal  # both may saturate the same coordinates: equal up to fp32 rounding
    assert tal >= dev(rule, mm, clean, c) - slack
    assert tal >= dev(rule, ga, clean, c) - slack


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_gamma_maximizes_the_deviation_among_powers_of_two(rule, seed):
    # The objective |AGR(benign + copies) - benign mean| (Shejwalkar & Houmansadr, NDSS 2021)
    # at the chosen gamma is at least its value on every grid point of the search.
    U, mal = setup(seed=seed)
    c = int(mal.sum())
    out, m = attack("agr_tal", U, mal, f=c, aggregator=rule)
    mu = U[~mal].mean(0)
    p = -mu / mu.norm()  # unit_vec
    best = dev(rule, out, mu, c)
    assert best == pytest.approx(m["deviation"], rel=1e-5)
    for k in range(-6, 21):
        V = U.clone()
        V[mal] = mu + 2.0**k * p
        assert best >= dev(rule, V, mu, c) * (1 - 1e-5), k
    # ... and gamma is the smallest such value (up to tol): half of it deviates less.
    V = U.clone()
    V[mal] = mu + 0.5 * m["gamma"] * p
    assert dev(rule, V, mu, c) < best


def test_bulyan_deviation_beats_gamma_zero_and_gaussian():
    U, mal = setup(seed=0)
    f = 2  # n = 12 >= 4f + 3
    out, m = attack("agr_tal", U, mal, f=f, aggregator="bulyan")
    assert m["objective"] == "deviation" and 0 < m["gamma"] < math.inf
    mu = U[~mal].mean(0)
    zero = U.clone()
    zero[mal] = mu
    ga, _ = attack("gaussian", U, mal, generator=torch.Generator().manual_seed(0))
    assert dev("bulyan", out, mu, f) > max(dev("bulyan", zero, mu, f), dev("bulyan", ga, mu, f))


# --- shared properties -------------------------------------------------------------------------


@pytest.mark.parametrize("perturbation", ["unit_vec", "std", "sign"])
@pytest.mark.parametrize("knowledge", ["omniscient", "partial"])
@pytest.mark.parametrize("rule", AGR_TAL_RULES)
def test_rows_are_mean_plus_gamma_p_finite_and_benign_rows_untouched(rule, knowledge, perturbation):
    U, mal = setup()
    before = U.clone()
    f = 2 if rule == "bulyan" else 3
    out, m = attack("agr_tal", U, mal, f=f, aggregator=rule, knowledge=knowledge, perturbation=perturbation)
    torch.testing.assert_close(U, before)  # input not modified
    torch.testing.assert_close(out[~mal], U[~mal], rtol=0, atol=0)
    assert bool(torch.isfinite(out).all()) and out.dtype == U.dtype
    X = U[~mal] if knowledge == "omniscient" else U[mal]
    mu, sd = X.mean(0), X.std(0)
    p = {"unit_vec": -mu / mu.norm(), "std": -sd, "sign": -torch.sign(mu)}[perturbation]
    assert math.isfinite(m["gamma"]) and m["gamma"] >= 0
    torch.testing.assert_close(out[mal], (mu + m["gamma"] * p).expand(int(mal.sum()), -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rule", AGR_TAL_RULES)
def test_partial_knowledge_uses_only_the_malicious_rows(rule):
    U, mal = setup()
    V = U.clone()
    V[~mal] = 100.0 + V[~mal]  # benign rows the attacker cannot see
    f = 2 if rule == "bulyan" else 3
    a, _ = attack("agr_tal", U, mal, f=f, aggregator=rule, knowledge="partial")
    b, _ = attack("agr_tal", V, mal, f=f, aggregator=rule, knowledge="partial")
    torch.testing.assert_close(a[mal], b[mal])


@pytest.mark.parametrize("aggregator", ["mean", "geomed", "dnc", "centered_clipping"])
def test_unsupported_aggregator_is_a_config_error(aggregator):
    U, mal = setup()
    with pytest.raises(ConfigError, match="agr_tal is tailored to krum.*min_max"):
        attack("agr_tal", U, mal, aggregator=aggregator)


def test_bad_hyperparameters_are_config_errors():
    U, mal = setup()
    with pytest.raises(ConfigError, match="perturbation"):
        attack("agr_tal", U, mal, aggregator="median", perturbation="unit")
    with pytest.raises(ConfigError, match="tol"):
        attack("agr_tal", U, mal, aggregator="median", tol=0.0)
    with pytest.raises(ConfigError, match="'gamma'"):
        attack("agr_tal", U, mal, aggregator="median", gamma=1.0)


@pytest.mark.parametrize("n_mal", [0, 12])
def test_no_malicious_or_no_benign_rows_leave_u_unchanged(n_mal):
    U, _ = setup()
    mal = torch.arange(12) < n_mal
    out, m = attack("agr_tal", U, mal, aggregator="krum", f=3)
    torch.testing.assert_close(out, U)
    assert m == {}


def test_large_d_is_evaluated_in_chunks(monkeypatch):
    # Chunking candidates (memory bound) must not change the result.
    import spfl_vmap.attacks.agr_tailored as tal

    U, mal = setup()
    ref, mref = attack("agr_tal", U, mal, f=3, aggregator="trimmed_mean")
    monkeypatch.setattr(tal, "CHUNK_ELEMS", 12 * 40 * 3)  # three candidates per chunk
    out, m = attack("agr_tal", U, mal, f=3, aggregator="trimmed_mean")
    torch.testing.assert_close(out, ref)
    assert m["gamma"] == mref["gamma"]
    assert m["deviation"] == pytest.approx(mref["deviation"], rel=1e-6)  # fp32 sums over other shapes


# --- the batched iterative Krum selection used to simulate Multi-Krum / Bulyan -----------------


@pytest.mark.parametrize("f", [0, 1, 3])
def test_krum_select_batch_matches_one_matrix_at_a_time(f):
    g = torch.Generator().manual_seed(5)
    # Small integers make ties frequent: they must resolve like krum_select (lowest index).
    X = torch.randint(0, 3, (6, 11, 2), generator=g).float()
    D = torch.cdist(X, X) ** 2  # (6, 11, 11)
    m = 11 - 2 * f
    batch = krum_select_batch(D, f, m)
    assert batch.shape == (6, m)
    for k in range(6):
        assert batch[k].tolist() == krum_select(D[k], f, m)


# --- attackers per cohort ----------------------------------------------------------------------


def exact_quantile(population, malicious, cohort, q):
    """Smallest k with P(X <= k) >= q, from the exact pmf C(m,k) C(P-m,c-k) / C(P,c)."""
    total = math.comb(population, cohort)
    cdf = Fraction(0)
    for k in range(0, cohort + 1):
        cdf += Fraction(math.comb(malicious, k) * math.comb(population - malicious, cohort - k), total)
        if cdf >= Fraction(q):
            return k
    raise AssertionError("cdf never reached q")


@pytest.mark.parametrize("q", [0.5, 0.9, 0.99, 0.999])
@pytest.mark.parametrize(
    "population,malicious,cohort", [(100, 10, 10), (100, 20, 10), (1000, 100, 50), (50, 25, 49), (30, 3, 29)]
)
def test_attackers_quantile_matches_the_exact_pmf(population, malicious, cohort, q):
    assert attackers_quantile(population, malicious, cohort, q) == exact_quantile(population, malicious, cohort, q)


def test_attackers_quantile_matches_brute_force_enumeration():
    # All C(10, 5) cohorts of 10 clients with clients 0..2 malicious.
    counts = [sum(i < 3 for i in s) for s in itertools.combinations(range(10), 5)]
    for q in (0.1, 0.5, 0.8, 0.95, 1.0):
        k = min(k for k in range(6) if sum(x <= k for x in counts) >= q * len(counts))
        assert attackers_quantile(10, 3, 5, q) == k


def test_attackers_quantile_edge_cases():
    assert attackers_quantile(100, 0, 10) == 0  # nobody malicious
    assert attackers_quantile(100, 100, 10) == 10  # everybody malicious
    assert attackers_quantile(100, 7, 100) == 7  # the cohort is everyone
    assert attackers_quantile(100, 7, 0) == 0  # empty cohort
    assert attackers_quantile(10, 8, 5, q=0.0) == 3  # at least cohort - benign = 3 are malicious
    assert attackers_quantile(100, 7, 10, q=1.0) == 7  # the support's maximum
    assert attackers_quantile(0, 0, 0) == 0
    for bad in [(10, 11, 5), (10, 3, 11), (-1, 0, 0), (10, 3.0, 5), (10, True, 5)]:
        with pytest.raises(ConfigError):
            attackers_quantile(*bad)
    for q in (-0.1, 1.5, float("nan"), "0.9"):
        with pytest.raises(ConfigError, match="q must be"):
            attackers_quantile(100, 10, 10, q)
