"""Backdoor attacks and the clip-and-noise defenses as round stages.

The malicious clients are the Byzantine module's (``--by_workers`` / ``--by_frac`` /
``--by_mode``), chosen by :class:`BackdoorAdversary`, a
:class:`~spfl_vmap.modules.byzantine.MaliciousClients` that marks them only in the rounds of
``--bd_schedule``. When both modules are on, both add an adversary and the pipeline keeps the
last, this module's (``builder.MODULES`` lists it after the Byzantine one), so the schedule holds
for the whole round; with no backdoor attack the Byzantine adversary is untouched.

The authors' toolkit (csl-cqu/Roubst-and-Privacy-preserving-Federated-Learning-System) runs
unchanged with its own flags: ``--backdoor_test`` is ``--bd_attack badnets --bd_trigger plus
--bd_target 7`` with the attackers ``client index % --backdoor_test_frequency == 0`` (default 10,
:class:`EveryKthClient`), ``--backdoor_test_boost`` is ``--bd_boost``, and ``--backdoor_defense``
/ ``--backdoor_defense_shrink`` / ``--backdoor_defense_noise`` are ``--bd_defense
toolkit_clip_noise --bd_clip --bd_noise`` (:func:`toolkit_backdoor_test`).

Stages (see ``spfl_vmap.stages``), in round order:

* :class:`BackdoorAdversary` (adversary): the malicious mask, empty outside the attack rounds
  (``continuous``, ``single:R``, ``every:K``, ``from:R``), so no poisoning, masking, projection or
  boost happens there;
* :class:`BackdoorPoison` (batch transform): in each malicious client's batch, a fraction of the
  slots get the trigger and the target label (BadNets, Gu et al. 2017; DBA, Xie et al. ICLR
  2020, where attacker ``i`` embeds local trigger ``i mod 4``);
* :class:`Neurotoxin` (update stage, ``--bd_neurotoxin``): the malicious rows of ``U`` keep only
  the coordinates the last global update changed least (Zhang et al., ICML 2022);
* :class:`Project` (update stage, ``--bd_project``): constrain-and-scale's constraint, the
  malicious rows projected onto an L2 ball (TFF ``ClientProjectBoost``);
* :class:`Boost` (update stage): model replacement, the malicious rows of ``U`` scaled by
  ``gamma`` (Bagdasaryan et al., "How To Backdoor Federated Learning", AISTATS 2020; automatic
  ``gamma = n / eta``, clients this round over the server learning rate);
* :class:`ToolkitClipNoise` (update stage): clip each update per layer (the toolkit's
  ``modules/backdoor_defense/defense.py``) or as a whole (``--bd_clip_mode global``), with
  Gaussian noise on each update (``--bd_noise_on client``, the toolkit's) or, through
  :class:`AggregateNoise` (server stage), on the aggregate;
* :class:`NormBound`: the same stage as the named shorthand ``--bd_defense norm_bound`` for
  Sun et al., "Can You Really Backdoor Federated Learning?" (2019): whole-update norm bound,
  then weak DP noise on the aggregate;
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
    Schedule,
    attack_success,
    content_keys,
    dba_parts,
    hash_uniform,
    neurotoxin_keep,
    parse_location,
    parse_schedule,
    poison_batch,
    poison_rows,
    trigger_mask,
)
from ..config import NORMALIZERS, SECTIONS, Config, need
from ..data import dataset_meta
from ..distributed import extremes
from ..errors import ConfigError, SpflError
from ..stages import BatchTransform, BuildEnv, EvalHook, Metrics, Params, RoundContext, ServerStage, Stage, UpdateStage
from .byzantine import MAX_LISTED, MaliciousClients, num_byzantine

BD_ATTACKS = ("none", "badnets", "dba")
BD_DEFENSES = ("none", "toolkit_clip_noise", "norm_bound")
CLIP_MODES = ("per_layer", "global")
NOISE_ON = ("client", "aggregate")
TOOLKIT_FREQUENCY = 10  # the toolkit's --backdoor-test-frequency default (main_fedavg.py)


# ---- the config section -----------------------------------------------------------------------
@NORMALIZERS.register("backdoor")
def toolkit_backdoor_test(cfg: Config) -> dict[str, Any]:
    """The toolkit's ``--backdoor_test`` in our flags, resolved once before validation.

    It sets ``--bd_attack badnets``, ``--bd_trigger plus`` (the toolkit's 3x3 plus at (2, 2)) and
    ``--backdoor_test_frequency 10`` (the toolkit's default), each only where the flag is still at
    its default (an explicit ``--bd_attack dba`` or ``--bd_trigger rlr_plus`` is kept; the
    target's default is already the toolkit's 7). ``--backdoor_test_boost G`` is ``--bd_boost G``
    (:func:`boost_gamma`).

    How the attack differs: the toolkit's ``MaliciousTrainer``
    (``modules/backdoor_defense/utils/mnist.py``) trains two models from the global model, one
    on the client's clean data and one on a copy where every sample is triggered and relabelled,
    and uploads ``benign + G (malicious - global)`` with boost ``G``, i.e. ``D_clean + G D_poison``
    in update terms. Here a
    malicious client trains once, on batches where a fraction ``p`` (``--bd_poison_frac``) of the
    samples is poisoned, and the boost scales its whole update. To first order in the learning
    rate, the mixed batch's gradient is ``(1 - p) g_clean + p g_poison``, so the update is
    ``(1 - p) D_clean + p D_poison``. The default ``p = 0.5`` kept here is the fraction that
    matches the toolkit's direction at its default boost ``G = 1`` (equal weight on the clean and
    the poisoned objective); the toolkit's update is then twice ours (two trainings summed). For
    another ``G``, ``--bd_poison_frac G/(1+G)`` matches the direction. Higher orders differ: the
    toolkit's two trajectories are independent, ours is one.
    """
    if not cfg.backdoor_test:
        return {}
    out: dict[str, Any] = {}
    if cfg.bd_attack == "none":
        out["bd_attack"] = "badnets"
    if (cfg.bd_trigger, cfg.bd_trigger_size, cfg.bd_trigger_location) == ("square", 3, "bottom_right"):  # all defaults
        out["bd_trigger"] = "plus"
    if cfg.backdoor_test_frequency is None:
        out["backdoor_test_frequency"] = TOOLKIT_FREQUENCY
    return out


def backdoor_on(cfg: Config) -> bool:
    return cfg.bd_attack != "none"


def boost_gamma(cfg: Config) -> float | None:
    """``--bd_boost``, or the toolkit's ``--backdoor_test_boost``; ``None`` = no fixed boost."""
    return cfg.bd_boost if cfg.bd_boost is not None else cfg.backdoor_test_boost


def defense_plan(cfg: Config) -> tuple[str, str]:
    """``(clip mode, where the noise goes)`` of the defense in force: ``norm_bound`` is the
    shorthand for ``("global", "aggregate")`` (Sun et al. 2019); ``toolkit_clip_noise`` defaults
    to the toolkit's ``("per_layer", "client")``."""
    if defense(cfg) == "norm_bound":
        return "global", "aggregate"
    return cfg.bd_clip_mode or "per_layer", cfg.bd_noise_on or "client"


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
        need(backdoor_on(cfg), "--backdoor_test_frequency chooses the backdoor attackers: it needs --bd_attack badnets or dba (or the toolkit's --backdoor_test)")
        flag = "--backdoor_test" if cfg.backdoor_test else "--backdoor_test_frequency"
        need(not cfg.by_workers and not cfg.by_frac and cfg.by_mode == "fixed",
             f"{flag} chooses the malicious clients itself (client index % {cfg.backdoor_test_frequency} == 0): "
             f"drop --by_workers/--by_frac/--by_mode per_round")
    if cfg.backdoor_test_boost is not None:
        g = cfg.backdoor_test_boost
        need(math.isfinite(g) and g > 0, f"--backdoor_test_boost must be a finite number > 0, got {g}")
        need(cfg.bd_boost is None and not cfg.bd_boost_auto, "give --bd_boost/--bd_boost_auto or the toolkit's --backdoor_test_boost, not both")


def validate_defense_plan(cfg: Config) -> None:
    """``--bd_clip_mode`` / ``--bd_noise_on``: known values, only with a defense, and not against
    what the shorthand ``--bd_defense norm_bound`` means."""
    need(cfg.bd_clip_mode in (None, *CLIP_MODES), f"--bd_clip_mode must be one of: {', '.join(CLIP_MODES)}; got {cfg.bd_clip_mode!r}")
    need(cfg.bd_noise_on in (None, *NOISE_ON), f"--bd_noise_on must be one of: {', '.join(NOISE_ON)}; got {cfg.bd_noise_on!r}")
    given = cfg.bd_clip_mode is not None or cfg.bd_noise_on is not None
    mode = defense(cfg)
    need(mode != "none" or not given,
         "--bd_clip_mode and --bd_noise_on set how --bd_defense toolkit_clip_noise (or --backdoor_defense) clips and noises: give one")
    if mode == "norm_bound":
        need(cfg.bd_clip_mode in (None, "global") and cfg.bd_noise_on in (None, "aggregate"),
             "--bd_defense norm_bound is the global clip with noise on the aggregate (Sun et al. 2019); for another "
             "combination use --bd_defense toolkit_clip_noise --bd_clip_mode ... --bd_noise_on ...")


def global_trigger(cfg: Config) -> torch.Tensor:
    """``(H, W)`` bool: the configured trigger for the dataset's image size."""
    _, h, w = dataset_meta(cfg.dataset).input_shape
    return trigger_mask(cfg.bd_trigger, h, w, cfg.bd_trigger_size, parse_location(cfg.bd_trigger_location))


@SECTIONS.register("backdoor")
def validate(cfg: Config) -> None:
    """The ``--bd_*`` flags: names, label ranges, the trigger against the image size, malicious
    clients for an attack, the schedule, Neurotoxin, the projection, the boost and the defense."""
    need(cfg.bd_attack in BD_ATTACKS, f"unknown --bd_attack {cfg.bd_attack!r}; choose one of: {', '.join(BD_ATTACKS)}")
    need(cfg.bd_trigger in TRIGGERS, f"unknown --bd_trigger {cfg.bd_trigger!r}; choose one of: {', '.join(TRIGGERS)}")
    need(cfg.bd_defense in BD_DEFENSES, f"unknown --bd_defense {cfg.bd_defense!r}; choose one of: {', '.join(BD_DEFENSES)}")
    need(math.isfinite(defense_clip(cfg)) and defense_clip(cfg) > 0, f"--bd_clip must be a finite number > 0, got {defense_clip(cfg)}")
    need(math.isfinite(defense_noise(cfg)) and defense_noise(cfg) >= 0, f"--bd_noise must be a finite number >= 0, got {defense_noise(cfg)}")
    validate_defense_plan(cfg)
    validate_toolkit_flags(cfg)
    try:
        parse_schedule(cfg.bd_schedule)
    except ConfigError as e:
        raise ConfigError(f"--bd_schedule: {e}") from None
    attack_flags = {"bd_boost": cfg.bd_boost is not None, "bd_boost_auto": cfg.bd_boost_auto, "bd_source": cfg.bd_source is not None,
                    "bd_project": cfg.bd_project is not None, "bd_neurotoxin": cfg.bd_neurotoxin is not None,
                    "bd_schedule": cfg.bd_schedule != "continuous", "backdoor_test_boost": cfg.backdoor_test_boost is not None}
    if not backdoor_on(cfg):
        given = [f"--{k}" for k, on in attack_flags.items() if on]
        need(not given, f"backdoor attack options ({', '.join(given)}) need --bd_attack badnets or dba "
                        f"(or the toolkit's --backdoor_test)")
        return
    if cfg.bd_project is not None:
        need(math.isfinite(cfg.bd_project) and cfg.bd_project > 0, f"--bd_project must be a finite number > 0, got {cfg.bd_project}")
    if cfg.bd_neurotoxin is not None:
        r = cfg.bd_neurotoxin
        need(0.0 < r <= 1.0, f"--bd_neurotoxin is the fraction of coordinates kept, in (0, 1] (the authors use 0.95-0.99), got {r}")
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


class BackdoorAdversary(MaliciousClients):
    """The Byzantine module's malicious clients, marked only in the attack rounds of ``--bd_schedule``.

    Outside those rounds the mask is empty: every client trains and uploads honestly, so no stage
    that acts on ``ctx.malicious`` (poisoning, Neurotoxin, projection, boost) does anything.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.schedule: Schedule = parse_schedule(cfg.bd_schedule)

    def malicious_mask(self, client_ids: list[int], round_idx: int) -> torch.Tensor:
        mask = super().malicious_mask(client_ids, round_idx)  # (N,)
        return mask if self.schedule.active(round_idx) else torch.zeros_like(mask)


class EveryKthClient(BackdoorAdversary):
    """The authors' toolkit's attackers: client index ``% --backdoor_test_frequency == 0``
    (``modules/backdoor_defense``; default 10, ``test/backdoor.sh`` 15 with 10 clients: client 0)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        K = cfg.client_num_in_total
        self.malicious_ids = torch.arange(K) % cfg.backdoor_test_frequency == 0  # (K,)
        self.count = int(self.malicious_ids.sum())

    def describe(self) -> dict[str, Any]:
        ids = torch.nonzero(self.malicious_ids).squeeze(1).tolist()
        return {"backdoor_adversary": {"rule": f"client index % {self.cfg.backdoor_test_frequency} == 0",
                                       "malicious_clients": self.count,
                                       **({"malicious_ids": ids} if len(ids) <= MAX_LISTED else {})}}


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
        self.value = trigger_value(extremes(env.packed.x))  # (C,) of the whole training set, also under torchrun
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
        mal = ctx.malicious[rows].to(y.device)  # (n,)
        if not bool(mal.any()):
            return (x, y), {}
        # only the malicious rows are hashed and rewritten (a chunk holds few of them)
        idx = mal.nonzero().squeeze(1)  # (n_mal,)
        sub = rows.to(y.device)[idx]
        xs, ys = x[idx], y[idx]
        poisoned = self.poisoned(ctx, xs, ys, sub, valid.to(y.device)[idx])
        xs, ys = poison_batch(xs, ys, poisoned, self.row_masks(ctx, sub), self.value.to(x.device), self.cfg.bd_target)
        return (x.index_put((idx,), xs), y.index_put((idx,), ys)), {}

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"backdoor": {"attack": c.bd_attack, "target": c.bd_target, "source": c.bd_source, "trigger": c.bd_trigger,
                             "trigger_pixels": int(self.mask.sum()), "poison_frac": c.bd_poison_frac,
                             "trigger_value": [float(v) for v in self.value],
                             "boost": "auto (clients / server lr)" if c.bd_boost_auto else boost_gamma(c),
                             "schedule": str(parse_schedule(c.bd_schedule)), "project": c.bd_project,
                             "neurotoxin_keep": c.bd_neurotoxin}}


class Neurotoxin(UpdateStage):
    """Neurotoxin (Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML 2022):
    the malicious rows of ``U (N, D)`` keep only the coordinates benign training changes least.

    A backdoor written into coordinates that the benign clients rarely move survives longer after
    the attack stops. The benign direction is what the attacker can see: the last global update
    ``w_{t-1} - w_{t-2}``, the difference of the last two global models it received. The stage
    records the global model of every round (``ctx.global_params``; checkpointed through
    :meth:`state_dict`) to form that difference the next round; in the first round, or after a
    round it did not see, there is none and nothing is masked. The mask keeps the
    ``int(D * ratio)`` coordinates of smallest magnitude over all layers
    (:func:`~spfl_vmap.attacks.backdoor.neurotoxin_keep`; the authors' ``gradmask_ratio`` with
    ``aggregate_all_layer 1``).

    Two deliberate differences from the authors' code (jhcknzzm/Federated-Learning-Backdoor,
    ``FL_Backdoor_CV/helper.py::grad_mask_cv``): (1) their code estimates the benign direction
    with the gradient of the global model on clean data, we use the last global update; (2) they
    mask the gradient at every local step (projected gradient descent onto the kept
    coordinates), while our trainers have no per-step hook, so the mask is applied once, to the
    finished update. With plain SGD and no weight decay the masked coordinates of a per-step
    masked update are exactly zero, as here; the kept coordinates differ by how the masked ones
    would have moved the loss during training.
    """

    name = "backdoor_neurotoxin"

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.prev: torch.Tensor | None = None  # (D,) the global model of round ``prev_round``
        self.prev_round = 0

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        w = ctx.spec.flatten(ctx.global_params).detach()  # (D,) the model this round starts from
        seen = self.prev is not None and self.prev_round == ctx.round - 1
        direction = w - self.prev.to(w.device) if seen else None  # (D,) the last global update
        self.prev, self.prev_round = w.clone(), ctx.round
        mal = ctx.malicious.to(U.device)
        if direction is None or not bool(mal.any()):
            return U, {}
        keep = neurotoxin_keep(direction, self.ratio).to(U.device)  # (D,)
        out = torch.where(mal[:, None] & ~keep[None, :], torch.zeros_like(U), U)
        return out, {"bd_neurotoxin_masked": int((~keep).sum())}

    def state_dict(self) -> dict[str, Any]:
        return {"prev": None if self.prev is None else self.prev.cpu(), "prev_round": self.prev_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prev, self.prev_round = state.get("prev"), int(state.get("prev_round", 0))


class Project(UpdateStage):
    """Constrain-and-scale's constraint: each malicious row of ``U (N, D)`` projected onto the L2
    ball of radius ``bound`` (``u * min(1, bound / ||u||)``), before :class:`Boost` scales it.

    Bagdasaryan et al. 2020 ("constrain-and-scale") keep the attacker's update inside what the
    server accepts; TFF's ``ClientProjectBoost`` (``tensorflow_federated/python/research/
    targeted_attack/attacked_fedavg.py``) projects the malicious delta onto the ball of radius
    ``norm_bound`` around the global model and then multiplies it by ``boost_factor``
    (``emnist_with_targeted_attack.py``: ``norm_bound 0.33``, boost = clients per round, 5). TFF
    projects after each of its ``client_round_num`` benign-then-malicious training passes
    (projected gradient descent); our trainers have no hook between passes, so the projection
    acts once on the finished update, as TFF with ``client_round_num 1``. The norm is over all
    parameters of ``U`` (TFF: all trainable variables). Uses ``spfl_kernels.clip_rows``.
    """

    name = "backdoor_project"

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        mal = ctx.malicious.to(U.device)
        if not bool(mal.any()):
            return U, {}
        clipped, norms = clip_rows(U, self.bound)  # (N, D), (N,)
        return torch.where(mal[:, None], clipped, U), {"bd_projected": int(((norms > self.bound) & mal).sum())}


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
    """Clip every client's update, per layer or as a whole, and add Gaussian noise to it.

    ``mode="per_layer"`` is the authors' toolkit defense (``modules/backdoor_defense/defense.py``):
    for every client and every parameter tensor ``k``, ``Δk / max(1, ‖Δk‖ / shrink)``, so the
    effective bound of a whole update is ``shrink * sqrt(#tensors)``. ``mode="global"`` clips the
    whole update to ``‖Δ‖ <= shrink`` (Sun et al., "Can You Really Backdoor Federated
    Learning?", 2019), with ``spfl_kernels.clip_rows``. With ``noise_on="client"`` (the toolkit's)
    each client's update gets ``noise * N(0, I)``; with ``"aggregate"`` this stage only clips and
    :class:`AggregateNoise` noises the aggregate (Sun et al.'s weak DP). The toolkit also noised
    buffers; this acts on ``U``, which holds the parameters only (``ctx.spec``), so buffers are
    never noised.
    """

    name = "backdoor_defense"
    defense = "toolkit_clip_noise"

    def __init__(self, shrink: float, noise: float = 0.0, mode: str = "per_layer", noise_on: str = "client") -> None:
        if mode not in CLIP_MODES or noise_on not in NOISE_ON:
            raise ValueError(f"clip mode {mode!r} / noise on {noise_on!r}: choose from {CLIP_MODES} / {NOISE_ON}")
        self.shrink, self.noise, self.mode, self.noise_on = shrink, noise, mode, noise_on

    def clip(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """``U (N, D)`` clipped per tensor or per row, and how many tensors or rows were over."""
        if self.mode == "global":
            clipped, norms = clip_rows(U, self.shrink)  # (N, D), (N,)
            return clipped, {"bd_clipped": int((norms > self.shrink).sum())}
        numels = torch.tensor(ctx.spec.numels, device=U.device)
        seg = torch.repeat_interleave(torch.arange(len(numels), device=U.device), numels)  # (D,) tensor of each coordinate
        sq = torch.zeros(U.shape[0], len(numels), device=U.device, dtype=torch.float32)
        sq.index_add_(1, seg, U.float() ** 2)
        norms = sq.sqrt()  # (N, T) per-client, per-tensor norms
        factor = 1.0 / torch.clamp(norms / self.shrink, min=1.0)  # (N, T)
        return (U.float() * factor[:, seg]).to(U.dtype), {"bd_clipped_tensors": int((norms > self.shrink).sum())}

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        out, m = self.clip(ctx, U)
        if self.noise > 0 and self.noise_on == "client":
            g = ctx.generator("backdoor_defense", device=U.device)
            out = out + self.noise * torch.randn(U.shape, generator=g, device=U.device, dtype=U.dtype)
        return out, m

    def describe(self) -> dict[str, Any]:
        return {"backdoor_defense": {"defense": self.defense, "clip": self.shrink, "clip_mode": self.mode,
                                     "noise": self.noise, "noise_on": self.noise_on}}


class NormBound(ToolkitClipNoise):
    """``--bd_defense norm_bound`` (Sun et al. 2019): :class:`ToolkitClipNoise`'s whole-update
    clip to L2 norm ``M``; its weak-DP noise ``sigma`` goes on the aggregate (:class:`AggregateNoise`)."""

    name = "norm_bound"
    defense = "norm_bound"

    def __init__(self, bound: float, sigma: float = 0.0) -> None:
        super().__init__(bound, sigma, "global", "aggregate")


class AggregateNoise(ServerStage):
    """Weak differential privacy (Sun et al. 2019): Gaussian noise ``N(0, sigma^2 I)`` on the
    aggregate update ``(D,)``; with a plain SGD server at learning rate 1 this is noise on the
    global model, as in the paper. ``name`` is also the purpose of its generator."""

    name = "norm_bound_noise"

    def __init__(self, sigma: float, name: str = "norm_bound_noise") -> None:
        self.sigma, self.name = sigma, name

    def apply(self, ctx: RoundContext, agg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        g = ctx.generator(self.name, device=agg.device)
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
    """The module's stages for ``cfg``: adversary, poisoning, Neurotoxin mask, projection, boost
    (constrain, then scale, as TFF's ``ClientProjectBoost``), ASR; then the defense."""
    out: list[Stage] = []
    if backdoor_on(cfg):
        adversary = EveryKthClient(cfg) if cfg.backdoor_test_frequency is not None else BackdoorAdversary(cfg)
        poison = BackdoorPoison(cfg, env, adversary)
        out += [adversary, poison]
        if cfg.bd_neurotoxin is not None and cfg.bd_neurotoxin < 1.0:  # 1 keeps every coordinate (the authors' "off")
            out.append(Neurotoxin(cfg.bd_neurotoxin))
        if cfg.bd_project is not None:
            out.append(Project(cfg.bd_project))
        if boost_gamma(cfg) is not None or cfg.bd_boost_auto:
            out.append(Boost(boost_gamma(cfg)))
        out.append(AttackSuccess(cfg, env, poison.mask, poison.value))
    mode = defense(cfg)
    if mode != "none":
        clip, noise = defense_clip(cfg), defense_noise(cfg)
        clip_mode, noise_on = defense_plan(cfg)
        stage = NormBound(clip, noise) if mode == "norm_bound" else ToolkitClipNoise(clip, noise, clip_mode, noise_on)
        out.append(stage)
        if noise_on == "aggregate" and noise > 0:
            out.append(AggregateNoise(noise, name=f"{stage.name}_noise"))
    return out


__all__ = ["AggregateNoise", "AttackSuccess", "BackdoorAdversary", "BackdoorPoison", "Boost", "EveryKthClient", "Neurotoxin",
           "NormBound", "Project", "ToolkitClipNoise", "backdoor_on", "boost_gamma", "defense", "defense_clip", "defense_noise",
           "defense_plan", "global_trigger", "num_malicious", "stages", "toolkit_backdoor_test", "validate"]
