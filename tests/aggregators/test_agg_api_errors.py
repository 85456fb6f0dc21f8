"""The Python API's input checks: a misspelled hyperparameter, a wrong type or a malformed matrix
is a ConfigError, never silently ignored and never a traceback from deep inside a rule.

``aggregate()`` and ``attack()`` share one validator, so both dispatchers are covered here, as is
``required_clients`` (the single home of the cohort-size bounds).
"""

import pytest
import torch

from spfl_vmap.aggregators import (
    AGGREGATORS,
    aggregate,
    bulyan,
    krum,
    mean,
    multi_krum,
    required_clients,
    trimmed_mean,
)
from spfl_vmap.attacks import ATTACKS, attack
from spfl_vmap.errors import ConfigError

ALL = AGGREGATORS.names()


def data(n=9, d=4, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# --- unknown keys ------------------------------------------------------------------------------


def test_misspelled_hyperparameter_is_an_error_naming_it_and_listing_the_accepted_ones():
    U = data()
    with pytest.raises(ConfigError, match=r"'betta'.*beta, k"):
        aggregate("trimmed_mean", U, torch.ones(9), betta=0.1)
    with pytest.raises(ConfigError, match=r"krum.*'tau'.*takes: none"):
        aggregate("krum", U, None, f=2, tau=3.0)


@pytest.mark.parametrize("name", ALL)
def test_engine_kwargs_reach_every_rule_without_error(name):
    extra = {"server_update": torch.ones(4)} if name == "fltrust" else {}
    out, m = aggregate(name, data(15), torch.ones(15), f=2, state={}, generator=torch.Generator().manual_seed(1), **extra)
    assert out.shape == (4,) and m["round_rejected"] is False


def test_engine_kwargs_a_rule_does_not_take_are_dropped_but_typos_are_not(monkeypatch):
    seen = {}

    def plain(U, weights, *, alpha: float = 1.0):
        seen["alpha"] = alpha
        return alpha * U.mean(0), {}

    monkeypatch.setitem(AGGREGATORS._items, "plain", plain)
    U = data()
    out, _ = aggregate("plain", U, None, f=3, state={}, generator=None, alpha=2.0)
    torch.testing.assert_close(out, 2.0 * U.mean(0))
    assert seen == {"alpha": 2.0}
    with pytest.raises(ConfigError, match="'alpah'.*alpha"):
        aggregate("plain", U, None, f=3, alpah=2.0)


def test_direct_call_result_matches_aggregate():
    U = data()
    out, m = aggregate("krum", U, None, f=2, state={}, generator=None)
    ref, mref = krum(U, None, f=2)
    torch.testing.assert_close(out, ref)
    assert m["selected"] == mref["selected"]


# --- value types -------------------------------------------------------------------------------


@pytest.mark.parametrize("f", ["3", 2.5, True, None])
@pytest.mark.parametrize("name", ["mean", "krum", "trimmed_mean"])
def test_f_of_the_wrong_type_is_a_config_error(name, f):
    with pytest.raises(ConfigError, match="f"):
        aggregate(name, data(), None, f=f)
    with pytest.raises(ConfigError, match="f"):
        AGGREGATORS.get(name)(data(), None, f=f)  # the rules check f themselves too


def test_negative_f_is_a_config_error():
    with pytest.raises(ConfigError, match=">= 0"):
        aggregate("median", data(), None, f=-1)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("trimmed_mean", {"beta": "abc"}),
        ("trimmed_mean", {"k": 1.5}),
        ("centered_clipping", {"tau": "big"}),
        ("multi_krum", {"m": "3"}),
        ("multi_krum", {"rescore": "yes"}),
        ("geomed", {"max_iter": 10.0}),
        ("norm_clip", {"max_norm": [1.0]}),
    ],
)
def test_hyperparameter_of_the_wrong_type_is_a_config_error(name, kw):
    key = next(iter(kw))
    with pytest.raises(ConfigError, match=rf"{key} must be"):
        aggregate(name, data(), None, f=1, **kw)


def test_values_of_compatible_types_are_accepted():
    U = data()
    aggregate("trimmed_mean", U, None, f=1, beta=None)  # Optional
    aggregate("centered_clipping", U, None, tau=3)  # an int where a float is expected
    aggregate("geomed", U, None, nu=1e-6, weighted=False)


# --- the update matrix and the weights ---------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_weights_of_the_wrong_length_are_rejected(name):
    U = data(15)
    with pytest.raises(ConfigError, match=r"one entry per row \(\[15\]\)"):
        aggregate(name, U, torch.ones(14), f=1)
    with pytest.raises(ConfigError, match="one entry per row"):
        AGGREGATORS.get(name)(U, torch.ones(16), f=1)  # direct calls, including rules ignoring weights


@pytest.mark.parametrize("rule", [krum, multi_krum, bulyan, mean])
def test_direct_calls_reject_wrong_weights(rule):
    U = data(11)
    with pytest.raises(ConfigError, match="weights"):
        rule(U, torch.ones(10), f=1)
    with pytest.raises(ConfigError, match="weights must be a torch.Tensor"):
        rule(U, [1.0] * 11, f=1)
    with pytest.raises(ConfigError, match="one entry per row"):
        rule(U, torch.ones(11, 1), f=1)


def test_negative_or_non_finite_weights_are_rejected_where_used():
    U = data()
    with pytest.raises(ConfigError, match="non-negative"):
        mean(U, -torch.ones(9))
    with pytest.raises(ConfigError, match="finite"):
        mean(U, torch.full((9,), float("nan")))


@pytest.mark.parametrize(
    "U,match",
    [
        (torch.ones(5), r"\[N, D\].*\(5,\)"),
        (torch.ones(2, 3, 4), r"\[N, D\].*\(2, 3, 4\)"),
        ([[1.0, 2.0], [3.0, 4.0]], "torch.Tensor.*list"),
        (torch.ones(4, 3, dtype=torch.long), "floating-point"),
    ],
)
def test_malformed_update_matrix_is_a_config_error(U, match):
    with pytest.raises(ConfigError, match=match):
        aggregate("median", U, None)
    with pytest.raises(ConfigError, match=match):
        trimmed_mean(U, None)
    with pytest.raises(ConfigError, match=match):
        attack("alie", U, torch.zeros(5, dtype=torch.bool))


def test_empty_matrix_keeps_the_rejected_round_behaviour():
    out, m = aggregate("mean", torch.zeros(0, 3), None, f=0)
    assert m["round_rejected"] is True and out.shape == (3,)


# --- the attack dispatcher ---------------------------------------------------------------------


def attack_data():
    U = 0.1 * data(12, 6)
    mal = torch.zeros(12, dtype=torch.bool)
    mal[:3] = True
    return U, mal


def test_attack_misspelled_hyperparameter_is_an_error():
    U, mal = attack_data()
    with pytest.raises(ConfigError, match=r"attack 'gaussian' has no hyperparameter 'sigm'; it takes: sigma"):
        attack("gaussian", U, mal, sigm=3.0)
    with pytest.raises(ConfigError, match=r"'sigma'.*epsilon"):
        attack("ipm", U, mal, sigma=3.0)  # another attack's hyperparameter is not ipm's


def test_attack_engine_kwargs_are_dropped_when_not_taken(monkeypatch):
    def plain(U, malicious, *, scale: float = 1.0):
        return U * scale, {}

    monkeypatch.setitem(ATTACKS._items, "plain", plain)
    U, mal = attack_data()
    out, _ = attack("plain", U, mal, weights=torch.ones(12), generator=None, knowledge="partial", f=3,
                    aggregator="krum", scale=2.0)
    torch.testing.assert_close(out, 2 * U)
    with pytest.raises(ConfigError, match="'scal'"):
        attack("plain", U, mal, f=3, scal=2.0)


@pytest.mark.parametrize("name", ATTACKS.names())
def test_every_attack_takes_the_engine_kwargs(name):
    U, mal = attack_data()
    out, _ = attack(name, U, mal, weights=torch.ones(12), generator=torch.Generator().manual_seed(0),
                    knowledge="omniscient", f=3, aggregator="trimmed_mean")
    assert out.shape == U.shape


def test_attack_values_of_the_wrong_type_are_config_errors():
    U, mal = attack_data()
    with pytest.raises(ConfigError, match="f must be an int"):
        attack("alie", U, mal, f="3")
    with pytest.raises(ConfigError, match="sigma must be a number"):
        attack("gaussian", U, mal, sigma="abc")
    with pytest.raises(ConfigError, match="knowledge must be a string"):
        attack("alie", U, mal, knowledge=1)
    with pytest.raises(ConfigError, match="one entry per row"):
        attack("alie", U, mal, weights=torch.ones(11))


def test_attack_malicious_mask_is_checked():
    U, mal = attack_data()
    with pytest.raises(ConfigError, match="11 entries for 12 rows"):
        attack("alie", U, mal[:11])
    with pytest.raises(ConfigError, match="not row indices"):
        attack("alie", U, torch.tensor([0, 1, 5] + [0] * 9))
    with pytest.raises(ConfigError, match="torch.Tensor"):
        attack("alie", U, [True] * 12)
    out, _ = attack("alie", U, mal.long())  # a 0/1 mask is fine
    torch.testing.assert_close(out, attack("alie", U, mal)[0])


# --- required_clients --------------------------------------------------------------------------


def test_required_clients_bounds():
    # Blanchard et al. 2017: n >= 2f+3 for f > 0; El Mhamdi et al. 2018: n >= 4f+3.
    assert [required_clients("krum", f) for f in range(4)] == [1, 5, 7, 9]
    assert [required_clients("multi_krum", f) for f in range(4)] == [1, 5, 7, 9]
    assert [required_clients("bulyan", f) for f in range(4)] == [3, 7, 11, 15]
    assert [required_clients("trimmed_mean", f) for f in range(4)] == [1, 3, 5, 7]  # default k = f
    assert required_clients("trimmed_mean", 3, {"k": 1}) == 3
    assert required_clients("trimmed_mean", 3, {"beta": 0.2}) == 1
    assert required_clients("multi_krum", 1, {"m": 8}) == 8
    for name in ("mean", "median", "geomed", "dnc", "signguard", "norm_clip", "centered_clipping"):
        assert required_clients(name, 5) == 1
    with pytest.raises(ConfigError, match="unknown aggregator"):
        required_clients("krumm", 1)
    with pytest.raises(ConfigError, match=">= 0"):
        required_clients("krum", -1)
    with pytest.raises(ConfigError, match="f .*must be an int"):
        required_clients("bulyan", 1.5)
    with pytest.raises(ConfigError, match="m must be an int"):
        required_clients("multi_krum", 1, {"m": "8"})


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("f", [0, 1, 2, 3])
def test_rules_accept_exactly_the_required_cohort(name, f):
    # The rules check their bound through required_clients: n = required works, one fewer fails.
    n = required_clients(name, f)
    extra = {"server_update": torch.ones(4)} if name == "fltrust" else {}
    out, _ = AGGREGATORS.get(name)(data(n, seed=f), None, f=f, **extra)
    assert out.shape == (4,)
    if n > 1:
        with pytest.raises(ConfigError, match="needs n"):
            AGGREGATORS.get(name)(data(n - 1, seed=f), None, f=f, **extra)
