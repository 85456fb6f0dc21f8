"""FLAME (Nguyen et al. 2022) and FLTrust (Cao et al. 2021) against plain per-client references,
FLAME's clustering against scikit-learn run directly, and the FLTrust root set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import HDBSCAN
from sklearn.metrics.pairwise import cosine_distances as sk_cosine_distances

from helpers import small_config
from spfl_vmap import Config, Simulator
from spfl_vmap.aggregators import aggregate, cosine_distances, flame, fltrust, hdbscan_majority
from spfl_vmap.cli import main
from spfl_vmap.data import stratified_holdout
from spfl_vmap.errors import ConfigError, DataError


def clustered(n_major: int, n_minor: int, d: int, seed: int, spread: float = 0.1) -> torch.Tensor:
    """A majority around one direction, a minority around another, rows in random order."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    rows = [a + spread * torch.randn(d, generator=g) for _ in range(n_major)]
    rows += [b + spread * torch.randn(d, generator=g) for _ in range(n_minor)]
    U = torch.stack(rows) * (0.5 + torch.rand(n_major + n_minor, 1, generator=g))
    return U[torch.randperm(len(rows), generator=g)]


def sklearn_majority(U: torch.Tensor) -> np.ndarray:
    """FLAME's filter written directly with scikit-learn (the peer codes' parameters)."""
    D = sk_cosine_distances(U.double().numpy())
    n = len(D)
    labels = HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1, allow_single_cluster=True,
                     copy=True).fit_predict(D)
    found = [c for c in set(labels.tolist()) if c != -1]
    if not found:
        return np.ones(n, dtype=bool)
    best = max(found, key=lambda c: ((labels == c).sum(), -c))
    return labels == best


def flame_reference(U, keep, noise):
    """Per client: clip to the median norm of all rows, average the kept ones, add ``noise``."""
    rows = U.double().tolist()
    norms = [math.sqrt(sum(v * v for v in r)) for r in rows]
    S = float(np.median(norms))
    kept = [i for i in range(len(rows)) if keep[i]]
    out = [0.0] * len(rows[0])
    for i in kept:
        factor = min(1.0, S / norms[i]) if norms[i] > 0 else 1.0
        for k, v in enumerate(rows[i]):
            out[k] += factor * v / len(kept)
    return torch.tensor(out, dtype=torch.float64) + noise.double(), S


# --- FLAME ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,d", [(3, 5), (7, 33), (20, 129)])
def test_cosine_distances_match_sklearn(n, d):
    U = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    U[1] = 0.0  # a zero row: cosine 0 with everything, as sklearn
    ref = torch.from_numpy(sk_cosine_distances(U.double().numpy()))
    ref.fill_diagonal_(0.0)
    torch.testing.assert_close(cosine_distances(U).double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_major,n_minor,d,seed", [(6, 2, 40, 0), (9, 4, 17, 1), (11, 0, 64, 2), (5, 5, 30, 3), (15, 6, 200, 4)])
def test_flame_clustering_matches_sklearn_run_directly(n_major, n_minor, d, seed):
    U = clustered(n_major, n_minor, d, seed)
    keep, _ = hdbscan_majority(cosine_distances(U))
    assert keep.numpy().tolist() == sklearn_majority(U).tolist()


@pytest.mark.parametrize("seed", range(4))
def test_flame_equals_per_client_reference(seed):
    U = clustered(8, 3, 50, seed, spread=0.3)
    _, m = flame(U, None, noise="none")
    keep = [i in m["selected"] for i in range(len(U))]
    g = torch.Generator().manual_seed(seed)
    out, m = flame(U, None, generator=g, lamda=0.01)
    noise = torch.randn(U.shape[1], generator=torch.Generator().manual_seed(seed)) * m["noise_std"]
    ref, S = flame_reference(U, keep, noise)
    assert m["clip_bound"] == pytest.approx(S, rel=1e-6)
    assert m["noise_std"] == pytest.approx(0.01 * S, rel=1e-6)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert sorted(m["selected"] + m["flagged"]) == list(range(len(U)))


def test_flame_drops_the_minority_and_weights_when_asked():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(60, generator=g), torch.randn(60, generator=g)
    U = torch.cat([a + 0.1 * torch.randn(7, 60, generator=g), b + 0.1 * torch.randn(3, 60, generator=g)])  # rows 7-9: minority
    _, m = flame(U, None, noise="none")
    assert {7, 8, 9} <= set(m["flagged"]) and len(m["selected"]) >= 10 // 2 + 1
    w = torch.arange(1, 11).float()
    out, m = flame(U, w, noise="none", weighted=True)
    kept = torch.tensor(m["selected"])
    S = m["clip_bound"]
    clipped = U[kept] * torch.clamp(S / U[kept].norm(dim=1), max=1.0)[:, None]
    torch.testing.assert_close(out, (w[kept] / w[kept].sum()) @ clipped, atol=1e-5, rtol=1e-5)


def test_flame_noise_forms():
    U = clustered(6, 1, 10, 6)
    S = float(np.median(U.double().norm(dim=1).numpy()))
    _, m = flame(U, None, noise="dp", epsilon=100.0, delta=0.01)
    assert m["noise_std"] == pytest.approx(math.sqrt(2 * math.log(1.25 / 0.01)) / 100.0 * S, rel=1e-6)
    _, m = flame(U, None, noise="none")
    assert m["noise_std"] == 0.0
    for bad in (dict(noise="gauss"), dict(lamda=-1.0), dict(delta=1.0), dict(min_cluster_size=1)):
        with pytest.raises(ConfigError, match="flame"):
            flame(U, None, **bad)


def test_flame_with_nonfinite_rows_leaving_too_few_rejects_the_round():
    U = torch.randn(4, 6)
    U[0], U[1] = float("nan"), float("inf")
    out, m = aggregate("flame", U, None)
    assert m["round_rejected"] and m["too_few_rows"] == 2 and torch.equal(out, torch.zeros(6))


def test_flame_with_fewer_than_three_clients_is_a_one_line_error(capsys):
    code = main(["run", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "4", "--client_num_per_round", "2",
                 "--by_defense", "flame", "--comm_round", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "flame needs n >= 3" in err


# --- FLTrust -------------------------------------------------------------------------------------


def fltrust_reference(U, g0):
    rows, g = U.double().tolist(), g0.double().tolist()
    gn = math.sqrt(sum(v * v for v in g))
    out, total = [0.0] * len(g), 0.0
    for r in rows:
        rn = math.sqrt(sum(v * v for v in r))
        cos = sum(a * b for a, b in zip(r, g)) / (rn * gn) if rn > 0 and gn > 0 else 0.0
        ts = max(cos, 0.0)
        total += ts
        for k, v in enumerate(r):
            out[k] += ts * v * (gn / rn if rn > 0 else 0.0)
    return torch.tensor([v / total for v in out] if total > 0 else out, dtype=torch.float64)


@pytest.mark.parametrize("n,d,seed", [(1, 3, 0), (5, 17, 1), (12, 100, 2)])
def test_fltrust_equals_per_client_reference(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    U, g0 = torch.randn(n, d, generator=g), torch.randn(d, generator=g)
    U[0] = g0 * 3 + 0.1 * torch.randn(d, generator=g)  # at least one trusted row
    if n > 2:
        U[1] = 0.0
    out, m = fltrust(U, None, server_update=g0)
    torch.testing.assert_close(out.double(), fltrust_reference(U, g0), atol=1e-5, rtol=1e-5)
    assert all(s >= 0 for s in m["scores"]) and m["server_norm"] == pytest.approx(float(g0.norm()), rel=1e-6)


def test_fltrust_all_untrusted_keeps_the_model_and_needs_the_server_update():
    g0 = torch.ones(4)
    out, m = fltrust(-torch.rand(3, 4) - 0.1, None, server_update=g0)
    assert torch.equal(out, torch.zeros(4)) and m["trust_sum"] == 0 and m["flagged"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="server_update"):
        fltrust(torch.ones(3, 4), None)
    with pytest.raises(ConfigError, match="server_update"):
        fltrust(torch.ones(3, 4), None, server_update=torch.ones(5))


# --- the root set --------------------------------------------------------------------------------


def test_stratified_holdout_is_exact_and_disjoint():
    labels = np.random.default_rng(0).integers(0, 10, 500)
    root, rest = stratified_holdout(labels, 23, 10, seed=3)
    counts = np.bincount(labels[root], minlength=10)
    assert counts.tolist() == [3, 3, 3] + [2] * 7  # 23 = 10 * 2 + 3 (the first 3 classes get one more)
    assert len(np.intersect1d(root, rest)) == 0 and len(root) + len(rest) == 500
    again, _ = stratified_holdout(labels, 23, 10, seed=3)
    assert np.array_equal(root, again)
    with pytest.raises(DataError, match="root_samples"):
        stratified_holdout(np.zeros(50, dtype=int), 20, 10)


def test_fltrust_run_holds_the_root_set_out_of_every_client():
    cfg = small_config(dataset="digits", client_num_in_total=8, client_num_per_round=8, by_defense="fltrust",
                       by_attack="sign_flip", by_workers=2, comm_round=2)
    assert cfg.root_samples == 100  # FLTrust's default root set
    sim = Simulator(cfg)
    root, _ = stratified_holdout(sim.dataset.y_train.numpy(), 100, 10, cfg.seed)
    used = np.concatenate(sim.parts)
    assert len(np.intersect1d(root, used)) == 0 and len(used) + 100 == len(sim.dataset.y_train)
    for _ in range(2):
        m = sim.step()
    assert "agg_server_norm" in m and m["agg_server_norm"] > 0
    assert sim.describe()["aggregator"] == "fltrust" and sim.describe()["root_samples"] == 100


def test_fltrust_server_update_is_the_same_for_both_engines():
    cfg = small_config(dataset="digits", client_num_in_total=4, client_num_per_round=4, by_defense="fltrust", root_samples=30)
    a, b = Simulator(cfg), Simulator(cfg.replace(engine="loop"))
    ctx_a, ctx_b = a.context(1), b.context(1)
    ua = a.pipeline.aggregation.server_update(ctx_a)
    ub = b.pipeline.aggregation.server_update(ctx_b)
    assert float(ua.norm()) > 0
    torch.testing.assert_close(ua, ub, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("root", [0, 5])
def test_fltrust_without_enough_root_samples_is_a_one_line_error(root):
    with pytest.raises(ConfigError, match="root_samples >= 10"):
        Config(dataset="digits", model="lr", by_defense="fltrust", root_samples=root)
