"""Tests for spfl_vmap.privacy.accountant: pinned published values, calibration, compression,
per-client accounting, checkpoints, validation and the budget guard."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from spfl_vmap.errors import ConfigError, SpflError
from spfl_vmap.privacy.accountant import (
    ACCOUNTANTS,
    BudgetExceeded,
    ClientAccountants,
    PrivacyAccountant,
    _epsilon_cached,
    calibrate_noise_multiplier,
    check_budget,
    check_delta,
    compute_epsilon,
    default_delta,
    epsilon_from_history,
    would_exceed,
)

MECHANISMS = ["rdp", "prv"]


def exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP Gaussian mechanism (Balle & Wang 2018, Theorem 8)."""

    def gap(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(gap, 0.0, 200.0)


# ---------------------------------------------------------------- published values


def test_registry_names():
    assert ACCOUNTANTS.names() == ["prv", "rdp"]
    with pytest.raises(ConfigError, match="choose one of: prv, rdp"):
        PrivacyAccountant("gdp")


def test_rdp_matches_opacus_published_value():
    # Pinned in pytorch/opacus, opacus/tests/accountants_test.py::test_rdp_accountant:
    # sigma=1.5, q=0.04, steps=int(90/0.04)=2250, delta=1e-5 -> 7.32911117143 (assertAlmostEqual).
    assert compute_epsilon(0.04, 1.5, 2250, 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-7)

    acc = PrivacyAccountant("rdp")
    for _ in range(2250):  # stepped one at a time, like the Opacus test
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert acc.history == [(1.5, 0.04, 2250)]
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(7.32911117143, abs=1e-7)


def test_calibration_matches_opacus_published_sigma():
    # Same file, test_get_noise_multiplier: eps=8, delta=1e-5, q=0.04, 90 epochs -> 1.425307617,
    # found by Opacus with an absolute epsilon tolerance of 0.01. Ours stops within 1% below the
    # target, so its sigma is at most Opacus's and at most ~1% smaller.
    sigma = calibrate_noise_multiplier(8.0, 0.04, 2250, 1e-5, "rdp")
    assert 0.99 * 1.425307617 <= sigma <= 1.425307617 + 1e-9


@pytest.mark.parametrize("sigma,steps", [(1.0, 10), (2.0, 50), (5.0, 100)])
def test_full_batch_matches_exact_gaussian(sigma, steps):
    # q=1: T Gaussian steps compose exactly into one Gaussian with mu = sqrt(T)/sigma.
    exact = exact_gaussian_epsilon(math.sqrt(steps) / sigma, 1e-5)
    prv = compute_epsilon(1.0, sigma, steps, 1e-5, "prv")
    rdp = compute_epsilon(1.0, sigma, steps, 1e-5, "rdp")
    # PRV returns an upper bound within eps_error=0.01 (Gopi et al. 2021); RDP is looser.
    assert exact - 1e-6 <= prv <= exact + 0.03
    assert prv <= rdp


@pytest.mark.parametrize(
    "q,sigma,steps", [(0.04, 1.5, 2250), (0.01, 1.0, 100), (0.1, 0.8, 300), (0.05, 3.0, 20)]
)
def test_prv_is_tighter_than_rdp_but_close(q, sigma, steps):
    rdp = compute_epsilon(q, sigma, steps, 1e-5, "rdp")
    prv = compute_epsilon(q, sigma, steps, 1e-5, "prv")
    assert math.isfinite(prv)
    assert 0.4 * rdp <= prv <= rdp + 0.01


def test_zero_steps_is_zero_epsilon():
    for mech in MECHANISMS:
        assert compute_epsilon(0.1, 1.0, 0, 1e-5, mech) == 0.0
        assert PrivacyAccountant(mech).get_epsilon(1e-5) == 0.0


# ---------------------------------------------------------------- calibration


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibration_within_one_percent_below_target(mechanism, target):
    q, steps, delta = 0.04, 200, 1e-5
    sigma = calibrate_noise_multiplier(target, q, steps, delta, mechanism)
    eps = compute_epsilon(q, sigma, steps, delta, mechanism)
    assert 0.99 * target <= eps <= target


def test_calibration_rejects_impossible_budget():
    with pytest.raises(ConfigError, match="too small"):
        calibrate_noise_multiplier(1e-9, 0.1, 10, 1e-5)
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        calibrate_noise_multiplier(1.0, 0.1, 0, 1e-5)


# ---------------------------------------------------------------- compression


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_compressed_history_equals_step_by_step(mechanism):
    schedule = [(1.0, 0.02)] * 6 + [(2.0, 0.05)] * 3 + [(1.0, 0.02)] * 4
    step_by_step = PrivacyAccountant(mechanism)
    for sigma, q in schedule:
        step_by_step.step(sigma, q)
    assert step_by_step.history == [(1.0, 0.02, 6), (2.0, 0.05, 3), (1.0, 0.02, 4)]

    bulk = PrivacyAccountant(mechanism)
    bulk.step(1.0, 0.02, 10)
    bulk.step(2.0, 0.05, 3)

    # Reference: the library itself on the uncompressed list of 13 single steps.
    if mechanism == "rdp":
        from opacus.accountants import RDPAccountant as Ref
    else:
        from opacus.accountants import PRVAccountant as Ref
    ref = Ref()
    ref.history = [(s, q, 1) for s, q in schedule]
    with np.errstate(all="ignore"):
        expected = float(ref.get_epsilon(delta=1e-5))

    rel = 1e-9 if mechanism == "rdp" else 1e-3  # PRV's mesh depends on how steps are grouped
    assert step_by_step.get_epsilon(1e-5) == pytest.approx(expected, rel=rel)
    assert bulk.get_epsilon(1e-5) == pytest.approx(expected, rel=rel)


def test_ten_thousand_steps_make_one_entry():
    acc = PrivacyAccountant()
    for _ in range(10_000):
        acc.step(1.1, 0.01)
    acc.step(1.1, 0.01, num_steps=0)  # no-op
    assert len(acc) == 1 and acc.total_steps == 10_000
    assert acc.get_epsilon(1e-5) == pytest.approx(compute_epsilon(0.01, 1.1, 10_000, 1e-5))


def test_epsilon_grows_with_steps_and_shrinks_with_noise():
    e = [compute_epsilon(0.05, 1.0, t, 1e-5) for t in (10, 100, 1000)]
    assert e[0] < e[1] < e[2]
    assert compute_epsilon(0.05, 2.0, 100, 1e-5) < e[1]


def test_tensor_and_numpy_scalars_are_accepted():
    acc = PrivacyAccountant()
    acc.step(torch.tensor(1.5), np.float64(0.04), np.int64(2250))
    assert acc.get_epsilon(np.float64(1e-5)) == pytest.approx(7.32911117143, abs=1e-7)


# ---------------------------------------------------------------- per-client accounting


def test_client_accountants_match_compute_epsilon_per_client():
    batch, sizes = 10, {0: 50, 1: 200, 2: 1000, 3: 50}
    accs = ClientAccountants("rdp")
    ids = list(sizes)
    rates = [batch / sizes[c] for c in ids]
    steps = [2 * math.ceil(sizes[c] / batch) for c in ids]  # 2 local epochs
    accs.step(ids, rates, noise_multiplier=1.2, num_steps=steps)  # round 1: all four
    # round 2; float64 tensors keep q exact (float32 would round q by ~1e-8 and split the cache)
    accs.step(torch.tensor([1, 2]), torch.tensor(rates[1:3], dtype=torch.float64), 1.2, steps[1:3])

    eps = accs.epsilons(delta=1e-5)
    assert sorted(eps) == ids
    for c, q, t in zip(ids, rates, steps):
        rounds = 2 if c in (1, 2) else 1
        assert eps[c] == pytest.approx(compute_epsilon(q, 1.2, rounds * t, 1e-5), rel=1e-12)
        assert accs.epsilon(c, 1e-5) == eps[c]
    assert eps[0] == eps[3]  # same data size, same history
    assert accs.history(1) == [(1.2, rates[1], 2 * steps[1])]
    assert accs.epsilon(99, 1e-5) == 0.0 and 99 not in accs

    summary = accs.summary(1e-5)
    values = sorted(eps.values())
    assert summary["eps_min"] == values[0] and summary["eps_max"] == values[-1]
    assert summary["eps_median"] == pytest.approx(float(np.median(values)))


def test_client_accountants_share_computation_across_identical_histories():
    _epsilon_cached.cache_clear()
    n_clients = 1000
    sizes = np.array([40, 80, 160])[np.arange(n_clients) % 3]  # 3 distinct dataset sizes
    accs = ClientAccountants("rdp")
    t0 = time.perf_counter()
    for _ in range(5):  # five rounds, every client each round
        accs.step(np.arange(n_clients), 8 / sizes, 1.0, sizes // 8)
    eps = accs.epsilons(1e-5)
    elapsed = time.perf_counter() - t0
    assert len(eps) == n_clients
    assert _epsilon_cached.cache_info().misses == 3
    assert len(set(eps.values())) == 3
    assert elapsed < 2.0


def test_client_accountants_validate_before_mutating():
    accs = ClientAccountants()
    accs.step([0, 1], [0.1, 0.2], 1.0, 5)
    before = accs.state_dict()
    with pytest.raises(ConfigError):
        accs.step([0, 1], [0.1, 1.5], 1.0, 5)  # second rate invalid
    with pytest.raises(ConfigError, match="duplicates"):
        accs.step([0, 0], 0.1, 1.0, 5)
    with pytest.raises(ConfigError, match="3 values for 2 clients"):
        accs.step([0, 1], [0.1, 0.1, 0.1], 1.0, 5)
    assert accs.state_dict() == before


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_privacy_accountant_state_dict_round_trip(mechanism):
    acc = PrivacyAccountant(mechanism)
    acc.step(1.0, 0.02, 30)
    acc.step(2.0, 0.05, 7)
    state = json.loads(json.dumps(acc.state_dict()))  # plain, JSON-able data
    restored = PrivacyAccountant()
    restored.load_state_dict(state)
    assert restored.mechanism == mechanism
    assert restored.history == acc.history
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    with pytest.raises(ConfigError):
        restored.load_state_dict({"mechanism": "rdp"})
    with pytest.raises(ConfigError):
        restored.load_state_dict({"mechanism": "rdp", "history": [[1.0, 2.0, 3]]})


def test_client_accountants_state_dict_round_trip():
    accs = ClientAccountants("rdp")
    accs.step([3, 7, 11], [0.1, 0.2, 0.1], 1.0, [4, 5, 4])
    accs.step([7], 0.2, 2.0, 3)
    state = json.loads(json.dumps(accs.state_dict()))
    assert len(state["histories"]) == 2  # clients 3 and 11 share one stored history
    restored = ClientAccountants("prv")
    restored.load_state_dict(state)
    assert restored.mechanism == "rdp"
    assert restored.client_ids == [3, 7, 11]
    assert restored.epsilons(1e-5) == accs.epsilons(1e-5)
    restored.step([3], 0.1, 1.0, 1)  # still steppable after loading
    assert restored.history(3) == [(1.0, 0.1, 5)]


# ---------------------------------------------------------------- delta and validation


def test_default_and_checked_delta():
    assert default_delta(50_000) == pytest.approx(2e-5)
    with pytest.warns(UserWarning, match="1/n"):
        check_delta(1e-3, 1000)
    with pytest.warns(UserWarning):
        check_delta(0.5, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_delta(1e-5, 1000) == 1e-5
    with pytest.raises(ConfigError):
        default_delta(0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sample_rate=0.0),
        dict(sample_rate=1.5),
        dict(sample_rate=-0.1),
        dict(noise_multiplier=0.0),
        dict(noise_multiplier=-1.0),
        dict(noise_multiplier=float("inf")),
        dict(steps=-1),
        dict(steps=2.5),
        dict(delta=0.0),
        dict(delta=1.0),
        dict(delta=float("nan")),
        dict(accountant="moments"),
        dict(sample_rate="0.1"),
    ],
)
def test_invalid_inputs_raise_config_error(kwargs):
    args = dict(sample_rate=0.1, noise_multiplier=1.0, steps=10, delta=1e-5, accountant="rdp")
    args.update(kwargs)
    with pytest.raises(ConfigError):
        compute_epsilon(**args)


def test_invalid_step_and_calibration_inputs():
    acc = PrivacyAccountant()
    with pytest.raises(ConfigError):
        acc.step(1.0, 0.1, -3)
    with pytest.raises(ConfigError):
        acc.step(0.0, 0.1)
    with pytest.raises(ConfigError):
        acc.get_epsilon(2.0)
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(-1.0, 0.1, 10, 1e-5)
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(1.0, 0.1, 10, 1e-5, epsilon_tolerance=0.0)
    with pytest.raises(ConfigError):
        epsilon_from_history([(1.0, 0.1, 10), (1.0, 0.0, 1)], 1e-5)
    assert isinstance(ConfigError("x"), SpflError)


# ---------------------------------------------------------------- budget guard


def test_budget_guard_stops_before_the_step_that_exceeds():
    delta, target = 1e-5, 2.0
    acc = PrivacyAccountant()
    per_round = 100
    rounds = 0
    with pytest.raises(BudgetExceeded, match=r"privacy budget exhausted.*above target_epsilon=2"):
        while True:
            check_budget(acc, 1.0, 0.01, per_round, target_epsilon=target, delta=delta)
            acc.step(1.0, 0.01, per_round)
            rounds += 1
    assert rounds > 0
    assert acc.get_epsilon(delta) <= target
    assert acc.epsilon_after(1.0, 0.01, per_round, delta) > target
    assert would_exceed(acc, 1.0, 0.01, per_round, target_epsilon=target, delta=delta)
    assert not would_exceed(acc, 1.0, 0.01, 0, target_epsilon=target, delta=delta)
    assert acc.total_steps == rounds * per_round  # the guard never records steps
    assert issubclass(BudgetExceeded, SpflError)


def test_client_budget_guard_names_the_clients_over_budget():
    accs = ClientAccountants()
    accs.step([0, 1], [0.5, 0.01], 1.0, 100)
    over = accs.would_exceed([0, 1, 2], [0.5, 0.01, 0.01], 1.0, 10, target_epsilon=3.0, delta=1e-5)
    assert over == [0]
    assert accs.history(0) == [(1.0, 0.5, 100)]  # unchanged
