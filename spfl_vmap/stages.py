"""The stage protocol: how a module plugs into a federated round without touching the loop.

A round (DESIGN.md section 3) calls the stages of a :class:`Pipeline` at fixed points, in order:

==================  ==========================================  ===================================
point               protocol                                    acts on
==================  ==========================================  ===================================
cohort              :class:`ClientSampler`, :class:`Adversary`  client ids, malicious mask ``[N]``
guards              :class:`Guard.before_round`                 may stop the run (privacy budget)
batch transforms    :class:`BatchTransform`                     ``x [n, B, ...]``, ``y [n, B]``
update stages       :class:`UpdateStage` (attacks, then         ``U [N, D]``
                    client-side defenses)
aggregation         :class:`Aggregation` (one)                  ``U [N, D] -> [D]``
server stages       :class:`ServerStage`                        the aggregate ``[D]``
accounting          :class:`Guard.after_round`                  what the round released
audits              :class:`Audit` (every ``k`` rounds)         ``U [N, D]``, read-only
evaluation hooks    :class:`EvalHook`                           the global model
==================  ==========================================  ===================================

Every call receives the :class:`RoundContext` and returns ``(result, metrics)``; the loop merges
the metrics into the round's log line. Stages may hold state: the checkpoint stores every
stage's :meth:`Stage.state_dict`, so a resumed run continues bit-identically.

This module is the engine's only view of the modules: it imports no module, engine, config or
command-line code. pfl-research's postprocessors (``pfl/postprocessor/base.py``) are the model.

Example: a toy update stage that zeroes one client's update (``tests/test_stages.py``)::

    class ZeroClient(UpdateStage):
        name = "zero_client"

        def __init__(self, client: int) -> None:
            self.client = client

        def apply(self, ctx, U):
            hit = torch.tensor([c == self.client for c in ctx.client_ids], device=U.device)
            return torch.where(hit[:, None], torch.zeros_like(U), U), {"zeroed": int(hit.sum())}

    sim = Simulator(cfg, stages=[ZeroClient(3)])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .rng import derive_seed, generator

Params = dict[str, torch.Tensor]
Metrics = dict[str, Any]


@dataclass
class RoundContext:
    """What every stage of one round may read.

    All randomness a stage needs comes from :meth:`generator` (``(seed, purpose, round, ...)``),
    so a stage's draws do not depend on the order of other stages or on a resumed process.
    """

    round: int  # 1-based round number
    seed: int
    client_ids: list[int]  # (N,) sampled clients, sorted
    counts: list[int]  # (N,) their sample counts
    malicious: torch.Tensor  # (N,) bool on ``device``
    weights: torch.Tensor  # (N,) float sample counts on ``device`` (FedAvg weights)
    global_params: Params  # {name: (*shape)} the model the round starts from
    spec: Any  # engine.params.ParamSpec: flatten/unflatten between Params and (D,)
    device: torch.device
    num_classes: int
    population: int  # clients in the federation (client_num_in_total)
    expected_cohort: int  # clients sampled per round (client_num_per_round)
    use_gradient: bool = False  # U holds gradients (FedSGD) instead of model deltas
    server_lr: float = 1.0
    # Vectorized sweeps (several runs' cohorts stacked in one ctx): each row's own starting model
    # ``{name: (N, *shape)}`` instead of ``global_params``, and its own client hyperparameters
    # ``{"lr" | "momentum" | "wd": (N,)}``. ``None``: every row starts from ``global_params``
    # with the config's hyperparameters.
    row_params: Optional[Params] = None
    row_hypers: Optional[dict[str, torch.Tensor]] = None

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    def generator(self, purpose: str, *parts: int | str, device: Optional[torch.device | str] = None) -> torch.Generator:
        """A fresh generator seeded by ``(seed, purpose, round, *parts)``."""
        return generator(self.seed, purpose, self.round, *parts, device=device or "cpu")

    def seed_for(self, purpose: str, *parts: int | str) -> int:
        """The integer seed of ``(seed, purpose, round, *parts)`` (for Philox kernels)."""
        return derive_seed(self.seed, purpose, self.round, *parts)


@dataclass
class BuildEnv:
    """What a module's stage builder may use besides the config: the run's data and model."""

    model: Any  # nn.Module of the global model's architecture (used functionally)
    spec: Any  # engine.params.ParamSpec
    packed: Any  # data.packing.PackedClients: every client's data, packed once
    counts: list[int]  # (K,) sample counts of all clients
    num_classes: int
    input_shape: tuple[int, ...]
    n_train: int  # training samples in the federation
    device: torch.device
    x_test: Optional[torch.Tensor] = None  # (n_test, C, H, W) the global test set, on ``device``
    y_test: Optional[torch.Tensor] = None  # (n_test,)
    x_root: Optional[torch.Tensor] = None  # (n_root, C, H, W) the server's root set, held out from every client
    y_root: Optional[torch.Tensor] = None  # (n_root,)


class Stage:
    """Base of every stage: a name, optional state, optional outputs.

    Attributes:
        name: Unique within a pipeline; keys the stage's state in the checkpoint.
        log_file: If set, the run directory gets this JSON-lines file with one row from
            :meth:`log_row` per evaluated round (e.g. ``privacy.jsonl``).
    """

    name: str = "stage"
    log_file: Optional[str] = None

    def state_dict(self) -> dict[str, Any]:
        """Everything the stage needs to continue after a resume (tensors, numbers, lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def describe(self) -> dict[str, Any]:
        """Settings written to ``config.json`` and the summary (resolved values, e.g. sigma)."""
        return {}

    # ---- outputs (only for stages with ``log_file``) -------------------------------------
    def log_row(self) -> Optional[dict[str, Any]]:
        """The row to append to :attr:`log_file` after this round's evaluation."""
        return None

    def load_log(self, rows: list[dict[str, Any]]) -> None:
        """On resume: the rows of :attr:`log_file` kept up to the checkpointed round."""

    def final_files(self) -> dict[str, Any]:
        """``{file name: JSON-able object}`` written to the run directory when the run ends."""
        return {}


class ClientSampler(Stage):
    """Chooses the round's cohort."""

    name = "sampler"

    def sample(self, round_idx: int) -> list[int]:
        raise NotImplementedError


class UniformSampler(ClientSampler):
    """``per_round`` of ``total`` clients without replacement, seeded by ``(seed, "sample", round)``
    (McMahan et al. 2017's FedAvg)."""

    def __init__(self, total: int, per_round: int, seed: int) -> None:
        self.total, self.per_round, self.seed = total, per_round, seed

    def sample(self, round_idx: int) -> list[int]:
        if self.per_round == self.total:
            return list(range(self.total))
        perm = torch.randperm(self.total, generator=generator(self.seed, "sample", round_idx))
        return sorted(perm[: self.per_round].tolist())


class Adversary(Stage):
    """Says which sampled clients are malicious (shared by every attack module)."""

    name = "adversary"

    def malicious_mask(self, client_ids: list[int], round_idx: int) -> torch.Tensor:
        """``(N,)`` bool on the CPU."""
        return torch.zeros(len(client_ids), dtype=torch.bool)


class Guard(Stage):
    """Checks before a round (may stop the run) and accounts after it."""

    def before_round(self, ctx: RoundContext) -> tuple[Optional[str], Metrics]:
        """``(reason to stop before training this round, or None; metrics)``."""
        return None, {}

    def after_round(self, ctx: RoundContext) -> tuple[None, Metrics]:
        """Record what the round released (privacy accounting)."""
        return None, {}


class BatchTransform(Stage):
    """Rewrites a chunk's batches inside local training (data poisoning, image transforms).

    Called once per local step with the batches of ``n`` clients at once; ``rows`` are their
    positions in the cohort, so ``ctx.malicious[rows]`` says which of them are malicious. It must
    be vectorized over ``n`` (``torch.where`` on a mask, not a Python loop over clients), and
    deterministic given ``ctx`` (draw randomness from ``ctx.generator``).
    """

    def apply(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Metrics]:
        """``x (n, B, ...)``, ``y (n, B)``, ``rows (n,)`` long, ``valid (n, B)`` bool -> ``((x, y), metrics)``.

        ``valid`` marks the real samples: the vectorized trainer pads a client's last partial
        batch (and DP-SGD's Poisson batches) to a common width, the per-client paths pass real
        samples only. A transform that counts or ranks slots must use ``valid`` so that every
        engine poisons the same samples.
        """
        raise NotImplementedError


class UpdateStage(Stage):
    """Rewrites the update matrix: attacks on malicious rows, then client-side defenses."""

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """``U (N, D) -> (U' (N, D), metrics)``."""
        raise NotImplementedError


class Aggregation(Stage):
    """Reduces ``U`` to the aggregate. ``metrics["round_rejected"] = True`` keeps the model."""

    name = "aggregation"

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """``U (N, D) -> (agg (D,), metrics)``."""
        raise NotImplementedError


class ServerStage(Stage):
    """Acts on the aggregate before the server optimizer step (e.g. server-side noise)."""

    def apply(self, ctx: RoundContext, agg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """``agg (D,) -> (agg' (D,), metrics)``."""
        raise NotImplementedError


class Audit(Stage):
    """Read-only inspection of the update matrix every :attr:`every` rounds (must not modify U)."""

    every: int = 1

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[None, Metrics]:
        raise NotImplementedError


class EvalHook(Stage):
    """Extra metrics at evaluation rounds (attack success, epsilon spent, ...)."""

    def evaluate(self, ctx: RoundContext, model: Any, params: Params) -> tuple[None, Metrics]:
        """``model`` is the ``nn.Module`` to call with ``functional_call(model, params, (x,))``."""
        raise NotImplementedError


STAGE_KINDS: dict[str, type] = {
    "batch_transforms": BatchTransform,
    "update_stages": UpdateStage,
    "server_stages": ServerStage,
    "guards": Guard,
    "audits": Audit,
    "eval_hooks": EvalHook,
}


@dataclass
class Pipeline:
    """The stages of a round, in call order. Built once per run by ``spfl_vmap.builder``."""

    sampler: ClientSampler
    aggregation: Aggregation
    adversary: Adversary = field(default_factory=Adversary)
    batch_transforms: list[BatchTransform] = field(default_factory=list)
    update_stages: list[UpdateStage] = field(default_factory=list)
    server_stages: list[ServerStage] = field(default_factory=list)
    guards: list[Guard] = field(default_factory=list)
    audits: list[Audit] = field(default_factory=list)
    eval_hooks: list[EvalHook] = field(default_factory=list)

    def add(self, stage: Stage) -> "Pipeline":
        """Append ``stage`` to the list of its kind (one object may serve several kinds: a
        :class:`Guard` that is also an :class:`EvalHook` goes into both lists)."""
        placed = False
        for attr, kind in STAGE_KINDS.items():
            if isinstance(stage, kind):
                getattr(self, attr).append(stage)
                placed = True
        if isinstance(stage, Aggregation):
            self.aggregation, placed = stage, True
        if isinstance(stage, ClientSampler):
            self.sampler, placed = stage, True
        if isinstance(stage, Adversary):
            self.adversary, placed = stage, True
        if not placed:
            raise TypeError(f"{type(stage).__name__} implements none of the stage protocols of spfl_vmap.stages")
        return self

    def extend(self, stages: Sequence[Stage]) -> "Pipeline":
        for s in stages:
            self.add(s)
        return self

    def all_stages(self) -> list[Stage]:
        """Every distinct stage object, in call order (the checkpoint's and describe's order)."""
        seen: dict[int, Stage] = {}
        order = [self.sampler, self.adversary, *self.guards, *self.batch_transforms, *self.update_stages,
                 self.aggregation, *self.server_stages, *self.audits, *self.eval_hooks]
        for s in order:
            seen.setdefault(id(s), s)
        return list(seen.values())

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.all_stages():
            if s.name in out:
                raise ValueError(f"two stages are named {s.name!r}; stage names key the checkpoint and must be unique")
            out[s.name] = s.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s in self.all_stages():
            if s.name in state:
                s.load_state_dict(state[s.name])

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for s in self.all_stages():
            out.update(s.describe())
        return out
