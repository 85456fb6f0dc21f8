"""Backdoor attacks and the clip-and-noise defenses as round stages.

The malicious clients are the Byzantine module's (``--by_workers`` / ``--by_frac`` /
``--by_mode``): this module adds the same :class:`~spfl_vmap.modules.byzantine.MaliciousClients`
adversary (when both modules are on, both add an identical one and the pipeline keeps the last).
The authors' toolkit chose them as ``client index % --backdoor_test_frequency == 0``
(:class:`EveryKthClient`); its ``--backdoor_defense`` / ``--backdoor_defense_shrink`` /
``--backdoor_defense_noise`` are ``--bd_defense toolkit_clip_noise --bd_clip --bd_noise``.

Stages (see ``spfl_vmap.stages``):

* :class:`BackdoorPoison` (batch transform): in each malicious client's batch, a fraction of the
  slots get the trigger and the target label (BadNets, Gu et al. 2017; DBA, Xie et al. ICLR
  2020, where attacker ``i`` embeds local trigger ``i mod 4``);
* :class:`Boost` (update stage): model replacement, the malicious rows of ``U`` scaled by
  ``gamma`` (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020; automatic
  ``gamma = n / eta``, clients this round over the server learning rate);
* :class:`ToolkitClipNoise` (update stage): the authors' toolkit defense, per-layer clip and
  per-client noise (``modules/backdoor_defense/defense.py``);
* :class:`NormBound` (update stage) and :class:`AggregateNoise` (server stage): Sun et al.,
  "Can You Really Backdoor Federated Learning?" (2019): whole-update norm bound, then weak DP
  noise on the aggregate;
* :class:`AttackSuccess` (evaluation hook): ``asr`` and the toolkit's ``asr_all``.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any

import torch
from torch.func import functional_call

from spfl_kernels import clip_rows

from ..attacks.backdoor import (
    DBA_PARTS,
    TRIGGERS,
    attack_success,
    content_keys,
    dba_parts,
    hash_uniform,
    parse_location,
    poison_batch,
    poison_rows,
    trigger_mask,
)
from ..config import SECTIONS, Config, need
from ..data import dataset_meta
from ..errors import ConfigError, SpflError
from ..stages import BatchTransform, BuildEnv, EvalHook, Metrics, Params, RoundContext, ServerStage, Stage, UpdateStage
from .byzantine import MaliciousClients, num_byzantine

BD_ATTACKS = ("none", "badnets", "dba")
BD_DEFENSES = ("none", "toolkit_clip_noise", "norm_bound")


# ---- the config section -----------------------------------------------------------------------
def backdoor_on(cfg: Config) -> bool:
    return cfg.bd_attack != "none"


def defense(cfg: Config) -> str:
    """The defense in force: ``--bd_defense``, or ``toolkit_clip_noise`` for the toolkit's
    ``--backdoor_defense``."""
    return "toolkit_clip_noise" if cfg.bd_defense == "none" and cfg.backdoor_defense else cfg.bd_defense


def defense_clip(cfg: Config) -> float:
    """``--bd_clip``, or the toolkit's ``--backdoor_defense_shrink``."""
    return cfg.backdoor_defense_shrink if cfg.backdoor_defense_shrink is not None else cfg.bd_clip


def defense_noise(cfg: Config) -> float:
    """``--bd_noise``, or the toolkit's ``--backdoor_defense_noise``."""
    return cfg.backdoor_defense_noise if cfg.backdoor_defense_noise is not None else cfg.bd_noise


def num_malicious(cfg: Config) -> int:
    """Malicious clients in the population (fixed mode) or per cohort (per_round mode)."""
    if cfg.backdoor_test_frequency is not None:
        return (cfg.client_num_in_total - 1) // cfg.backdoor_test_frequency + 1  # indices 0, K, 2K, ...
    return num_byzantine(cfg)


def validate_toolkit_flags(cfg: Config) -> None:
    """The original toolkit's ``--backdoor_*`` flags against their ``--bd_*`` equivalents."""
    defaults = {f.name: f.default for f in fields(Config)}
    need(not (cfg.backdoor_defense and cfg.bd_defense not in ("none", "toolkit_clip_noise")),
         f"--backdoor_defense is the toolkit's clip-and-noise defense; it cannot be combined with --bd_defense {cfg.bd_defense}")
    for toolkit, ours in (("backdoor_defense_shrink", "bd_clip"), ("backdoor_defense_noise", "bd_noise")):
        v = getattr(cfg, toolkit)
        if v is None:
            continue
        need(getattr(cfg, ours) == defaults[ours], f"give --{ours} or the toolkit's --{toolkit}, not both")
        need(defense(cfg) == "toolkit_clip_noise", f"--{toolkit} needs --backdoor_defense (or --bd_defense toolkit_clip_noise)")
    if cfg.backdoor_test_frequency is not None:
        need(cfg.backdoor_test_frequency >= 1, f"--backdoor_test_frequency must be >= 1, got {cfg.backdoor_test_frequency}")
        need(backdoor_on(cfg), "--backdoor_test_frequency chooses the backdoor attackers: it needs --bd_attack badnets or dba")
        need(not cfg.by_workers and not cfg.by_frac and cfg.by_mode == "fixed",
             "--backdoor_test_frequency chooses the malicious clients itself: drop --by_workers/--by_frac/--by_mode per_round")


def global_trigger(cfg: Config) -> torch.Tensor:
    """``(H, W)`` bool: the configured trigger for the dataset's image size."""
    _, h, w = dataset_meta(cfg.dataset).input_shape
    return trigger_mask(cfg.bd_trigger, h, w, cfg.bd_trigger_size, parse_location(cfg.bd_trigger_location))


@SECTIONS.register("backdoor")
def validate(cfg: Config) -> None:
    """The ``--bd_*`` flags: names, label ranges, the trigger against the image size, malicious
    clients for an attack, the boost and the defense bounds."""
    need(cfg.bd_attack in BD_ATTACKS, f"unknown --bd_attack {cfg.bd_attack!r}; choose one of: {', '.join(BD_ATTACKS)}")
    need(cfg.bd_trigger in TRIGGERS, f"unknown --bd_trigger {cfg.bd_trigger!r}; choose one of: {', '.join(TRIGGERS)}")
    need(cfg.bd_defense in BD_DEFENSES, f"unknown --bd_defense {cfg.bd_defense!r}; choose one of: {', '.join(BD_DEFENSES)}")
    need(math.isfinite(defense_clip(cfg)) and defense_clip(cfg) > 0, f"--bd_clip must be a finite number > 0, got {defense_clip(cfg)}")
    need(math.isfinite(defense_noise(cfg)) and defense_noise(cfg) >= 0, f"--bd_noise must be a finite number >= 0, got {defense_noise(cfg)}")
    validate_toolkit_flags(cfg)
    attack_flags = cfg.bd_boost is not None or cfg.bd_boost_auto or cfg.bd_source is not None
    if not backdoor_on(cfg):
        need(not attack_flags, "--bd_boost, --bd_boost_auto and --bd_source need --bd_attack badnets or dba")
        return
    meta = dataset_meta(cfg.dataset)
    classes = meta.num_classes
    need(0 <= cfg.bd_target < classes, f"--bd_target must be in [0, {classes}) for {cfg.dataset}, got {cfg.bd_target}")
    if cfg.bd_source is not None:
        need(0 <= cfg.bd_source < classes, f"--bd_source must be in [0, {classes}) for {cfg.dataset}, got {cfg.bd_source}")
        need(cfg.bd_source != cfg.bd_target, "--bd_source must differ from --bd_target")
    need(cfg.bd_trigger_size >= 1, f"--bd_trigger_size must be >= 1, got {cfg.bd_trigger_size}")
    try:
        mask = global_trigger(cfg)
        if cfg.bd_attack == "dba":
            dba_parts(mask, DBA_PARTS)
    except ConfigError as e:
        raise ConfigError(f"--bd_trigger {cfg.bd_trigger}: {e}") from None
    need(0.0 < cfg.bd_poison_frac <= 1.0, f"--bd_poison_frac must be in (0, 1], got {cfg.bd_poison_frac}")
    if cfg.bd_boost is not None:
        need(math.isfinite(cfg.bd_boost) and cfg.bd_boost > 0, f"--bd_boost must be a finite number > 0, got {cfg.bd_boost}")
        need(not cfg.bd_boost_auto, "give --bd_boost or --bd_boost_auto, not both")
    need(num_malicious(cfg) > 0, f"--bd_attack {cfg.bd_attack} needs malicious clients: set --by_workers or --by_frac > 0")


# ---- stages -------------------------------------------------------------------------------------
def trigger_value(x: torch.Tensor) -> torch.Tensor:
    """``(C,)`` the data range's maximum per channel after normalization (a white pixel)."""
    return x.amax(dim=(0, 2, 3))


class EveryKthClient(MaliciousClients):
    """The authors' toolkit's attackers: client index ``% --backdoor_test_frequency == 0``
    (``modules/backdoor_defense``; default 10, ``test/backdoor.sh`` 15 with 10 clients: client 0)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        K = cfg.client_num_in_total
        self.malicious_ids = torch.arange(K) % cfg.backdoor_test_frequency == 0  # (K,)
        self.count = int(self.malicious_ids.sum())

    def describe(self) -> dict[str, Any]:
        return {"backdoor_adversary": {"rule": f"client index % {self.cfg.backdoor_test_frequency} == 0",
                                       "malicious_clients": self.count}}


class BackdoorPoison(BatchTransform):
    """Triggers and relabels a fraction of every malicious client's batch (round step 4).

    Which slots are poisoned: :func:`~spfl_vmap.attacks.backdoor.poison_rows` with scores
    ``hash_uniform(derive_seed(seed, "backdoor", round), client id, sample, slot)``, where the
    sample is identified by :func:`~spfl_vmap.attacks.backdoor.content_keys` (the exact bits of
    its pixels and its label). A transform is called once per local step per chunk and is not
    told the step, and a chunk runs the steps where any of its clients is active, so a
    generator drawn per call would depend on ``--client_chunk``; the hash depends only on the
    round, the client and its batch, so the poisoned slots are the same for every chunking
    (and for every device). The poisoned count per batch is exact: ``floor(frac * m)`` of the
    ``m`` real samples of the batch (``valid``; padding slots are never eligible), so the
    vectorized and the per-client engines poison the same samples.

    DBA: attacker ``i`` uses local trigger ``i mod 4``, where ``i`` is the client's rank among
    all malicious client ids (``--by_mode fixed``) or among the round's malicious clients
    (``per_round``).
    """

    name = "backdoor_poison"

    def __init__(self, cfg: Config, env: BuildEnv, adversary: MaliciousClients) -> None:
        self.cfg = cfg
        self.device = env.device
        self.mask = global_trigger(cfg).to(env.device)  # (H, W)
        self.value = trigger_value(env.packed.x)  # (C,)
        self.parts = dba_parts(self.mask, DBA_PARTS) if cfg.bd_attack == "dba" else None  # (4, H, W)
        self.fixed = cfg.by_mode == "fixed"
        rank = torch.cumsum(adversary.malicious_ids.long(), 0) - 1  # (K,) rank among the malicious ids
        self.part_of_client = (rank.clamp(min=0) % DBA_PARTS).to(env.device)  # (K,)

    def row_masks(self, ctx: RoundContext, rows: torch.Tensor) -> torch.Tensor:
        """The trigger each row embeds: ``(H, W)`` (BadNets) or ``(n, 1, H, W)`` (DBA)."""
        if self.parts is None:
            return self.mask
        if self.fixed:
            ids = torch.tensor(ctx.client_ids, dtype=torch.long, device=self.device)[rows.to(self.device)]
            part = self.part_of_client[ids]  # (n,)
        else:
            part = ((torch.cumsum(ctx.malicious.long(), 0) - 1).clamp(min=0) % DBA_PARTS)[rows]
        return self.parts[part][:, None]  # (n, 1, H, W)

    def poisoned(self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``(n, B)`` bool: the real slots (``valid``) of ``x (n, B, C, H, W)``, ``y (n, B)`` that are poisoned."""
        n, B = y.shape
        ids = torch.tensor(ctx.client_ids, dtype=torch.long, device=y.device)[rows.to(y.device)]  # (n,)
        slots = torch.arange(B, device=y.device)
        scores = hash_uniform(ctx.seed_for("backdoor"), ids[:, None], content_keys(x, y), slots[None, :])  # (n, B)
        eligible = valid.to(y.device) & ((y == self.cfg.bd_source) if self.cfg.bd_source is not None else True)
        return poison_rows(ctx.malicious[rows].to(y.device), B, self.cfg.bd_poison_frac, eligible=eligible, scores=scores)

    def apply(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Metrics]:
        if not bool(ctx.malicious[rows].any()):
            return (x, y), {}
        poisoned = self.poisoned(ctx, x, y, rows, valid)
        return poison_batch(x, y, poisoned, self.row_masks(ctx, rows), self.value.to(x.device), self.cfg.bd_target), {}

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"backdoor": {"attack": c.bd_attack, "target": c.bd_target, "source": c.bd_source, "trigger": c.bd_trigger,
                             "trigger_pixels": int(self.mask.sum()), "poison_frac": c.bd_poison_frac,
                             "trigger_value": [float(v) for v in self.value],
                             "boost": "auto (clients / server lr)" if c.bd_boost_auto else c.bd_boost}}


class Boost(UpdateStage):
    """Model replacement (Bagdasaryan et al. 2020): the malicious rows of ``U (N, D)`` times gamma.

    The attacker uploads ``gamma (X - G)`` so that the averaged model lands near its own ``X``;
    with ``N`` equally weighted clients and server learning rate ``eta``, ``gamma = N / eta``
    (``--bd_boost_auto``, from the round's actual cohort: ``ctx.num_clients / ctx.server_lr``).
    """

    name = "backdoor_boost"

    def __init__(self, gamma: float | None) -> None:
        self.gamma = gamma  # None = automatic

    def factor(self, ctx: RoundContext) -> float:
        return self.gamma if self.gamma is not None else ctx.num_clients / ctx.server_lr

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        mal = ctx.malicious.to(U.device)
        if not bool(mal.any()):
            return U, {}
        g = self.factor(ctx)
        return torch.where(mal[:, None], U * g, U), {"bd_boost": g}


class ToolkitClipNoise(UpdateStage):
    """The authors' toolkit defense, per layer (``modules/backdoor_defense/defense.py``).

    For every client and every parameter tensor ``k``: ``Δk / max(1, ‖Δk‖ / shrink)`` plus
    ``noise * N(0, I)`` drawn per client. The clip is per tensor, not per update, so the
    effective bound of a whole update is ``shrink * sqrt(#tensors)``. The toolkit also noised
    buffers; this acts on ``U``, which holds the parameters only (``ctx.spec``), so buffers are
    never noised.
    """

    name = "backdoor_defense"

    def __init__(self, shrink: float, noise: float) -> None:
        self.shrink, self.noise = shrink, noise

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        numels = torch.tensor(ctx.spec.numels, device=U.device)
        seg = torch.repeat_interleave(torch.arange(len(numels), device=U.device), numels)  # (D,) tensor of each coordinate
        sq = torch.zeros(U.shape[0], len(numels), device=U.device, dtype=torch.float32)
        sq.index_add_(1, seg, U.float() ** 2)
        norms = sq.sqrt()  # (N, T) per-client, per-tensor norms
        factor = 1.0 / torch.clamp(norms / self.shrink, min=1.0)  # (N, T)
        out = (U.float() * factor[:, seg]).to(U.dtype)
        if self.noise > 0:
            g = ctx.generator("backdoor_defense", device=U.device)
            out = out + self.noise * torch.randn(U.shape, generator=g, device=U.device, dtype=U.dtype)
        return out, {"bd_clipped_tensors": int((norms > self.shrink).sum())}


class NormBound(UpdateStage):
    """Norm bounding (Sun et al. 2019): each client's whole update clipped to L2 norm ``M``."""

    name = "norm_bound"

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        clipped, norms = clip_rows(U, self.bound)
        return clipped, {"bd_clipped": int((norms > self.bound).sum())}


class AggregateNoise(ServerStage):
    """Weak differential privacy (Sun et al. 2019): Gaussian noise ``N(0, sigma^2 I)`` on the
    aggregate update ``(D,)``; with a plain SGD server at learning rate 1 this is noise on the
    global model, as in the paper."""

    name = "norm_bound_noise"

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def apply(self, ctx: RoundContext, agg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        g = ctx.generator("norm_bound_noise", device=agg.device)
        return agg + self.sigma * torch.randn(agg.shape, generator=g, device=agg.device, dtype=agg.dtype), {}


class AttackSuccess(EvalHook):
    """At every evaluation: ``asr`` (triggered test images whose true class is not the target,
    or of the source class for one-to-one, classified as the target) and ``asr_all`` (every
    triggered test image, the authors' toolkit's "backdoor accuracy"). DBA tests the full
    trigger, the union of the local ones."""

    name = "attack_success"

    def __init__(self, cfg: Config, env: BuildEnv, mask: torch.Tensor, value: torch.Tensor) -> None:
        if env.x_test is None or env.y_test is None:
            raise SpflError("the backdoor module's attack-success metric needs the test set (BuildEnv.x_test, y_test)")
        self.x, self.y = env.x_test, env.y_test
        self.mask, self.value = mask, value
        self.target, self.source, self.batch = cfg.bd_target, cfg.bd_source, cfg.eval_batch_size

    def evaluate(self, ctx: RoundContext, model: Any, params: Params) -> tuple[None, Metrics]:
        m = attack_success(lambda xb: functional_call(model, params, (xb,)), self.x, self.y, self.mask, self.value,
                           self.target, self.source, self.batch)
        return None, m


def stages(cfg: Config, env: BuildEnv) -> list[Stage]:
    """The module's stages for ``cfg``: adversary, poisoning, boost, ASR; then the defense."""
    out: list[Stage] = []
    if backdoor_on(cfg):
        adversary = EveryKthClient(cfg) if cfg.backdoor_test_frequency is not None else MaliciousClients(cfg)
        poison = BackdoorPoison(cfg, env, adversary)
        out += [adversary, poison]
        if cfg.bd_boost is not None or cfg.bd_boost_auto:
            out.append(Boost(cfg.bd_boost))
        out.append(AttackSuccess(cfg, env, poison.mask, poison.value))
    mode, clip, noise = defense(cfg), defense_clip(cfg), defense_noise(cfg)
    if mode == "toolkit_clip_noise":
        out.append(ToolkitClipNoise(clip, noise))
    elif mode == "norm_bound":
        out.append(NormBound(clip))
        if noise > 0:
            out.append(AggregateNoise(noise))
    return out


__all__ = ["AggregateNoise", "AttackSuccess", "BackdoorPoison", "Boost", "EveryKthClient", "NormBound", "ToolkitClipNoise",
           "backdoor_on", "defense", "defense_clip", "defense_noise", "global_trigger", "num_malicious", "stages", "validate"]
