"""Backdoor defenses that replace aggregation: RLR (Ozdayi et al. 2021) and FoolsGold (Fung et al.
2020), checked against plain per-coordinate / per-client Python references."""

from __future__ import annotations

import io
import math

import pytest
import torch

from spfl_vmap.aggregators import (
    AGGREGATORS,
    FG_HISTORY_KEY,
    FG_IDS_KEY,
    aggregate,
    foolsgold,
    foolsgold_weights,
    mean,
    rlr,
)
from helpers import Killed, kill_at, small_config
from spfl_vmap import run
from spfl_vmap.errors import ConfigError


def data(n=7, d=13, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def counts(n=7, seed=1):
    return torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(seed)).float()


# --- references (per coordinate / per client, float64, plain Python) ---------------------------


def rlr_reference(U, weights, theta, eta):
    n, d = U.shape
    rows = U.double().tolist()
    w = [1.0] * n if weights is None else weights.double().tolist()
    total = sum(w)
    out = []
    for k in range(d):
        signs = sum((x[k] > 0) - (x[k] < 0) for x in rows)
        lr = eta if abs(signs) >= theta else -eta
        out.append(lr * sum(w[i] * rows[i][k] for i in range(n)) / total)
    return torch.tensor(out, dtype=torch.float64)


def foolsgold_weights_reference(H, kappa=1.0):
    """The authors' foolsgold() loop, with cs_ii exactly cos_ii - 1 and no division by zero."""
    rows = H.double().tolist()
    n = len(rows)
    norm = [math.sqrt(sum(v * v for v in r)) for r in rows]
    cs = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                cs[i][j] = 0.0 if norm[i] > 0 else -1.0
            elif norm[i] > 0 and norm[j] > 0:
                cs[i][j] = sum(a * b for a, b in zip(rows[i], rows[j])) / (norm[i] * norm[j])
    maxcs = [max(r) for r in cs]
    for i in range(n):
        for j in range(n):
            if i != j and maxcs[i] < maxcs[j] and maxcs[j] != 0:
                cs[i][j] = cs[i][j] * maxcs[i] / maxcs[j]
    wv = [min(max(1 - max(r), 0.0), 1.0) for r in cs]
    top = max(wv)
    if top == 0:
        return [0.0] * n
    out = []
    for v in wv:
        v = v / top
        if v == 1:
            v = 0.99
        x = -math.inf if v == 0 else kappa * (math.log(v / (1 - v)) + 0.5)
        out.append(min(max(x, 0.0), 1.0))
    return out


def foolsgold_reference(U, wv, normalize=False):
    n, d = U.shape
    rows = U.double().tolist()
    denom = sum(wv) if normalize else n
    return torch.tensor([sum(wv[i] * rows[i][k] for i in range(n)) / denom for k in range(d)], dtype=torch.float64)


# --- RLR ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("theta", [0, 1, 3, 4, 6, 8])
@pytest.mark.parametrize("weighted", [True, False])
def test_rlr_matches_the_per_coordinate_reference(theta, weighted):
    U = data(7, 13, seed=theta)
    U[2, 3] = 0.0  # sign(0) = 0 counts for neither side
    w = counts()
    out, m = rlr(U, w, theta=theta, eta=0.5, weighted=weighted)
    ref = rlr_reference(U, w if weighted else None, theta, 0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    agree = [abs(sum((x > 0) - (x < 0) for x in col)) for col in U.T.tolist()]
    assert m["flipped_frac"] == pytest.approx(sum(a < theta for a in agree) / 13)


def test_rlr_theta_zero_is_the_weighted_mean():
    U, w = data(), counts()
    out, m = rlr(U, w, theta=0)
    assert torch.equal(out, mean(U, w)[0])
    assert m["flipped_frac"] == 0.0
    out2, _ = aggregate("rlr", U, w, theta=0, f=2, state={}, generator=None, client_ids=list(range(7)))
    assert torch.equal(out2, mean(U, w)[0])


def test_rlr_flips_exactly_the_coordinates_where_too_few_clients_agree():
    # Coordinate k has p_k positive and 7 - p_k negative entries: |#pos - #neg| = |2 p_k - 7|.
    n, d = 7, 8
    positives = [0, 1, 2, 3, 4, 5, 6, 7]
    mag = data(n, d, seed=5).abs() + 0.1
    sign = torch.tensor([[1.0 if i < p else -1.0 for p in positives] for i in range(n)])
    U = sign * mag
    theta = 4
    out, m = rlr(U, None, theta=theta, eta=2.0)
    avg = U.mean(0)
    flipped = [abs(2 * p - n) < theta for p in positives]  # |2p-7| in {7,5,3,1,1,3,5,7}
    assert flipped == [False, False, True, True, True, True, False, False]
    expected = torch.stack([(-2.0 if fl else 2.0) * avg[k] for k, fl in enumerate(flipped)])
    torch.testing.assert_close(out, expected)
    assert m["flipped_frac"] == pytest.approx(4 / 8)
    # theta above the cohort size flips every coordinate
    out_all, m_all = rlr(U, None, theta=n + 1)
    torch.testing.assert_close(out_all, -avg)
    assert m_all["flipped_frac"] == 1.0


def test_rlr_is_registered_with_the_authors_defaults():
    assert AGGREGATORS.get("rlr") is rlr
    U = data()
    out, _ = aggregate("rlr", U, None)
    torch.testing.assert_close(out.double(), rlr_reference(U, None, 4, 1.0), rtol=1e-5, atol=1e-6)


# --- FoolsGold ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("normalize", [False, True])
def test_foolsgold_matches_the_per_client_reference_over_rounds(seed, normalize):
    # Three rounds with changing cohorts; the reference keeps a dict id -> summed update.
    g = torch.Generator().manual_seed(seed)
    cohorts = [[4, 0, 9, 2, 7, 5, 1], [9, 3, 4, 8, 0, 6, 2], [1, 2, 3, 4, 5, 6, 7]]
    base = torch.randn(13, generator=g)
    state, hist = {}, {}
    for ids in cohorts:
        U = 0.6 * base + torch.randn(7, 13, generator=g)  # correlated rows: pardoning matters
        U[0] = U[1] + 1e-3 * torch.randn(13, generator=g)  # a near-sybil pair
        out, m = foolsgold(U, None, state=state, client_ids=ids, kappa=1.0, normalize=normalize)
        for i, c in enumerate(ids):
            hist[c] = hist.get(c, torch.zeros(13, dtype=torch.float64)) + U[i].double()
        wv = foolsgold_weights_reference(torch.stack([hist[c] for c in ids]))
        assert m["scores"] == pytest.approx(wv, abs=1e-5)
        torch.testing.assert_close(out.double(), foolsgold_reference(U, wv, normalize), rtol=1e-4, atol=1e-5)
        assert m["zero_weight"] == sum(v == 0 for v in wv) == len(m["flagged"])
        assert m["weight_min"] == pytest.approx(min(wv), abs=1e-5)
        assert m["weight_max"] == pytest.approx(max(wv), abs=1e-5)
    assert state[FG_IDS_KEY].tolist() == sorted(hist)
    torch.testing.assert_close(state[FG_HISTORY_KEY].double(), torch.stack([hist[c] for c in sorted(hist)]))


@pytest.mark.parametrize("kappa", [0.5, 2.0])
def test_foolsgold_weights_kappa_matches_reference(kappa):
    H = data(9, 11, seed=3) + 0.5
    torch.testing.assert_close(foolsgold_weights(H, kappa).double(),
                               torch.tensor(foolsgold_weights_reference(H, kappa), dtype=torch.float64),
                               rtol=0, atol=1e-5)


def test_foolsgold_gives_sybils_zero_and_diverse_honest_clients_full_weight():
    n_honest, n_sybil, d = 6, 4, 500
    honest = data(n_honest, d, seed=11)  # independent Gaussian rows: |cos| ~ 0.05
    sybil = data(1, d, seed=12).expand(n_sybil, d)
    U = torch.cat([honest, sybil])
    out, m = foolsgold(U, None, state={}, client_ids=list(range(10)))
    wv = torch.tensor(m["scores"])
    assert torch.all(wv[:n_honest] == 1.0)
    assert torch.all(wv[n_honest:] == 0.0)
    assert m["flagged"] == list(range(n_honest, 10)) and m["zero_weight"] == n_sybil
    # the authors' weighting: sum_i wv_i U_i / N
    torch.testing.assert_close(out, honest.sum(0) / 10)
    out_n, _ = foolsgold(U, None, normalize=True)
    torch.testing.assert_close(out_n, honest.mean(0))


def test_foolsgold_history_accumulates_across_calls_through_state():
    # Clients 0 and 1 send different updates each round, but their sums coincide after round 2:
    # with memory they are sybils in round 2, without memory they are not.
    a, b, c = data(3, 40, seed=21)
    rest = data(4, 40, seed=22)
    U1 = torch.cat([torch.stack([a, b]), rest])
    U2 = torch.cat([torch.stack([b, a]), data(4, 40, seed=23)])
    state = {}
    foolsgold(U1, None, state=state, client_ids=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(state[FG_HISTORY_KEY], U1)
    _, m2 = foolsgold(U2, None, state=state, client_ids=[0, 1, 2, 3, 4, 5])
    torch.testing.assert_close(state[FG_HISTORY_KEY], U1 + U2)
    assert m2["scores"][0] == 0.0 and m2["scores"][1] == 0.0
    torch.testing.assert_close(torch.tensor(m2["scores"]), foolsgold_weights(U1 + U2))
    _, m_nomem = foolsgold(U2, None, state=None)
    assert m_nomem["scores"][0] > 0 and m_nomem["scores"][1] > 0
    # a client seen for the first time joins with a zero history; positions stay keyed by id
    _, _ = foolsgold(U2[:3], None, state=state, client_ids=[7, 0, 3])
    assert state[FG_IDS_KEY].tolist() == [0, 1, 2, 3, 4, 5, 7]
    torch.testing.assert_close(state[FG_HISTORY_KEY][6], U2[0])
    torch.testing.assert_close(state[FG_HISTORY_KEY][0], U1[0] + U2[0] + U2[1])
    torch.testing.assert_close(state[FG_HISTORY_KEY][3], U1[3] + U2[3] + U2[2])
    # without ids, rows are keyed by position
    s1, s2 = {}, {}
    o1, _ = foolsgold(U1, None, state=s1)
    o2, _ = foolsgold(U1, None, state=s2, client_ids=torch.arange(6))
    assert torch.equal(o1, o2) and torch.equal(s1[FG_HISTORY_KEY], s2[FG_HISTORY_KEY])


def test_foolsgold_state_survives_a_checkpoint_round_trip_bit_identically():
    state = {}
    foolsgold(data(7, 13, seed=31), None, state=state, client_ids=[3, 1, 4, 5, 9, 2, 6])
    buf = io.BytesIO()
    torch.save({"state": state}, buf)
    buf.seek(0)
    restored = torch.load(buf)["state"]
    for U, ids in ((data(7, 13, seed=32), [1, 5, 8, 0, 3, 2, 7]), (data(5, 13, seed=33), [9, 8, 7, 6, 5])):
        out_a, m_a = foolsgold(U, None, state=state, client_ids=ids)
        out_b, m_b = foolsgold(U, None, state=restored, client_ids=ids)
        assert torch.equal(out_a, out_b) and m_a == m_b
    assert torch.equal(state[FG_IDS_KEY], restored[FG_IDS_KEY])
    assert torch.equal(state[FG_HISTORY_KEY], restored[FG_HISTORY_KEY])
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_foolsgold_all_parallel_histories_get_zero_weight():
    U = data(1, 13, seed=41).expand(5, 13) * torch.arange(1.0, 6.0)[:, None]
    out, m = foolsgold(U, None)
    assert m["scores"] == [0.0] * 5 and m["zero_weight"] == 5
    assert torch.equal(out, torch.zeros(13))
    one, m1 = foolsgold(U[:1], None)  # a lone client is unlike anyone
    assert m1["scores"] == [1.0] and torch.equal(one, U[0])


def test_foolsgold_through_the_engine_stage_keys_history_by_client_id():
    from spfl_vmap.config import Config
    from spfl_vmap.modules.byzantine import RobustAggregation
    from spfl_vmap.stages import RoundContext

    stage = RobustAggregation(Config(by_defense="foolsgold", client_num_in_total=10, client_num_per_round=5))
    ids = [1, 3, 4, 7, 9]
    ctx = RoundContext(round=1, seed=0, client_ids=ids, counts=[1] * 5, malicious=torch.zeros(5, dtype=torch.bool),
                       weights=torch.ones(5), global_params={}, spec=None, device=torch.device("cpu"),
                       num_classes=10, population=10, expected_cohort=5)
    U = data(5, 8, seed=51)
    out, _ = stage.apply(ctx, U)
    torch.testing.assert_close(out, foolsgold(U, None, client_ids=ids)[0])
    saved = stage.state_dict()["state"]
    assert saved[FG_IDS_KEY].tolist() == ids


# --- both: non-finite rows, hyperparameter checks ------------------------------------------------


def test_nan_rows_are_excluded_through_aggregate():
    U, w = data(), counts()
    U[2, 4] = float("nan")
    U[5] = float("inf")
    kept = [0, 1, 3, 4, 6]
    out, m = aggregate("rlr", U, w, theta=2, f=2, client_ids=list(range(7)))
    assert m["nonfinite_excluded"] == [2, 5] and m["round_rejected"] is False
    assert torch.equal(out, rlr(U[kept], w[kept], theta=2)[0])

    ids = [10, 11, 12, 13, 14, 15, 16]
    state = {}
    out, m = aggregate("foolsgold", U, w, f=2, state=state, client_ids=ids)
    assert m["nonfinite_excluded"] == [2, 5]
    ref_state = {}
    ref, ref_m = foolsgold(U[kept], None, state=ref_state, client_ids=[ids[i] for i in kept])
    assert torch.equal(out, ref)
    assert m["scores"][2] is None and m["scores"][5] is None
    assert [m["scores"][i] for i in kept] == ref_m["scores"]
    assert state[FG_IDS_KEY].tolist() == [10, 11, 13, 14, 16]  # excluded clients get no history
    assert torch.equal(state[FG_HISTORY_KEY], ref_state[FG_HISTORY_KEY])
    # a tensor of ids is cut the same way
    out_t, _ = aggregate("foolsgold", U, None, state={}, client_ids=torch.tensor(ids))
    assert torch.equal(out_t, ref)


@pytest.mark.parametrize("name", ["rlr", "foolsgold"])
def test_all_rows_nonfinite_rejects_the_round(name):
    out, m = aggregate(name, torch.full((4, 3), float("nan")), None, state={}, client_ids=[0, 1, 2, 3])
    assert m["round_rejected"] is True and torch.equal(out, torch.zeros(3))


def test_client_ids_are_an_engine_kwarg_dropped_for_other_rules():
    U = data()
    out, _ = aggregate("mean", U, None, client_ids=list(range(7)), state={}, generator=None, f=1)
    assert torch.equal(out, mean(U)[0])
    with pytest.raises(ConfigError, match="client_ids must have one entry per row"):
        aggregate("foolsgold", U, None, client_ids=[1, 2, 3])


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("rlr", {"tau": 1.0}, r"'tau'.*eta, theta, weighted"),
        ("rlr", {"kappa": 1.0}, r"'kappa'"),
        ("foolsgold", {"theta": 4}, r"'theta'.*kappa, normalize"),
        ("rlr", {"theta": 4.0}, r"theta must be an int"),
        ("rlr", {"theta": "4"}, r"theta must be an int"),
        ("rlr", {"eta": "big"}, r"eta must be a number"),
        ("foolsgold", {"kappa": "1"}, r"kappa must be a number"),
        ("foolsgold", {"normalize": 1}, r"normalize must be a bool"),
        ("rlr", {"theta": -1}, r"theta .* >= 0"),
        ("rlr", {"eta": 0.0}, r"eta .* > 0"),
        ("rlr", {"eta": float("inf")}, r"eta .* > 0"),
        ("foolsgold", {"kappa": 0.0}, r"kappa .* > 0"),
        ("foolsgold", {"client_ids": [0, 1, 2, 3, 4, 5, 5]}, r"must not repeat"),
        ("foolsgold", {"client_ids": [0.5] * 7}, r"client_ids must be 7 ints"),
    ],
)
def test_bad_hyperparameters_are_config_errors(name, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        aggregate(name, data(), None, state={}, **kwargs)


def test_foolsgold_history_of_another_dimension_is_an_error():
    state = {}
    foolsgold(data(7, 13), None, state=state)
    with pytest.raises(ConfigError, match="fresh state"):
        foolsgold(data(7, 12), None, state=state)


def test_foolsgold_history_survives_kill_and_resume(tmp_path):
    """The engine checkpoints the aggregator's state: a resumed FoolsGold run is bit-identical."""
    cfg = small_config(by_defense="foolsgold", client_num_in_total=6, client_num_per_round=4, comm_round=4,
                       checkpoint_every=1, frequency_of_the_test=1)
    run(cfg.replace(out=str(tmp_path / "full")))
    with pytest.raises(Killed):
        run(cfg.replace(out=str(tmp_path / "cut")), on_round=kill_at(2))
    run(cfg.replace(out=str(tmp_path / "cut")), resume_dir=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["w"], b["w"])
    sa, sb = a["stages"]["aggregator"]["state"], b["stages"]["aggregator"]["state"]
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
