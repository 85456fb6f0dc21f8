"""Backdoor attack options: Neurotoxin, constrain-and-scale, attack schedules, the toolkit's
``--backdoor_test`` and the defense's clip mode / noise placement.

Each stage is compared with a plain per-client Python loop on random ``U``; schedules with the
rounds their definitions give; Neurotoxin's state across a checkpoint and a killed run.
"""

from __future__ import annotations

import pytest
import torch

from helpers import Killed, kill_at
from spfl_vmap import Config, ConfigError, Simulator, run
from spfl_vmap.attacks.backdoor import neurotoxin_keep, parse_schedule
from spfl_vmap.cli import main
from spfl_vmap.modules.backdoor import (
    AggregateNoise,
    BackdoorAdversary,
    EveryKthClient,
    Neurotoxin,
    NormBound,
    Project,
    ToolkitClipNoise,
)
from spfl_vmap.modules.byzantine import MaliciousClients

BASE = dict(dataset="synthetic", synthetic_train=300, synthetic_test=100, model="lr", partition_method="hetero",
            partition_alpha=0.5, partition_min_samples=10, client_num_in_total=6, client_num_per_round=6, comm_round=3,
            epochs=1, batch_size=7, lr=0.05, frequency_of_the_test=1, progress=False, device="cpu")


def cfg_of(**kw) -> Config:
    return Config(**{**BASE, "by_workers": 2, "bd_attack": "badnets", **kw})


def random_U(n: int, d: int, seed: int) -> torch.Tensor:
    return 0.01 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- Neurotoxin -------------------------------------------------------------------------------
def keep_reference(direction: torch.Tensor, ratio: float) -> set[int]:
    """The authors' rule written out: the int(D * ratio) smallest |direction|, ties to the lower index."""
    d = direction.tolist()
    order = sorted(range(len(d)), key=lambda j: (abs(d[j]), j))
    return set(order[: int(len(d) * ratio)])


@pytest.mark.parametrize("ratio", [0.99, 0.9, 0.5, 1.0])
def test_neurotoxin_keep_equals_reference_with_ties(ratio):
    g = torch.Generator().manual_seed(3)
    direction = torch.round(torch.randn(997, generator=g) * 4) / 4  # many equal magnitudes (ties), both signs
    keep = neurotoxin_keep(direction, ratio)
    assert set(torch.nonzero(keep).squeeze(1).tolist()) == keep_reference(direction, ratio)
    assert int(keep.sum()) == int(997 * ratio)


def test_neurotoxin_stage_equals_per_client_reference():
    sim = Simulator(cfg_of(bd_neurotoxin=0.9))
    stage = sim.stage("backdoor_neurotoxin")
    assert isinstance(stage, Neurotoxin)
    D = sim.num_params
    g = torch.Generator().manual_seed(5)
    w1, w2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    U = random_U(6, D, 6)
    mal = torch.tensor([True, False, False, True, False, False])

    ctx1 = sim.context(1)
    ctx1.global_params, ctx1.malicious = sim.spec.unflatten(w1), mal
    out1, m1 = stage.apply(ctx1, U)
    assert torch.equal(out1, U) and m1 == {}  # round 1: no previous global update, no mask

    ctx2 = sim.context(2)
    ctx2.global_params, ctx2.malicious = sim.spec.unflatten(w2), mal
    out2, m2 = stage.apply(ctx2, U)
    keep = keep_reference(w2 - w1, 0.9)
    ref = U.clone()
    for i in range(U.shape[0]):
        if bool(mal[i]):
            for j in range(D):
                if j not in keep:
                    ref[i, j] = 0.0
    assert torch.equal(out2, ref)
    assert m2["bd_neurotoxin_masked"] == D - int(D * 0.9)

    ctx4 = sim.context(4)  # round 3 was not seen: no last global update to mask with
    ctx4.global_params, ctx4.malicious = sim.spec.unflatten(w1), mal
    assert torch.equal(stage.apply(ctx4, U)[0], U)


def test_neurotoxin_state_round_trip_gives_the_same_mask():
    sim = Simulator(cfg_of(bd_neurotoxin=0.95))
    stage = sim.stage("backdoor_neurotoxin")
    D = sim.num_params
    g = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    ctx1 = sim.context(1)
    ctx1.global_params = sim.spec.unflatten(w1)
    stage.apply(ctx1, random_U(6, D, 1))
    fresh = Neurotoxin(0.95)
    fresh.load_state_dict(stage.state_dict())
    ctx2 = sim.context(2)
    ctx2.global_params, ctx2.malicious = sim.spec.unflatten(w2), torch.ones(6, dtype=torch.bool)
    U = random_U(6, D, 2)
    masked = stage.apply(ctx2, U)[0]
    assert torch.equal(fresh.apply(ctx2, U)[0], masked) and not torch.equal(masked, U)
    assert torch.equal(Neurotoxin(0.95).apply(ctx2, U)[0], U)  # the state is what masks


def test_neurotoxin_run_resumes_bit_identically(tmp_path):
    cfg = cfg_of(bd_neurotoxin=0.9, comm_round=3, checkpoint_every=1)
    full = run(cfg.replace(out=str(tmp_path / "full")))
    with pytest.raises(Killed):
        run(cfg.replace(out=str(tmp_path / "cut")), on_round=kill_at(2))
    resumed = run(cfg.replace(out=str(tmp_path / "cut")), resume_dir=tmp_path / "cut")
    for k, v in full.model_state.items():
        assert torch.equal(v, resumed.model_state[k]), k
    assert full.final["bd_neurotoxin_masked"] == resumed.final["bd_neurotoxin_masked"] > 0
    # the checkpointed state matters: a round 3 without it (no mask) ends elsewhere
    sim = Simulator(cfg)
    sim.step()
    sim.step()
    sd = sim.state_dict()
    sd["stages"]["backdoor_neurotoxin"] = {}
    lost = Simulator(cfg)
    lost.load_state_dict(sd)
    lost.step()
    assert not torch.equal(lost.w, lost.spec.flatten(full.model_state))


# ---- constrain-and-scale ----------------------------------------------------------------------
def test_project_equals_per_client_reference():
    sim = Simulator(cfg_of(bd_project=0.3))
    stage = sim.stage("backdoor_project")
    assert isinstance(stage, Project)
    ctx = sim.context(1)
    U = random_U(6, sim.num_params, 8)  # row norms ~0.89
    U[4] *= 0.1  # a malicious row inside the ball stays as it is
    ctx.malicious = torch.tensor([True, False, True, False, True, False])
    out, m = stage.apply(ctx, U)
    over = 0
    for i in range(6):
        norm = float(U[i].norm())
        if bool(ctx.malicious[i]) and norm > 0.3:
            over += 1
            torch.testing.assert_close(out[i], U[i] * (0.3 / norm), rtol=1e-5, atol=1e-7)
        else:
            assert torch.equal(out[i], U[i])
    assert m["bd_projected"] == over == 2


def test_neurotoxin_then_project_then_boost_in_pipeline_order():
    """TFF's ClientProjectBoost projects the malicious delta, then multiplies it by the boost."""
    sim = Simulator(cfg_of(bd_neurotoxin=0.9, bd_project=0.3, bd_boost=5.0, bd_defense="toolkit_clip_noise"))
    names = [s.name for s in sim.pipeline.update_stages]
    assert names.index("backdoor_neurotoxin") < names.index("backdoor_project") < names.index("backdoor_boost") \
        < names.index("backdoor_defense")
    D = sim.num_params
    g = torch.Generator().manual_seed(9)
    w1, w2 = torch.randn(D, generator=g), torch.randn(D, generator=g)
    U = random_U(6, D, 10)
    mal = torch.tensor([False, True, False, False, True, False])
    for r, w in ((1, w1), (2, w2)):
        ctx = sim.context(r)
        ctx.global_params, ctx.malicious = sim.spec.unflatten(w), mal
        out = U
        for name in ("backdoor_neurotoxin", "backdoor_project", "backdoor_boost"):
            out, _ = sim.stage(name).apply(ctx, out)
    keep = keep_reference(w2 - w1, 0.9)
    for i in range(6):
        if not bool(mal[i]):
            assert torch.equal(out[i], U[i])
            continue
        row = torch.tensor([float(U[i, j]) if j in keep else 0.0 for j in range(D)])
        row = row * min(1.0, 0.3 / float(row.norm())) * 5.0
        torch.testing.assert_close(out[i], row, rtol=1e-5, atol=1e-7)
        assert float(out[i].norm()) == pytest.approx(1.5, rel=1e-4)  # projected to 0.3, then boosted x5


# ---- schedules --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,rounds", [
    ("continuous", set(range(1, 13))),
    ("single:3", {3}),
    ("every:4", {r0 + 1 for r0 in range(0, 12, 4)}),  # FLPoison fixed-frequency: range(0, T, K) over 0-based rounds
    ("every:1", set(range(1, 13))),
    ("from:5", set(range(5, 13))),
    ("Every:5", {1, 6, 11}),
])
def test_schedule_rounds(text, rounds):
    s = parse_schedule(text)
    assert {r for r in range(1, 13) if s.active(r)} == rounds


@pytest.mark.parametrize("text", ["sometimes", "every", "every:0", "single:-1", "from:x", "single:", "every:2.5", ""])
def test_bad_schedules_are_one_line_errors(text):
    with pytest.raises(ConfigError) as e:
        parse_schedule(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw", [dict(), dict(by_mode="per_round"), dict(by_defense="median"),
                                dict(by_workers=0, backdoor_test_frequency=3)])
def test_adversary_marks_exactly_the_scheduled_rounds(kw):
    """With the Byzantine module on too (by_defense median) both modules add an adversary; the
    pipeline keeps the backdoor's, so its schedule holds."""
    cfg = cfg_of(bd_schedule="every:3", client_num_per_round=4, **kw)
    sim = Simulator(cfg)
    adv = sim.pipeline.adversary
    assert isinstance(adv, EveryKthClient if "backdoor_test_frequency" in kw else BackdoorAdversary)
    plain = MaliciousClients(cfg)
    if "backdoor_test_frequency" in kw:
        plain.malicious_ids = torch.arange(6) % 3 == 0
    for r in range(1, 9):
        ids = sim.sample_clients(r)
        mask = sim.context(r).malicious
        if r in (1, 4, 7):
            assert torch.equal(mask, plain.malicious_mask(ids, r))
        else:
            assert not bool(mask.any())
    assert any(bool(sim.context(r).malicious.any()) for r in (1, 4, 7))


def test_byzantine_adversary_is_untouched_without_a_backdoor():
    sim = Simulator(Config(**{**BASE, "by_workers": 2, "by_attack": "gaussian"}))
    assert type(sim.pipeline.adversary) is MaliciousClients
    assert all(int(sim.context(r).malicious.sum()) == 2 for r in range(1, 5))


def test_no_attack_outside_the_scheduled_rounds():
    """Round 1 of a single:2 attack is the clean run's round 1, bit for bit; round 2 is not."""
    sim = Simulator(cfg_of(bd_schedule="single:2", bd_boost=5.0, bd_project=1.0, bd_neurotoxin=0.9))
    clean = Simulator(Config(**BASE))
    m1, c1 = sim.step(), clean.step()
    assert torch.equal(sim.w, clean.w)
    assert not any(k.startswith("bd_") for k in m1)
    m2, _ = sim.step(), clean.step()
    assert m2["bd_boost"] == 5.0 and "bd_projected" in m2 and m2["bd_neurotoxin_masked"] > 0
    assert not torch.equal(sim.w, clean.w)
    m3 = sim.step()
    assert not any(k.startswith("bd_") for k in m3)


# ---- the toolkit's --backdoor_test ------------------------------------------------------------
def test_backdoor_test_sets_the_toolkit_attack():
    cfg = Config(**{**BASE, "client_num_in_total": 25, "backdoor_test": True})
    assert (cfg.bd_attack, cfg.bd_trigger, cfg.bd_target, cfg.backdoor_test_frequency) == ("badnets", "plus", 7, 10)
    assert cfg.replace(comm_round=4).backdoor_test_frequency == 10  # resolving it again changes nothing
    sim = Simulator(cfg)
    assert isinstance(sim.pipeline.adversary, EveryKthClient)
    assert sim.describe()["backdoor_adversary"]["malicious_ids"] == [0, 10, 20]
    kept = Config(**{**BASE, "backdoor_test": True, "bd_attack": "dba", "bd_trigger": "rlr_plus", "bd_target": 3,
                     "backdoor_test_frequency": 4, "backdoor_test_boost": 2.0})
    assert (kept.bd_attack, kept.bd_trigger, kept.bd_target, kept.backdoor_test_frequency) == ("dba", "rlr_plus", 3, 4)
    boosted = Simulator(kept)
    assert boosted.stage("backdoor_boost").gamma == 2.0 and boosted.describe()["backdoor"]["boost"] == 2.0


# ---- the defense: clip mode and where the noise goes ------------------------------------------
def test_global_clip_with_client_noise_equals_per_client_reference():
    sim = Simulator(Config(**{**BASE, "bd_defense": "toolkit_clip_noise", "bd_clip_mode": "global", "bd_clip": 0.5,
                              "bd_noise": 0.01}))
    stage = sim.stage("backdoor_defense")
    assert isinstance(stage, ToolkitClipNoise) and (stage.mode, stage.noise_on) == ("global", "client")
    assert not sim.pipeline.server_stages
    ctx = sim.context(1)
    U = random_U(6, sim.num_params, 11)
    U[2] *= 0.1
    out, m = stage.apply(ctx, U)
    noise = torch.randn(U.shape, generator=ctx.generator("backdoor_defense"))
    for i in range(6):
        norm = float(U[i].norm())
        torch.testing.assert_close(out[i], U[i] * min(1.0, 0.5 / norm) + 0.01 * noise[i], rtol=1e-5, atol=1e-6)
    assert m["bd_clipped"] == sum(float(U[i].norm()) > 0.5 for i in range(6)) == 5


def test_per_layer_clip_with_aggregate_noise():
    sim = Simulator(Config(**{**BASE, "backdoor_defense": True, "bd_noise_on": "aggregate", "backdoor_defense_shrink": 0.05,
                              "backdoor_defense_noise": 0.02}))
    stage, noise = sim.stage("backdoor_defense"), sim.stage("backdoor_defense_noise")
    assert (stage.mode, stage.noise_on) == ("per_layer", "aggregate")
    assert isinstance(noise, AggregateNoise) and noise in sim.pipeline.server_stages and noise.sigma == 0.02
    ctx = sim.context(1)
    U = random_U(6, sim.num_params, 12)
    out, _ = stage.apply(ctx, U)
    ref = torch.empty_like(U)
    for i in range(6):  # the clip alone, per tensor: no noise on the clients' updates
        off = 0
        for n in sim.spec.numels:
            d = U[i, off : off + n]
            ref[i, off : off + n] = d / max(1.0, float(d.norm()) / 0.05)
            off += n
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-7)
    agg = U.mean(0)
    torch.testing.assert_close(noise.apply(ctx, agg)[0], agg + 0.02 * torch.randn(agg.shape, generator=ctx.generator("backdoor_defense_noise")))


def test_norm_bound_is_the_shorthand_for_global_clip_with_aggregate_noise():
    kw = {**BASE, "bd_clip": 0.4, "bd_noise": 0.1}
    short = Simulator(Config(**kw, bd_defense="norm_bound"))
    spelled = Simulator(Config(**kw, bd_defense="toolkit_clip_noise", bd_clip_mode="global", bd_noise_on="aggregate"))
    a, b = short.stage("norm_bound"), spelled.stage("backdoor_defense")
    assert isinstance(a, NormBound) and isinstance(a, ToolkitClipNoise) and type(b) is ToolkitClipNoise
    assert (a.mode, a.noise_on, a.shrink) == (b.mode, b.noise_on, b.shrink) == ("global", "aggregate", 0.4)
    ctx = short.context(1)
    U = random_U(6, short.num_params, 13)
    assert torch.equal(a.apply(ctx, U)[0], b.apply(ctx, U)[0])
    assert short.describe()["backdoor_defense"]["defense"] == "norm_bound"
    assert {k: v for k, v in short.describe()["backdoor_defense"].items() if k != "defense"} == \
        {k: v for k, v in spelled.describe()["backdoor_defense"].items() if k != "defense"}
    Config(**kw, bd_defense="norm_bound", bd_clip_mode="global", bd_noise_on="aggregate")  # restating it is fine


# ---- bad flags: one line, exit status 2 --------------------------------------------------------
RUN = ["run", "--dataset", "synthetic", "--client_num_in_total", "6", "--client_num_per_round", "6", "--comm_round", "1",
       "--no-progress"]
ATTACK = ["--bd_attack", "badnets", "--by_workers", "2"]


@pytest.mark.parametrize("flags,words", [
    ([*ATTACK, "--bd_schedule", "sometimes"], "--bd_schedule"),
    ([*ATTACK, "--bd_schedule", "every:0"], "--bd_schedule"),
    ([*ATTACK, "--bd_schedule", "single:x"], "--bd_schedule"),
    ([*ATTACK, "--bd_neurotoxin", "1.5"], "--bd_neurotoxin"),
    ([*ATTACK, "--bd_neurotoxin", "0"], "--bd_neurotoxin"),
    ([*ATTACK, "--bd_neurotoxin", "lots"], "--bd_neurotoxin"),
    ([*ATTACK, "--bd_project", "-1"], "--bd_project"),
    ([*ATTACK, "--bd_project", "nan"], "--bd_project"),
    (["--bd_neurotoxin", "0.9"], "need --bd_attack"),
    (["--bd_schedule", "single:2", "--bd_project", "1"], "--bd_project, --bd_schedule"),
    (["--backdoor_test_boost", "2"], "need --bd_attack"),
    (["--bd_defense", "toolkit_clip_noise", "--bd_clip_mode", "layer"], "--bd_clip_mode must be"),
    (["--bd_defense", "toolkit_clip_noise", "--bd_noise_on", "server"], "--bd_noise_on must be"),
    (["--bd_clip_mode", "global"], "give one"),
    (["--bd_defense", "norm_bound", "--bd_clip_mode", "per_layer"], "norm_bound is the global clip"),
    (["--bd_defense", "norm_bound", "--bd_noise_on", "client"], "norm_bound is the global clip"),
    (["--backdoor_test", "--bd_boost", "2", "--backdoor_test_boost", "3"], "not both"),
    (["--backdoor_test", "--bd_boost_auto", "--backdoor_test_boost", "3"], "not both"),
    (["--backdoor_test", "--backdoor_test_boost", "0"], "--backdoor_test_boost must be"),
    (["--backdoor_test", "--by_workers", "2"], "--backdoor_test chooses the malicious clients"),
])
def test_bad_flags_are_one_line_errors(capsys, flags, words):
    assert main([*RUN, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert words in err, err



def test_backdoor_test_run_states_how_it_differs_from_the_toolkit(tmp_path, capsys):
    argv = ["run", "--dataset", "synthetic", "--synthetic_train", "300", "--synthetic_test", "100",
            "--client_num_in_total", "6", "--client_num_per_round", "6", "--comm_round", "1", "--no-progress",
            "--backdoor-test", "--backdoor-test-frequency", "4", "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "note: --backdoor_test: each attacker (client index % 4 == 0) trains once, on batches with 0.5" in out
