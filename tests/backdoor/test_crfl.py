"""CRFL (Xie, Chen, Chen & Li, ICML 2021): the maths of spfl_vmap.defenses.crfl, the server stage
against a plain reference, its state across a resume, and ``spfl run --crfl`` + ``spfl certify``."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from spfl_vmap import Config, ConfigError, Simulator
from spfl_vmap.cli import main
from spfl_vmap.defenses.crfl import (
    certified_accuracy,
    certified_radius,
    clip_model,
    clopper_pearson,
    contraction,
    crfl_lipschitz,
    rho_at,
    smoothing_bounds,
)
from spfl_vmap.engine.optim import ServerOptimizer
from spfl_vmap.experiments.certify import single_attack_round
from spfl_vmap.engine.params import ParamSpec
from spfl_vmap.modules.crfl import CRFLClipNoise
from spfl_vmap.rng import generator
from spfl_vmap.stages import RoundContext

stats = pytest.importorskip("scipy.stats")

SHAPES = [(7, 5), (7,), (3, 4, 2), (1,)]  # not powers of two; D = 35 + 7 + 24 + 1 = 67
BASE = dict(dataset="synthetic", synthetic_train=300, synthetic_test=100, model="lr", partition_method="homo",
            client_num_in_total=6, client_num_per_round=6, comm_round=4, epochs=1, batch_size=10, lr=0.05,
            frequency_of_the_test=2, progress=False, device="cpu", crfl=True, crfl_rho=0.5, crfl_sigma=0.01)


def random_params(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": scale * torch.randn(s, generator=g) for i, s in enumerate(SHAPES)}


def spec() -> ParamSpec:
    return ParamSpec(tuple(f"p{i}" for i in range(len(SHAPES))), tuple(torch.Size(s) for s in SHAPES))


# ---- clip ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho", [0.5, 3.0, 100.0])
def test_clip_model_equals_per_tensor_reference(rho):
    params = random_params(0)
    sq = sum(float((t.double() ** 2).sum()) for t in params.values())  # the authors' model_global_norm, tensor by tensor
    norm = math.sqrt(sq)
    factor = min(1.0, rho / norm)
    ref = torch.cat([(t * factor).reshape(-1) for t in params.values()])
    out, got_norm = clip_model(spec().flatten(params), rho)
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-6)
    assert math.isclose(float(got_norm), norm, rel_tol=1e-6)
    assert float(out.norm()) <= rho * (1 + 1e-6)


def test_clip_model_leaves_zero_model():
    out, norm = clip_model(torch.zeros(5), 1.0)
    assert torch.equal(out, torch.zeros(5)) and float(norm) == 0.0


def test_rho_schedule_is_the_authors_mnist_schedule():
    # main.py (AI-secure/CRFL): dynamic_thres = epoch * 0.1 + 2, capped at param_clip_thres = 15
    assert rho_at(10, 15.0, 2.0, 0.1) == pytest.approx(3.0)
    assert rho_at(200, 15.0, 2.0, 0.1) == 15.0
    assert rho_at(10, 15.0) == 15.0


# ---- the server stage ---------------------------------------------------------------------------
def context(round_idx: int, params: dict[str, torch.Tensor], *, use_gradient: bool, server_lr: float) -> RoundContext:
    return RoundContext(round=round_idx, seed=3, client_ids=[0, 1], counts=[5, 5], malicious=torch.zeros(2, dtype=torch.bool),
                        weights=torch.ones(2), global_params=params, spec=spec(), device=torch.device("cpu"), num_classes=3,
                        population=2, expected_cohort=2, use_gradient=use_gradient, server_lr=server_lr)


@pytest.mark.parametrize("use_gradient", [False, True])
@pytest.mark.parametrize("server_lr", [1.0, 0.3])
@pytest.mark.parametrize("rho,sigma", [(0.5, 0.0), (0.5, 0.05), (1e3, 0.05)])
def test_stage_lands_the_server_step_on_the_clipped_noised_model(use_gradient, server_lr, rho, sigma):
    """Plain reference: the model the SGD step would give, clipped to rho, plus the same noise."""
    G_params = random_params(1, scale=0.3)
    ctx = context(7, G_params, use_gradient=use_gradient, server_lr=server_lr)
    G = spec().flatten(G_params)
    agg = torch.randn(G.shape, generator=torch.Generator().manual_seed(2)) * 0.2  # (D,)
    stepped = G - server_lr * agg if use_gradient else G + server_lr * agg  # ServerOptimizer sgd, no momentum
    norm = math.sqrt(float((stepped.double() ** 2).sum()))
    ref_clipped = stepped * min(1.0, rho / norm)
    ref = ref_clipped + sigma * torch.randn(G.shape, generator=generator(3, "crfl", 7))

    stage = CRFLClipNoise(rho, sigma)
    agg2, m = stage.apply(ctx, agg)
    w = ServerOptimizer("sgd", server_lr).step(G, agg2 if use_gradient else -agg2)  # the round loop's step 9
    assert torch.allclose(w, ref, atol=1e-6)
    assert torch.allclose(stage.clipped, ref_clipped, atol=1e-7)
    assert m["crfl_clipped"] == int(norm > rho) and m["crfl_norm"] == pytest.approx(norm, rel=1e-6) and m["crfl_rho"] == rho


def test_stage_noise_has_the_configured_moments():
    D = 40_000
    flat = ParamSpec(("w",), (torch.Size([D]),))
    ctx = RoundContext(round=2, seed=0, client_ids=[0], counts=[1], malicious=torch.zeros(1, dtype=torch.bool),
                       weights=torch.ones(1), global_params={"w": torch.zeros(D)}, spec=flat, device=torch.device("cpu"),
                       num_classes=2, population=1, expected_cohort=1)
    stage = CRFLClipNoise(rho=1e6, sigma=0.2)
    agg, _ = stage.apply(ctx, torch.full((D,), 0.5))
    noise = agg - stage.clipped  # lr 1, G = 0: the update is the noised model
    assert abs(float(noise.mean())) < 4 * 0.2 / math.sqrt(D)
    assert float(noise.std()) == pytest.approx(0.2, rel=0.02)


def test_stage_uses_the_growing_schedule():
    stage = CRFLClipNoise(15.0, 0.0, rho_init=2.0, rho_step=0.1)
    ctx = context(10, random_params(4, scale=5.0), use_gradient=False, server_lr=1.0)
    _, m = stage.apply(ctx, torch.zeros(spec().dim))
    assert m["crfl_rho"] == pytest.approx(3.0) and m["crfl_clipped"] == 1
    assert float(stage.clipped.norm()) == pytest.approx(3.0, rel=1e-6)


# ---- in the round loop --------------------------------------------------------------------------
def run_rounds(sim: Simulator, k: int) -> list[dict]:
    return [sim.step() for _ in range(k)]


def test_state_across_resume_and_final_model_is_clipped_plus_noise(tmp_path):
    cfg = Config(**BASE)
    full = Simulator(cfg)
    ms = run_rounds(full, 4)
    assert all(m["crfl_clipped"] == 1 for m in ms)  # rho 0.5 acts every round
    stage = full.stage("crfl")
    assert float(stage.clipped.norm()) <= 0.5 * (1 + 1e-6) and stage.round == 4
    noise = cfg.crfl_sigma * torch.randn(full.num_params, generator=generator(cfg.seed, "crfl", 4))
    assert torch.allclose(full.w, stage.clipped + noise, atol=1e-6)

    half = Simulator(cfg)
    run_rounds(half, 2)
    half.save_checkpoint(tmp_path)
    resumed = Simulator(cfg)
    resumed.load_checkpoint(tmp_path)
    assert torch.equal(resumed.stage("crfl").clipped, half.stage("crfl").clipped) and resumed.stage("crfl").round == 2
    run_rounds(resumed, 2)
    assert torch.equal(resumed.w, full.w)
    assert torch.equal(resumed.stage("crfl").clipped, stage.clipped)


@pytest.mark.parametrize("kw", [dict(by_defense="median"), dict(by_workers=2, bd_attack="badnets", bd_boost=3.0),
                                dict(use_gradient=True), dict(bd_defense="norm_bound", bd_clip=0.5, bd_noise=0.01)])
def test_combines_with_aggregators_attacks_and_fedsgd(kw):
    sim = Simulator(Config(**{**BASE, "comm_round": 1, **kw}))
    assert sim.pipeline.server_stages[-1].name == "crfl"  # after the backdoor module's server noise
    m = sim.step()
    assert m["crfl_rho"] == 0.5 and float(sim.stage("crfl").clipped.norm()) <= 0.5 * (1 + 1e-6)


@pytest.mark.parametrize("kw,words", [
    (dict(crfl_rho=-1.0), "--crfl_rho must be"),
    (dict(crfl_rho=float("inf")), "--crfl_rho must be"),
    (dict(crfl_sigma=-0.1), "--crfl_sigma must be"),
    (dict(crfl_rho_init=0.0), "--crfl_rho_init must be"),
    (dict(crfl_rho_step=0.1), "give both"),
    (dict(crfl=False, crfl_sigma=0.5), "add --crfl"),
    (dict(server_optimizer="adam"), "--server_optimizer sgd"),
    (dict(server_momentum=0.9), "--server_momentum"),
])
def test_config_errors_are_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        Config(**{**BASE, **kw})
    assert words in str(e.value) and "\n" not in str(e.value)


# ---- certification maths -----------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0005, 0.05])
def test_clopper_pearson_matches_beta_quantiles_and_binomial_tails(alpha):
    n = 100
    k = torch.tensor([0, 1, 7, 50, 99, 100])
    lo, up = clopper_pearson(k, n, alpha)
    for ki, l, u in zip(k.tolist(), lo.tolist(), up.tolist()):
        ref_l = 0.0 if ki == 0 else stats.beta.ppf(alpha, ki, n - ki + 1)  # Clopper & Pearson (1934)
        ref_u = 1.0 if ki == n else stats.beta.ppf(1 - alpha, ki + 1, n - ki)
        assert l == pytest.approx(ref_l, abs=1e-12) and u == pytest.approx(ref_u, abs=1e-12)
        if ki > 0:  # the defining property: P(X >= k | p = lower) = alpha
            assert stats.binom.sf(ki - 1, n, l) == pytest.approx(alpha, rel=1e-6)
        if ki < n:  # P(X <= k | p = upper) = alpha
            assert stats.binom.cdf(ki, n, u) == pytest.approx(alpha, rel=1e-6)


def test_smoothing_bounds_are_bonferroni_clopper_pearson():
    counts = torch.tensor([[90, 6, 4], [3, 50, 47], [20, 20, 60], [40, 40, 20]])  # M = 100 each
    alpha = 0.01
    pred, p_a, p_b = smoothing_bounds(counts, alpha)
    assert pred.tolist() == [0, 1, 2, 0]  # a tie for the top goes to the lower index
    for i, row in enumerate(counts.tolist()):
        k_a, k_b = sorted(row, reverse=True)[:2]
        ref_a = stats.beta.ppf(alpha / 2, k_a, 100 - k_a + 1)
        ref_b = min(stats.beta.ppf(1 - alpha / 2, k_b + 1, 100 - k_b), 1 - ref_a)
        assert float(p_a[i]) == pytest.approx(ref_a, abs=1e-12) and float(p_b[i]) == pytest.approx(ref_b, abs=1e-12)
    assert float(p_a[3]) < float(p_b[3])  # the tie certifies nothing


def test_certified_radius_hand_derived_cases():
    """CRFL's radius, as in the paper's certification theorem and the authors' certify_mnist.py
    (cal_prob_bound):
        RAD^2 = -ln(1 - (sqrt(pA) - sqrt(pB))^2) sigma^2
                / (2 R sum p_i^2 gamma^2 tau^2 eta^2 L^2 (q/n)^2 prod_t (2 Phi(rho_t/sigma_t) - 1)).
    Case 1: pA = 0.81, pB = 0.01: sqrt gap 0.9 - 0.1 = 0.8, so the numerator's log term is
    -ln(1 - 0.64) = 2 ln(5/3). R = 1, p = 0.1, gamma = 10 (p gamma = 1), tau = 10, eta = 0.1
    (tau eta = 1), L = 1, q/n = 1/2, and no contraction (rho/sigma = 1e4: 2 Phi - 1 = 1):
    denominator 2 * 1/4 = 1/2, so RAD^2 = 2 ln(5/3) * 1e-4 / (1/2) and RAD = 0.02 sqrt(ln(5/3))."""
    kw = dict(weights=[0.1], gamma=10.0, tau=10, lr=0.1, lipschitz=1.0, poison_ratio=0.5)
    P_A, P_B = torch.tensor([0.81], dtype=torch.float64), torch.tensor([0.01], dtype=torch.float64)
    c1 = contraction([100.0], [0.01])
    assert c1 == 1.0
    rad = certified_radius(P_A, P_B, sigma_adv=0.01, contraction_factor=c1, **kw)
    assert float(rad[0]) == pytest.approx(0.02 * math.sqrt(math.log(5 / 3)), rel=1e-12)
    # Case 2: two later rounds with rho/sigma = 1 and 2: factors 2 Phi(1) - 1 = 0.682689... and
    # 2 Phi(2) - 1 = 0.954499... (the 68-95 rule); the radius grows by 1/sqrt of their product.
    c2 = contraction([1.0, 2.0], [1.0, 1.0])
    assert c2 == pytest.approx(0.6826894921370859 * 0.9544997361036416, rel=1e-12)
    rad2 = certified_radius(P_A, P_B, sigma_adv=0.01, contraction_factor=c2, **kw)
    assert float(rad2[0]) == pytest.approx(0.02 * math.sqrt(math.log(5 / 3) / c2), rel=1e-12)
    # Case 3: R = 2 attackers of weight 0.1: R sum p_i^2 = 2 * 0.02 = 0.04, four times case 1's: half the radius
    rad3 = certified_radius(P_A, P_B, sigma_adv=0.01, contraction_factor=c1,
                            **{**kw, "weights": [0.1, 0.1]})
    assert float(rad3[0]) == pytest.approx(0.01 * math.sqrt(math.log(5 / 3)), rel=1e-12)
    # no certificate where p_A <= p_B
    assert math.isnan(float(certified_radius(torch.tensor([0.4]), torch.tensor([0.4]), sigma_adv=0.01, contraction_factor=c1, **kw)[0]))
    # the authors' L_z with rho_tadv = 3 (certify_mnist.py): sqrt(2 + 6 + 9) = sqrt(17)
    assert crfl_lipschitz(3.0) == pytest.approx(math.sqrt(17.0))


def test_certified_accuracy_by_hand():
    radius = torch.tensor([math.nan, 0.1, 0.5, math.inf])
    correct = torch.tensor([True, True, False, True])
    acc = certified_accuracy(radius, [0.0, 0.2, 1.0], correct)
    rate = certified_accuracy(radius, [0.0, 0.2, 1.0])
    assert acc.tolist() == [0.5, 0.25, 0.25]  # radius 0: points 2 and 4 (point 3 is wrong, point 1 abstains)
    assert rate.tolist() == [0.75, 0.5, 0.25]


# ---- spfl run --crfl + spfl certify -------------------------------------------------------------
RUN = ["run", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "8", "--client_num_per_round", "8",
       "--partition_method", "homo", "--comm_round", "3", "--frequency_of_the_test", "3", "--checkpoint_every", "3",
       "--lr", "0.1", "--device", "cpu", "--no-progress", "--by_workers", "2", "--bd_attack", "badnets",
       "--crfl", "--crfl_rho", "3", "--crfl_sigma", "0.01"]


@pytest.fixture(scope="module")
def crfl_run(tmp_path_factory):
    prev = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the conftest's per-test fixture does not cover it
    out = tmp_path_factory.mktemp("crfl") / "run"
    try:
        assert main(RUN + ["--out", str(out)]) == 0
    finally:
        torch.set_num_threads(prev)
    return out


def test_run_and_certify_end_to_end(crfl_run, tmp_path, capsys):
    rows = [json.loads(line) for line in (crfl_run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 3 and "crfl_norm" in rows[-1] and rows[-1]["crfl_rho"] == 3.0
    capsys.readouterr()
    assert main(["certify", "--run", str(crfl_run), "--samples", "24", "--batch", "5", "--alpha", "0.01"]) == 0
    printed = capsys.readouterr().out
    assert "clean cert. acc" in printed and "triggered cert. acc" in printed
    assert "without --crfl" not in printed and "note: the attack acted in more than one round" in printed  # a continuous attack
    res = json.loads((crfl_run / "certify.json").read_text())
    assert res["crfl_trained"] and res["round"] == 3 and set(res["sets"]) == {"clean", "triggered"}
    t = res["theorem"]
    assert t["t_adv"] == 2 and t["attackers"] == 2 and t["agg_weight"] == pytest.approx(1 / 8) and t["sigma_T"] == 0.01
    assert t["contraction"] == pytest.approx(math.erf(3.0 / (math.sqrt(2) * 0.01)))
    clean = res["sets"]["clean"]
    assert clean["n"] == len(clean["points"]["radius"]) and 0.5 < clean["smoothed_acc"] <= 1.0
    accs = [r["clean_certified_accuracy"] for r in res["table"]]
    assert accs == sorted(accs, reverse=True) and res["table"][0]["radius"] == 0.0
    assert accs[-1] > 0  # the largest radius is reached by the points that have it
    csv_lines = (crfl_run / "certify.csv").read_text().splitlines()
    assert csv_lines[0].startswith("radius,clean_certified_accuracy") and len(csv_lines) == 1 + len(res["table"])

    # the noisy copies do not depend on --batch
    other = tmp_path / "b.json"
    assert main(["certify", "--run", str(crfl_run), "--samples", "24", "--batch", "24", "--alpha", "0.01", "--out", str(other)]) == 0
    again = json.loads(other.read_text())
    assert again["sets"]["clean"]["points"] == clean["points"] and (tmp_path / "b.csv").is_file()


def test_certify_a_run_without_crfl_says_so(crfl_run, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(crfl_run, plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["config"].update(crfl=False, crfl_rho=15.0, crfl_sigma=0.01)  # a plain run (crfl_* at their defaults)
    (plain / "config.json").write_text(json.dumps(cfg))
    assert main(["certify", "--run", str(plain), "--samples", "4", "--radii", "0,0.001"]) == 0
    out = capsys.readouterr().out
    assert "note: the run was trained without --crfl" in out
    res = json.loads((plain / "certify.json").read_text())
    assert not res["crfl_trained"] and [r["radius"] for r in res["table"]] == [0.0, 0.001]


def test_single_round_attack_is_the_default_attack_round():
    assert single_attack_round(SimpleNamespace(bd_attack="badnets", bd_schedule="single:5")) == 5
    assert single_attack_round(SimpleNamespace(bd_attack="badnets", bd_schedule="every:5")) is None
    assert single_attack_round(SimpleNamespace(bd_attack="none", bd_schedule="single:5")) is None


@pytest.mark.parametrize("extra,needle", [
    (["--samples", "1"], "--samples must be"),
    (["--alpha", "2"], "--alpha must be"),
    (["--sigma", "-0.1"], "--sigma must be"),
    (["--t_adv", "3"], "--t_adv must be a round before"),
    (["--radii", "0,-1"], "--radii must be"),
])
def test_certify_bad_options_are_one_line(crfl_run, extra, needle, capsys):
    assert main(["certify", "--run", str(crfl_run)] + extra) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_certify_bad_run_dirs_are_one_line(crfl_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(crfl_run, broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    no_ckpt = tmp_path / "no_ckpt"
    shutil.copytree(crfl_run, no_ckpt)
    (no_ckpt / "checkpoint.pt").unlink()
    for run_dir, needle in ((tmp_path / "missing", "no such run directory"), (tmp_path, "not a run directory"),
                            (no_ckpt, "has no checkpoint.pt"), (broken, "is damaged")):
        assert main(["certify", "--run", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("argv,needle", [
    (["--crfl_rho", "-1"], "--crfl_rho must be"),
    (["--crfl_sigma", "-0.5"], "--crfl_sigma must be"),
    (["--server_optimizer", "adam"], "--server_optimizer sgd"),
])
def test_run_with_bad_crfl_flags_is_one_line(argv, needle, tmp_path, capsys):
    assert main(RUN + argv + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
