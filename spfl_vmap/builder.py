"""The one place that knows every module: ``Config`` -> trainer + :class:`~spfl_vmap.stages.Pipeline`.

The round loop (``spfl_vmap.engine.simulator.RoundLoop``) sees only the stage protocols. This
builder asks each module for its stages, picks the trainer, and owns the config rules that span
modules. A new module adds its ``stages(cfg, env)`` to :data:`MODULES` and its section validator
to ``spfl_vmap.config.SECTIONS``; a one-off stage can be passed to :class:`Simulator` directly
(``Simulator(cfg, stages=[...])``) without touching either list.
"""

from __future__ import annotations

from typing import Callable, Sequence

from .config import RULES, Config, need
from .data import Dataset
from .distributed import ShardedTrainer, sharded_trainer
from .engine.local import Trainer
from .engine.loop import plain_trainer
from .engine.simulator import RoundLoop
from .modules import backdoor, byzantine, crfl, inference, privacy
from .modules.dpsgd import DPSGDTrainer
from .stages import BuildEnv, Pipeline, Stage, UniformSampler

# name -> the module's stage builder, in pipeline order (attacks before client-side defenses)
MODULES: dict[str, Callable[[Config, BuildEnv], list[Stage]]] = {
    "byzantine": byzantine.stages,
    "backdoor": backdoor.stages,
    "inference": inference.stages,  # client-side defenses (ATS on every client's batches, pruning): after the attacks
    "crfl": crfl.stages,  # after the backdoor module's server noise: the clip acts on the final model
    "privacy": privacy.stages,
}


@RULES.register("dp_user_level_sums")
def dp_user_level_needs_mean(cfg: Config) -> None:
    """DP-FedAvg's fused clip-noise-sum is the aggregator: no robust rule can sit beside it."""
    if privacy.dp_mode(cfg) == "user":
        need(cfg.by_defense == "mean", "--dp_mode user sums clipped updates; it cannot be combined with a robust --by_defense")


@RULES.register("soteria_outside_example_dp")
def soteria_not_with_example_dp(cfg: Config) -> None:
    """Soteria's mask is computed from the client's raw samples, outside DP-SGD's per-example clip
    and noise, so the zeroed columns would leak what example-level DP accounts for."""
    need(not (cfg.soteria_rate is not None and privacy.dp_mode(cfg) == "example"),
         "--soteria_rate computes its mask from raw samples outside DP-SGD's clip and noise; it cannot be combined with "
         "--dp_mode example (user-level and local DP are fine)")


@RULES.register("one_attack_on_malicious_clients")
def one_attack(cfg: Config) -> None:
    """The backdoor and the Byzantine attacks both rewrite the malicious clients: only one may."""
    need(not (backdoor.backdoor_on(cfg) and cfg.by_attack != "none"),
         f"--bd_attack {cfg.bd_attack} and --by_attack {cfg.by_attack} both act on the malicious clients; choose one")


def build(cfg: Config, env: BuildEnv, extra_stages: Sequence[Stage] = ()) -> tuple[Trainer, Pipeline]:
    """The trainer and the pipeline of a run.

    Args:
        cfg: The validated run config.
        env: The run's model, parameter layout, packed data and counts.
        extra_stages: Stages added after the modules' (user-defined stages).

    Returns:
        ``(trainer, pipeline)``.
    """
    stages: list[Stage] = []
    for make in MODULES.values():
        stages.extend(make(cfg, env))
    pipeline = Pipeline(sampler=UniformSampler(cfg.client_num_in_total, cfg.client_num_per_round, cfg.seed),
                        aggregation=byzantine.RobustAggregation(cfg))
    pipeline.extend(stages).extend(extra_stages)
    for audit in pipeline.audits:  # the inversion audit trains fresh uploads with the run's own trainer and stages
        if isinstance(audit, inference.InversionAudit):
            audit.attach(pipeline, lambda e: make_trainer(cfg, e, pipeline))
    trainer = make_trainer(cfg, env, pipeline)
    shard_rounds(cfg, trainer, pipeline)
    return trainer, pipeline


def make_trainer(cfg: Config, env: BuildEnv, pipeline: Pipeline) -> Trainer:
    """DP-SGD at example level (with the accountant's possibly calibrated sigma), else the
    vectorized trainer or the reference loop; under torchrun wrapped so that it trains this
    rank's clients of each cohort (``spfl_vmap.distributed.ShardedTrainer``)."""
    if privacy.dp_mode(cfg) == "example":
        accounting = next(s for s in pipeline.guards if isinstance(s, privacy.PrivacyAccounting))
        trainer: Trainer = DPSGDTrainer(env.model, env.spec, env.packed, cfg.replace(dp_sigma=accounting.sigma), env.device)
    else:
        trainer = plain_trainer(env.model, env.spec, env.packed, cfg, env.device)
    return sharded_trainer(trainer, env.packed)


def shard_rounds(cfg: Config, trainer: Trainer, pipeline: Pipeline) -> None:
    """Under torchrun: refuse the stages that read other ranks' raw samples, and let a sum
    aggregation that works on per-rank rows (mean and DP-FedAvg: partial sums; Krum and
    Multi-Krum: distance blocks) do so instead of gathering ``U`` when no update stage
    (``reads_rows``) or audit reads the whole ``U`` (``--dist_gather`` always gathers). Update
    stages with a ``sharding`` attribute (the Byzantine attack: statistics by collectives) then
    get per-rank rows too."""
    if not isinstance(trainer, ShardedTrainer):
        return
    need(cfg.soteria_rate is None, "--soteria_rate reads every cohort client's raw samples, which sharded processes do not "
                                   "share; run it in one process (without torchrun)")
    need(cfg.audit_inversion is None, "--audit_inversion reads the audited clients' raw samples, which sharded processes do "
                                      "not share; run it in one process (without torchrun)")
    agg = pipeline.aggregation
    reads_U = any(getattr(s, "reads_rows", True) for s in pipeline.update_stages)
    if not cfg.dist_gather and not reads_U and not pipeline.audits and getattr(agg, "sums_rows", False):
        trainer.reduce = True
        agg.sharding = trainer.sharding
        trainer.path = agg.sharded_path
        for stage in pipeline.update_stages:  # those that work on per-rank rows (an attack's collectives)
            if hasattr(stage, "sharding"):
                stage.sharding = trainer.sharding
                if getattr(stage, "reads_stats", False):
                    trainer.path += "; attack statistics by collectives"


class Simulator(RoundLoop):
    """Step-by-step control of a federated run, with every module the config turns on.

    Example:
        >>> sim = Simulator(Config(dataset="digits", model="lr", comm_round=3))
        >>> while not sim.done:
        ...     metrics = sim.step()

    Args:
        cfg: The run config.
        data: A loaded dataset to reuse (else loaded from ``cfg``).
        stages: Extra stages (any of the protocols in ``spfl_vmap.stages``), added after the
            modules' own.
    """

    def __init__(self, cfg: Config, data: Dataset | None = None, *, stages: Sequence[Stage] = ()) -> None:
        super().__init__(cfg, data, build=lambda c, env: build(c, env, stages))
