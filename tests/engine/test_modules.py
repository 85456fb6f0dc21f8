"""Byzantine and DP stages inside the round loop."""

import math

import pytest
import torch

from helpers import Killed, final_params, kill_at, rel_err, small_config
from spfl_vmap import Simulator, run
from spfl_vmap.aggregators import AGGREGATORS
from spfl_vmap.runner import MetricsLog


def byz_config(**kw):
    base = dict(dataset="digits", model="lr", partition_method="homo", client_num_in_total=16, client_num_per_round=12,
                comm_round=2, epochs=1, batch_size=16, frequency_of_the_test=1)
    base.update(kw)
    return small_config(**base)


@pytest.mark.parametrize("attack", ["nan", "inf"])
@pytest.mark.parametrize("defense", AGGREGATORS.names())
def test_malformed_updates_never_reach_the_model(attack, defense):
    cfg = byz_config(by_attack=attack, by_workers=3, by_mode="per_round", by_defense=defense, by_f=2)
    sim = Simulator(cfg)
    for _ in range(cfg.comm_round):
        m = sim.step()
        assert m["malicious"] == 3
    assert torch.isfinite(sim.w).all()
    assert math.isfinite(m["test_loss"])


def test_fixed_malicious_set_is_sampled_like_anyone():
    cfg = byz_config(client_num_in_total=40, client_num_per_round=10, by_attack="gaussian", by_frac=0.25, synthetic_train=600)
    sim = Simulator(cfg)
    assert int(sim.stage("adversary").malicious_ids.sum()) == 10
    seen = [int(sim.pipeline.adversary.malicious_mask(sim.sample_clients(r), r).sum()) for r in range(1, 30)]
    assert min(seen) < max(seen)  # cohorts hold varying numbers of attackers
    again = Simulator(cfg)
    assert torch.equal(sim.stage("adversary").malicious_ids, again.stage("adversary").malicious_ids)


def test_per_round_mode_has_exact_count():
    sim = Simulator(byz_config(by_attack="sign_flip", by_workers=4, by_mode="per_round"))
    for r in range(1, 6):
        assert int(sim.pipeline.adversary.malicious_mask(sim.sample_clients(r), r).sum()) == 4


def test_label_flip_poisoning_matches_between_engines():
    cfg = small_config(by_attack="label_flip", by_workers=2, by_mode="per_round", momentum=0.5)
    _, vec = final_params(cfg)
    _, ref = final_params(cfg.replace(engine="loop"))
    _, clean = final_params(cfg.replace(by_attack="none"))
    assert rel_err(vec, ref) <= 1e-5
    assert rel_err(vec, clean) > 1e-3  # poisoning changed training


def test_rejected_round_keeps_model():
    cfg = byz_config(by_attack="nan", by_workers=12, by_mode="per_round", by_defense="mean")
    sim = Simulator(cfg)
    w0 = sim.w.clone()
    m = sim.step()
    assert m["round_rejected"] and torch.equal(sim.w, w0)


def test_krum_ignores_large_sign_flip_in_engine():
    cfg = byz_config(by_attack="sign_flip", by_attack_params="scale=100", by_workers=3, by_mode="per_round", by_defense="multi_krum", by_f=3)
    sim = Simulator(cfg)
    m = sim.step()
    assert m["malicious_selected"] == 0


def test_user_level_clipping_bounds_each_contribution():
    """DP-FedAvg: with sigma -> 0 the aggregate is sum_k clip_S(U_k) / (qK), each term of norm <= S."""
    cfg = byz_config(dp_mode="user", dp_sigma=1e-9, grad_norm=0.05, client_num_per_round=8)
    sim = Simulator(cfg)
    U = torch.randn(5, sim.spec.dim) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])[:, None]
    agg, m = sim.pipeline.aggregation.apply(sim.context(1, []), U)
    norms = U.norm(dim=1, keepdim=True)
    expect = (U * torch.clamp(0.05 / (norms + 1e-6), max=1.0)).sum(0) / 8
    assert torch.allclose(agg, expect, atol=1e-6)
    assert float(agg.norm()) <= 5 * 0.05 / 8 + 1e-6  # triangle inequality over 5 clipped terms


def test_user_level_noise_has_sigma_S_over_cohort():
    cfg = byz_config(dp_mode="user", dp_sigma=2.0, grad_norm=0.5, client_num_per_round=8)
    sim = Simulator(cfg)
    U = torch.zeros(3, sim.spec.dim)
    noise = torch.cat([sim.pipeline.aggregation.apply(sim.context(r, []), U)[0] for r in range(1, 40)])  # (39 D,) pure noise
    n = noise.numel()
    target = 2.0 * 0.5 / 8
    # sample std of n normals: relative standard error 1/sqrt(2n); 5 sigma bound
    assert abs(float(noise.std()) / target - 1) < 5 / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 5 * target / math.sqrt(n)


def test_target_epsilon_calibration_and_budget_stop(tmp_path):
    cfg = byz_config(dp_mode="user", target_epsilon=2.0, comm_round=5, client_num_per_round=8, out=str(tmp_path / "a"))
    hist = run(cfg)
    assert hist.summary["epsilon"] <= 2.0 and hist.summary["epsilon"] >= 0.99 * 2.0
    assert (tmp_path / "a" / "privacy.jsonl").is_file()
    # sigma given too: no calibration, the run stops before overspending
    small = cfg.replace(dp_sigma=0.8, comm_round=50, out=str(tmp_path / "b"))
    hist = run(small)
    assert hist.summary["stopped"] and "privacy budget" in hist.summary["stopped"]
    assert hist.summary["epsilon"] <= 2.0 and hist.summary["rounds"] < 50


def test_local_dp_accounts_per_client(tmp_path):
    cfg = byz_config(dp_mode="local", dp_sigma=2.0, grad_norm=1.0, client_num_per_round=6, comm_round=3,
                     out=str(tmp_path / "l"), dp_epsilon_json=True)
    hist = run(cfg)
    row = MetricsLog(tmp_path / "l" / "privacy.jsonl").read()[-1]
    eps = row["epsilons"]
    assert 0 < hist.summary["eps_min"] <= hist.summary["eps_max"]
    assert (tmp_path / "l" / "epsilons.json").is_file() and len(eps) <= 16


def test_example_level_dp_resume_is_bit_identical(tmp_path):
    """DP-SGD's Poisson batches and noise are drawn per (seed, round, client): resume repeats them."""
    cfg = byz_config(dp_mode="example", dp_sigma=1.0, grad_norm=1.0, comm_round=3, client_num_per_round=4,
                     checkpoint_every=1)
    full = run(cfg.replace(out=str(tmp_path / "full")))

    with pytest.raises(Killed):
        run(cfg.replace(out=str(tmp_path / "cut")), on_round=kill_at(2))
    resumed = run(cfg.replace(out=str(tmp_path / "cut")), resume_dir=tmp_path / "cut")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert torch.equal(a["w"], b["w"])
    assert resumed.summary["eps_max"] == full.summary["eps_max"] > 0


@pytest.mark.parametrize("defense", ["median", "krum", "centered_clipping"])
def test_byzantine_in_gradient_mode(defense):
    """FedSGD: attacks rewrite uploaded gradients; the robust rule keeps the model finite and moving."""
    cfg = byz_config(use_gradient=True, by_attack="gaussian", by_workers=3, by_mode="per_round", by_defense=defense, by_f=3, comm_round=3)
    sim = Simulator(cfg)
    w0 = sim.w.clone()
    for _ in range(3):
        m = sim.step()
    assert torch.isfinite(sim.w).all() and not torch.equal(sim.w, w0)
    plain = Simulator(cfg.replace(by_defense="mean"))
    for _ in range(3):
        plain.step()
    assert float((sim.w - w0).norm()) < 0.1 * float((plain.w - w0).norm())  # the mean absorbs sigma=200 noise


@pytest.mark.parametrize("mode", ["user", "local"])
def test_malformed_updates_under_dp(mode):
    cfg = byz_config(dp_mode=mode, dp_sigma=0.5, by_attack="nan", by_workers=3, by_mode="per_round", client_num_per_round=8)
    sim = Simulator(cfg)
    for _ in range(2):
        m = sim.step()
    assert torch.isfinite(sim.w).all()
    assert m["nonfinite_excluded"] >= 1
