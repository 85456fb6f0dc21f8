"""Backdoor module: config section, poisoning stage, boost, defenses, ASR hook, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import functional_call

from spfl_vmap import Config, ConfigError, Simulator
from spfl_vmap.attacks.backdoor import attack_success, content_keys, hash_uniform, poison_rows_reference
from spfl_vmap.modules.backdoor import AggregateNoise, BackdoorPoison, Boost, NormBound, ToolkitClipNoise
from spfl_vmap.modules.byzantine import MaliciousClients
from spfl_vmap.rng import derive_seed



BASE = dict(dataset="synthetic", synthetic_train=300, synthetic_test=100, model="lr", partition_method="hetero",
            partition_alpha=0.5, partition_min_samples=10, client_num_in_total=6, client_num_per_round=6, comm_round=2,
            epochs=2, batch_size=7, lr=0.05, frequency_of_the_test=1, progress=False, device="cpu")


def cfg_of(**kw) -> Config:
    return Config(**{**BASE, "by_workers": 2, "bd_attack": "badnets", **kw})


# ---- config section ---------------------------------------------------------------------------
@pytest.mark.parametrize("kw,words", [
    (dict(bd_attack="trojan"), "unknown --bd_attack"),
    (dict(bd_trigger="star"), "unknown --bd_trigger"),
    (dict(bd_defense="flame"), "unknown --bd_defense"),
    (dict(dataset="digits", bd_trigger_size=9), "does not fit"),
    (dict(dataset="digits", bd_trigger="rlr_plus"), "does not fit"),
    (dict(bd_trigger_location="26,26"), "does not fit"),
    (dict(bd_trigger_location="middle"), "location"),
    (dict(bd_target=10), "--bd_target"),
    (dict(bd_source=-1), "--bd_source"),
    (dict(bd_source=7), "differ"),
    (dict(by_workers=0), "needs malicious clients"),
    (dict(bd_poison_frac=0.0), "--bd_poison_frac"),
    (dict(bd_boost=2.0, bd_boost_auto=True), "not both"),
    (dict(bd_boost=-1.0), "--bd_boost"),
    (dict(bd_attack="none", bd_boost=10.0), "need --bd_attack"),
    (dict(bd_attack="dba", bd_trigger_size=1), "DBA parts"),
    (dict(bd_clip=0.0), "--bd_clip"),
    (dict(bd_noise=float("nan")), "--bd_noise"),
    (dict(by_attack="gaussian"), "choose one"),
    (dict(by_workers=0, backdoor_test_frequency=0), "--backdoor_test_frequency must be"),
    (dict(backdoor_test_frequency=3), "drop --by_workers"),
    (dict(by_workers=0, bd_attack="none", backdoor_test_frequency=3), "needs --bd_attack"),
    (dict(backdoor_defense=True, bd_defense="norm_bound"), "cannot be combined"),
    (dict(backdoor_defense=True, backdoor_defense_shrink=0.5, bd_clip=2.0), "not both"),
    (dict(backdoor_defense_noise=0.1), "needs --backdoor_defense"),
])
def test_config_errors_are_one_line(kw, words):
    with pytest.raises(ConfigError) as e:
        cfg_of(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_adversary_is_the_byzantine_one_with_or_without_that_module():
    for extra in ({}, {"by_defense": "median"}):
        sim = Simulator(cfg_of(**extra))
        adv = sim.pipeline.adversary
        assert isinstance(adv, MaliciousClients)
        assert torch.equal(adv.malicious_ids, MaliciousClients(sim.cfg).malicious_ids)
        assert int(adv.malicious_ids.sum()) == 2


def test_toolkit_flags():
    sim = Simulator(cfg_of(by_workers=0, backdoor_test_frequency=4, backdoor_defense=True, backdoor_defense_shrink=0.5,
                           backdoor_defense_noise=0.04))
    assert sim.pipeline.adversary.malicious_ids.tolist() == [k % 4 == 0 for k in range(6)]  # clients 0 and 4
    assert torch.equal(sim.context(1).malicious, torch.tensor([k % 4 == 0 for k in sim.context(1).client_ids]))
    stage = sim.stage("backdoor_defense")
    assert isinstance(stage, ToolkitClipNoise) and (stage.shrink, stage.noise) == (0.5, 0.04)


# ---- the poisoning stage ----------------------------------------------------------------------
def poison_reference(stage: BackdoorPoison, ctx, x, y, rows, value, target, frac, source=None, valid=None):
    """Per client, per slot: hash score, selection by the Python reference, trigger pixel by pixel."""
    seed = derive_seed(ctx.seed, "backdoor", ctx.round)
    n, B = y.shape
    scores = torch.empty(n, B, dtype=torch.float64)
    for i in range(n):
        cid = ctx.client_ids[int(rows[i])]
        for j in range(B):
            scores[i, j] = hash_uniform(seed, torch.tensor(cid), content_keys(x[i, j], y[i, j]), torch.tensor(j))
    mal = ctx.malicious[rows]
    elig = torch.ones(n, B, dtype=torch.bool) if valid is None else valid.clone()
    if source is not None:
        elig &= y == source
    chosen = poison_rows_reference(mal, B, frac, scores, elig)
    x2, y2 = x.clone(), y.clone()
    for i in range(n):
        m = stage.row_masks(ctx, rows[i : i + 1])
        m = m if m.dim() == 2 else m[0, 0]
        for j in range(B):
            if chosen[i, j]:
                for r, c in m.nonzero().tolist():
                    x2[i, j, :, r, c] = value
                y2[i, j] = target
    return x2, y2, chosen


@pytest.mark.parametrize("kw", [dict(), dict(bd_source=3, bd_poison_frac=0.6), dict(bd_attack="dba", bd_trigger_size=4),
                                dict(bd_attack="dba", by_mode="per_round", bd_trigger="plus")])
def test_poisoning_hits_exactly_the_malicious_rows_and_fraction(kw):
    sim = Simulator(cfg_of(**kw))
    stage = sim.stage("backdoor_poison")
    ctx = sim.context(1)
    g = torch.Generator().manual_seed(0)
    n, B = ctx.num_clients, 20
    idx = torch.randint(0, len(sim.dataset.y_train), (n, B), generator=g)
    x, y = sim.dataset.x_train[idx], sim.dataset.y_train[idx]
    rows = torch.arange(n)
    real = torch.randint(1, B + 1, (n,), generator=g)  # a padded last batch: only the first real[i] slots hold samples
    valid = torch.arange(B)[None, :] < real[:, None]  # (n, B)
    (x2, y2), _ = stage.apply(ctx, x, y, rows, valid)
    cfg = sim.cfg
    value = float(sim.dataset.x_train.max())
    rx, ry, chosen = poison_reference(stage, ctx, x, y, rows, value, cfg.bd_target, cfg.bd_poison_frac, cfg.bd_source, valid)
    assert torch.equal(x2, rx) and torch.equal(y2, ry)
    changed = (x2 != x).flatten(2).any(2) | (y2 != y)
    assert torch.equal(changed, chosen)
    mal = ctx.malicious
    assert int(mal.sum()) >= 1 and not bool(changed[~mal].any())
    for i in torch.nonzero(mal).squeeze(1).tolist():
        m = int((valid[i] & ((y[i] == cfg.bd_source) if cfg.bd_source is not None else True)).sum())
        assert int(chosen[i].sum()) == math.floor(cfg.bd_poison_frac * m + 1e-9)
    assert not bool(changed[~valid].any())  # padding is never poisoned
    # the same rows in chunks of one give the same batches (vectorized = per client)
    for i in range(n):
        (xi, yi), _ = stage.apply(ctx, x[i : i + 1], y[i : i + 1], rows[i : i + 1], valid[i : i + 1])
        assert torch.equal(xi, x2[i : i + 1]) and torch.equal(yi, y2[i : i + 1])
        b = int(real[i])  # the per-client engines pass the real samples only
        (xr, yr), _ = stage.apply(ctx, x[i : i + 1, :b], y[i : i + 1, :b], rows[i : i + 1], valid[i : i + 1, :b])
        assert torch.equal(xr, x2[i : i + 1, :b]) and torch.equal(yr, y2[i : i + 1, :b])


def test_dba_attackers_use_their_rank_among_malicious_ids():
    sim = Simulator(cfg_of(bd_attack="dba", bd_trigger_size=4, by_workers=3))
    stage = sim.stage("backdoor_poison")
    ctx = sim.context(1)
    ids = sorted(torch.nonzero(sim.pipeline.adversary.malicious_ids).squeeze(1).tolist())
    masks = stage.row_masks(ctx, torch.arange(ctx.num_clients))
    for rank, cid in enumerate(ids):
        assert torch.equal(masks[ctx.client_ids.index(cid), 0], stage.parts[rank % 4])


@pytest.mark.parametrize("kw", [dict(), dict(bd_attack="dba", bd_trigger_size=4, by_mode="per_round")])
def test_chunking_does_not_change_the_run(kw):
    finals = []
    for chunk in (1, 4, 6):
        sim = Simulator(cfg_of(strategy="vmap", client_chunk=chunk, **kw))
        sim.step()
        sim.step()
        finals.append(sim.w.clone())
    clean = Simulator(Config(**{**BASE, "strategy": "vmap"}))
    clean.step()
    clean.step()
    for w in finals[1:]:
        assert float((w - finals[0]).norm() / finals[0].norm()) < 1e-5
    assert float((clean.w - finals[0]).norm() / finals[0].norm()) > 1e-3  # the poisoning did change the run


# ---- boost and defenses -----------------------------------------------------------------------
def test_boost_uses_the_actual_cohort_size():
    sim = Simulator(cfg_of(bd_boost_auto=True, server_lr=0.5, client_num_per_round=4))
    stage = sim.stage("backdoor_boost")
    ctx = sim.context(1, client_ids=[0, 1, 2])  # 3 clients, not the expected 4
    ctx.malicious = torch.tensor([True, False, True])
    U = torch.randn(3, sim.num_params, generator=torch.Generator().manual_seed(0))
    out, m = stage.apply(ctx, U)
    gamma = 3 / 0.5
    assert m["bd_boost"] == gamma
    assert torch.allclose(out[0], gamma * U[0]) and torch.equal(out[1], U[1]) and torch.allclose(out[2], gamma * U[2])
    fixed, _ = Boost(10.0).apply(ctx, U)
    assert torch.allclose(fixed[2], 10.0 * U[2])


def test_toolkit_clip_noise_equals_per_client_reference():
    sim = Simulator(Config(**{**BASE, "bd_defense": "toolkit_clip_noise", "bd_clip": 0.05, "bd_noise": 0.01}))
    stage = sim.stage("backdoor_defense")
    assert isinstance(stage, ToolkitClipNoise)
    ctx = sim.context(1)
    U = 0.0004 * torch.randn(ctx.num_clients, sim.num_params, generator=torch.Generator().manual_seed(1))
    U[0] *= 1000  # client 0's tensors over the bound (norms ~35 and ~1.3), the others' under (~0.035, ~0.0013)
    out, m = stage.apply(ctx, U)
    noise = torch.randn(U.shape, generator=ctx.generator("backdoor_defense"))
    ref = torch.empty_like(U)
    clipped = 0
    for i in range(U.shape[0]):
        off = 0
        for n in sim.spec.numels:
            d = U[i, off : off + n]
            norm = float(d.norm())
            clipped += norm > 0.05
            ref[i, off : off + n] = d / max(1.0, norm / 0.05) + 0.01 * noise[i, off : off + n]
            off += n
    assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
    assert m["bd_clipped_tensors"] == clipped and clipped == len(sim.spec.numels)


def test_norm_bound_and_aggregate_noise_equal_references():
    sim = Simulator(Config(**{**BASE, "bd_defense": "norm_bound", "bd_clip": 0.5, "bd_noise": 0.1}))
    clip, noise = sim.stage("norm_bound"), sim.stage("norm_bound_noise")
    assert isinstance(clip, NormBound) and isinstance(noise, AggregateNoise) and noise in sim.pipeline.server_stages
    ctx = sim.context(1)
    U = torch.randn(ctx.num_clients, sim.num_params, generator=torch.Generator().manual_seed(2)) * 0.02
    out, _ = clip.apply(ctx, U)
    for i in range(U.shape[0]):
        norm = float(U[i].norm())
        assert torch.allclose(out[i], U[i] * min(1.0, 0.5 / norm), atol=1e-6)
    agg = U.mean(0)
    noisy, _ = noise.apply(ctx, agg)
    assert torch.allclose(noisy, agg + 0.1 * torch.randn(agg.shape, generator=ctx.generator("norm_bound_noise")))


# ---- attack success and end to end ------------------------------------------------------------
def run_to_end(cfg: Config) -> tuple[Simulator, dict]:
    sim = Simulator(cfg)
    m: dict = {}
    while not sim.done:
        m = sim.step()
    return sim, m


def test_asr_hook_equals_loop_reference_and_rises_with_the_attack():
    kw = dict(partition_method="homo", comm_round=3, frequency_of_the_test=3, epochs=1, batch_size=10)
    sim, m = run_to_end(cfg_of(**kw))
    # reference: one test image at a time, the trigger stamped pixel by pixel
    mask, value, target = sim.stage("backdoor_poison").mask, float(sim.dataset.x_train.max()), sim.cfg.bd_target
    params = sim.global_params
    hits = keep = hits_all = 0
    for xi, yi in zip(sim.dataset.x_test, sim.dataset.y_test):
        xt = xi.clone()
        for r, c in mask.nonzero().tolist():
            xt[:, r, c] = value
        hit = int(functional_call(sim.model, params, (xt[None],)).argmax(1)) == target
        hits_all += hit
        if int(yi) != target:
            keep, hits = keep + 1, hits + hit
    assert m["asr"] == pytest.approx(hits / keep) and m["asr_all"] == pytest.approx(hits_all / len(sim.dataset.y_test))
    # the same run without the attack: the trigger does not steer the clean model to the target
    clean, mc = run_to_end(Config(**{**BASE, **kw}))
    assert "asr" not in mc
    base = attack_success(lambda xb: functional_call(clean.model, clean.global_params, (xb,)), clean.x_test, clean.y_test,
                          mask, value, target)
    assert m["asr"] > 0.8 and base["asr"] < 0.3 and m["asr"] > base["asr"] + 0.5
    assert abs(m["test_acc"] - mc["test_acc"]) < 0.1  # the backdoor leaves the main task intact


def test_dba_end_to_end_full_trigger_on_digits():
    cfg = Config(dataset="digits", model="lr", client_num_in_total=8, client_num_per_round=8, partition_method="homo",
                 comm_round=4, frequency_of_the_test=4, batch_size=10, lr=0.1, progress=False, device="cpu",
                 by_workers=4, bd_attack="dba", bd_trigger_size=4, bd_trigger_location="top_left", bd_target=2)
    _, m = run_to_end(cfg)
    clean, _ = run_to_end(cfg.replace(bd_attack="none", by_workers=0))
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :4] = True
    base = attack_success(lambda xb: functional_call(clean.model, clean.global_params, (xb,)), clean.x_test, clean.y_test,
                          mask, float(clean.dataset.x_train.max()), 2)
    assert m["asr"] > base["asr"] + 0.3


@pytest.mark.parametrize("partition,batch", [("homo", 10), ("hetero", 7)])
def test_engines_poison_the_same_samples(monkeypatch, partition, batch):
    """The vmap trainer (which pads a client's last partial batch), the threaded per-client loop
    strategy and the reference loop engine (real samples only) poison the same samples: the
    poisoned count is a fraction of the real samples (``valid``), never of the padding."""
    monkeypatch.setenv("SPFL_LOOP_WORKERS", "2")  # the loop strategy's threaded path
    kw = dict(partition_method=partition, batch_size=batch, comm_round=1, bd_attack="dba", bd_trigger_size=4)
    runs = {}
    for name, extra in {"vmap": dict(strategy="vmap"), "loop_strategy": dict(strategy="loop"), "loop_engine": dict(engine="loop")}.items():
        sim = Simulator(cfg_of(**kw, **extra))
        if partition == "hetero":
            assert any(c % batch for c in sim.counts), "some client must have a partial last batch"
        sim.step()
        runs[name] = sim.w.clone()
    for name in ("loop_strategy", "loop_engine"):
        assert float((runs[name] - runs["vmap"]).norm() / runs["vmap"].norm()) < 1e-5
