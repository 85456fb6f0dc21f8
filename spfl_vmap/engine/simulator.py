"""The round loop.

One round, as in DESIGN.md section 3:
    1. sample clients with a generator seeded by (seed, round);
    2. gather their slices of the pre-packed client data;
    3. broadcast the global model to stacked parameters ``[N, ...]``;
    4. local training (vectorized, or the reference loop);
    5. updates ``U [N, D]`` (trained - global, or gradients with ``--use_gradient``);
    6. attacks rewrite malicious rows of ``U``;
    7. client-side defenses;
    8. aggregation to ``[D]``;
    9. server-side stages and the server optimizer step;
    10. account, audit, evaluate, log.

The loop names no module: steps 1, 4 and 6-10 call the stages of a
:class:`~spfl_vmap.stages.Pipeline` that a builder (``spfl_vmap.builder.build``) assembles from
the config. All randomness is a function of ``(seed, purpose, round, client)``, so a run resumed
from a checkpoint continues bit-identically: the checkpoint needs the global model, the server
optimizer, every stage's state and the round number.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import Config
from .. import distributed
from ..data import Dataset, load_dataset, partition, partition_stats, stratified_holdout
from ..errors import ConfigError, SpflError
from ..stages import BuildEnv, Metrics, Pipeline, RoundContext, Stage
from .local import LocalResult, Trainer
from .optim import ServerOptimizer
from .params import ParamSpec, Params, init_model

Builder = Callable[[Config, BuildEnv], tuple[Trainer, Pipeline]]

CHECKPOINT = "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(name)


@dataclass
class History:
    """Per-evaluated-round metrics of a run, plus its summary."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the final global model (CPU)

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def column(self, key: str) -> list[Any]:
        return [r[key] for r in self.rows if key in r]


@dataclass
class RoundStart:
    """A round after sampling and the guards, before local training (``RoundLoop.begin_round``)."""

    ctx: RoundContext
    metrics: dict[str, Any]  # the round's metrics so far (round, clients, the guards')
    t0: float  # time.perf_counter() when the round began


class RoundLoop:
    """The round loop over a trainer and a pipeline of stages.

    ``spfl_vmap.Simulator`` is this loop with ``spfl_vmap.builder.build`` as its builder; use that
    one unless you assemble the pipeline yourself.

    Args:
        cfg: The run config.
        data: A loaded dataset to reuse (else loaded from ``cfg``).
        build: ``(cfg, env) -> (trainer, pipeline)``.
    """

    def __init__(self, cfg: Config, data: Dataset | None = None, *, build: Builder) -> None:
        self.cfg = cfg
        # under torchrun: join the process group; CUDA ranks take cuda:LOCAL_RANK
        self.device = distributed.setup(cfg.dist_backend, cfg.dist_timeout, resolve_device(cfg.device))
        ds = data if data is not None else load_dataset(
            cfg.dataset, cfg.data_dir, cfg.download, synthetic_train=cfg.synthetic_train, synthetic_test=cfg.synthetic_test
        )
        self.dataset = ds
        labels = ds.y_train.numpy()
        # the server's root set (FLTrust) is held out before the clients' partition
        root, pool = stratified_holdout(labels, cfg.root_samples or 0, ds.num_classes, cfg.seed)
        parts = partition(labels[pool], cfg.client_num_in_total, cfg.partition_method, cfg.partition_alpha, cfg.seed, cfg.partition_min_samples)
        if len(root):
            parts = [pool[p] for p in parts]
        self.parts = parts
        self.partition_stats = partition_stats(parts, labels)
        self.packed = distributed.pack_owned(ds.x_train, ds.y_train, parts, self.device)  # packed once; under torchrun this rank's clients
        self.dataset = distributed.keep_owned(ds, self.packed)  # under torchrun: the full training images are freed
        self.counts = [len(p) for p in parts]
        self.x_test, self.y_test = ds.x_test.to(self.device), ds.y_test.to(self.device)

        self.model = init_model(cfg.model, ds.input_shape, ds.num_classes, cfg.model_width, cfg.seed).to(self.device)
        self.spec = ParamSpec.of(self.model)
        self.w = self.spec.flatten({k: p.detach() for k, p in self.model.named_parameters()}).clone()  # (D,)
        self.server_opt = ServerOptimizer(cfg.server_optimizer, cfg.effective_server_lr, cfg.server_momentum)
        root_t = torch.from_numpy(root)
        env = BuildEnv(self.model, self.spec, self.packed, self.counts, ds.num_classes, tuple(ds.input_shape), len(pool), self.device,
                       self.x_test, self.y_test, x_root=ds.x_train[root_t].to(self.device), y_root=ds.y_train[root_t].to(self.device))
        self.trainer, self.pipeline = build(cfg, env)
        self.pipeline.state_dict()  # fails early if two stages share a name
        self.stopped: str | None = None  # why the run ended early (privacy budget)
        self.round = 0  # rounds completed
        self.history = History()
        self.elapsed = 0.0  # wall seconds spent in rounds and evaluation
        self.eval_keys: set[str] = set()  # metric names the evaluation hooks have reported
        self.rejected_rounds = 0  # rounds whose aggregate was rejected (model kept)
        self.consecutive_rejected = 0
        self.nonfinite_loss_rounds = 0
        self.consecutive_nonfinite_loss = 0
        self.diverged = False  # stopped after --max_rejected_rounds consecutive rejected rounds

    # ---- properties -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.round >= self.cfg.comm_round or self.stopped is not None

    @property
    def global_params(self) -> Params:
        return self.spec.unflatten(self.w)

    @property
    def num_params(self) -> int:
        return self.spec.dim

    @property
    def stages(self) -> list[Stage]:
        return self.pipeline.all_stages()

    def stage(self, name: str) -> Stage:
        """The pipeline's stage called ``name``."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")

    def describe(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "engine": self.cfg.engine,
            "strategy": self.trainer.strategy,
            "client_chunk": self.trainer.chunk,
            "num_params": self.num_params,
            "data_source": self.dataset.source,
            "train_samples": int(len(self.dataset.y_train)),
            "test_samples": int(len(self.dataset.y_test)),
            "partition": self.partition_stats,
            "stages": [s.name for s in self.stages],
            **self.pipeline.describe(),
            **distributed.describe(self.trainer),
        }

    # ---- one round ------------------------------------------------------------------------
    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids of round ``round_idx`` (1-based), sorted; seeded by (seed, round)."""
        return self.pipeline.sampler.sample(round_idx)

    def context(self, round_idx: int, client_ids: list[int] | None = None) -> RoundContext:
        """The :class:`RoundContext` of round ``round_idx`` for ``client_ids`` (default: the
        sampled cohort), at the current global model."""
        ids = self.sample_clients(round_idx) if client_ids is None else list(client_ids)
        counts = [self.counts[i] for i in ids]
        return RoundContext(
            round=round_idx, seed=self.cfg.seed, client_ids=ids, counts=counts,
            malicious=self.pipeline.adversary.malicious_mask(ids, round_idx).to(self.device),
            weights=torch.tensor(counts, dtype=self.w.dtype, device=self.device),
            global_params=self.global_params, spec=self.spec, device=self.device,
            num_classes=self.dataset.num_classes, population=self.cfg.client_num_in_total,
            expected_cohort=self.cfg.client_num_per_round, use_gradient=self.cfg.use_gradient,
            server_lr=self.cfg.effective_server_lr,
        )

    def step(self) -> dict[str, Any]:
        """Run one round; evaluate when due. Returns the round's metrics."""
        start = self.begin_round()
        if start is None:  # a guard stopped the run before this round trained
            return {"round": self.round + 1, "stopped": self.stopped}
        # 3.-5. broadcast, local training (batch transforms inside), updates U (N, D)
        local = self.trainer.train(start.ctx, self.pipeline.batch_transforms)
        return self.finish_round(start, local)

    def begin_round(self) -> RoundStart | None:
        """Steps 1-2 of the next round and the guards' checks before it.

        Returns:
            The round's start (context, the guards' metrics, start time), or ``None`` when a
            guard stopped the run (``self.stopped`` says why).
        """
        if self.done:
            raise SpflError(f"the run has finished all {self.cfg.comm_round} rounds")
        r = self.round + 1
        t0 = time.perf_counter()
        # 1. sample clients (and mark the malicious ones); 2. their data is gathered per step
        ctx = self.context(r)
        metrics: dict[str, Any] = {"round": r, "clients": ctx.num_clients}
        for g in self.pipeline.guards:  # e.g. the privacy budget: stop before a round that would overspend
            reason, m = g.before_round(ctx)
            if reason is not None:
                self.stopped = reason
                return None
            metrics.update(m)
        return RoundStart(ctx, metrics, t0)

    def finish_round(self, start: RoundStart, local: LocalResult) -> dict[str, Any]:
        """Steps 6-10 of the round that ``start`` began, from its local training ``local``
        (``U (N, D)``). :meth:`step` is ``begin_round``, the trainer, then this; a vectorized
        sweep trains several runs' cohorts in one call and finishes each run here."""
        cfg, p = self.cfg, self.pipeline
        ctx, metrics, t0 = start.ctx, start.metrics, start.t0
        r = ctx.round
        U = local.U
        # 6.-7. update stages: attacks, then client-side defenses
        for s in p.update_stages:
            U, m = s.apply(ctx, U)
            metrics.update(m)
        # 8. aggregation to (D,)
        agg, m = p.aggregation.apply(ctx, U)
        metrics.update(m)
        # 9. server stages, then the server step: the pseudo-gradient is -update, or the gradient
        rejected = bool(m.get("round_rejected", False))
        self.rejected_rounds += rejected
        self.consecutive_rejected = self.consecutive_rejected + 1 if rejected else 0
        if not rejected:
            for s in p.server_stages:
                agg, m = s.apply(ctx, agg)
                metrics.update(m)
            pseudo_grad = agg if cfg.use_gradient else -agg
            self.w = self.server_opt.step(self.w, pseudo_grad)
        # 10. accounting for what the round released, read-only audits of U
        for g in p.guards:
            _, m = g.after_round(ctx)
            metrics.update(m)
        for a in p.audits:
            if r % a.every == 0:
                _, m = a.apply(ctx, U)
                metrics.update(m)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - t0
        self.round = r
        metrics.update(
            train_loss=float(local.train_loss.mean()) if ctx.num_clients else float("nan"),
            round_s=train_s,
            clients_per_s=ctx.num_clients / max(train_s, 1e-9),
        )
        nonfinite = bool(ctx.num_clients) and not math.isfinite(metrics["train_loss"])
        self.nonfinite_loss_rounds += nonfinite
        self.consecutive_nonfinite_loss = self.consecutive_nonfinite_loss + 1 if nonfinite else 0
        K = cfg.max_rejected_rounds
        if K and self.consecutive_rejected >= K:
            self.diverged = True
            self.stopped = (f"diverged: {K} consecutive rounds were rejected (every update, or the aggregate, was "
                            f"NaN/Inf), so the model stopped changing; lower --lr or check the attack "
                            f"(--max_rejected_rounds sets K)")
        # 10. evaluate and log
        if r % cfg.frequency_of_the_test == 0 or r == cfg.comm_round:
            metrics.update(self.evaluation(ctx))
        self.elapsed += time.perf_counter() - t0
        metrics["wall_s"] = self.elapsed
        if "test_acc" in metrics:
            self.history.rows.append(metrics)
        return metrics

    def evaluation(self, ctx: RoundContext | None = None) -> Metrics:
        """Test accuracy and loss of the global model, plus every evaluation hook's metrics."""
        acc, loss = self.evaluate()
        out: Metrics = {"test_acc": acc, "test_loss": loss}
        ctx = ctx if ctx is not None else self.context(self.round, [])
        params = self.global_params
        for h in self.pipeline.eval_hooks:
            _, m = h.evaluate(ctx, self.model, params)
            self.eval_keys.update(m)
            out.update(m)
        return out

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Global model accuracy and mean loss over the full test set, in batches.

        Under torchrun each process evaluates every P-th batch; the per-batch counts and loss
        sums ``(batches, 2)`` float64 are all_reduced, each batch's from the one process that
        evaluated it and exact zeros from the others, and summed in batch order as in one
        process: the same bits, for 1/P of the work.
        """
        params = self.global_params
        bs = self.cfg.eval_batch_size
        n = len(self.y_test)
        starts = range(0, n, bs)
        sharding = getattr(self.packed, "sharding", None)
        per_batch = torch.zeros(len(starts), 2, dtype=torch.float64)  # (batches, [correct, loss sum])
        for b, lo in enumerate(starts):
            if sharding is not None and b % sharding.world != sharding.rank:
                continue
            x, y = self.x_test[lo : lo + bs], self.y_test[lo : lo + bs]
            logits = functional_call(self.model, params, (x,))
            per_batch[b, 0] = int((logits.argmax(1) == y).sum())
            per_batch[b, 1] = float(F.cross_entropy(logits, y, reduction="sum"))
        if sharding is not None:
            per_batch = sharding.reduce(per_batch.to(self.device), "sum").cpu()
        correct, loss_sum = 0, 0.0
        for c, loss in per_batch.tolist():  # in batch order, as Python floats
            correct += int(c)
            loss_sum += loss
        return correct / n, loss_sum / n

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "w": self.w.detach().cpu().clone(),
            "server_opt": {k: v.cpu() for k, v in self.server_opt.state_dict().items()},
            "elapsed": self.elapsed,
            "stages": self.pipeline.state_dict(),
            "rejected_rounds": self.rejected_rounds,
            "consecutive_rejected": self.consecutive_rejected,
            "nonfinite_loss_rounds": self.nonfinite_loss_rounds,
            "config": self.cfg.to_dict(),
            "rng": "all randomness is derived from (seed, purpose, round, client); no generator state to save",
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["w"].numel() != self.spec.dim:
            raise SpflError(f"checkpoint has {sd['w'].numel()} parameters, the model has {self.spec.dim}")
        self.round = int(sd["round"])
        self.w = sd["w"].to(self.device).clone()
        self.server_opt.load_state_dict({k: v.to(self.device) for k, v in sd["server_opt"].items()})
        self.elapsed = float(sd.get("elapsed", 0.0))
        self.pipeline.load_state_dict(sd["stages"] if "stages" in sd else legacy_stage_state(sd))
        self.rejected_rounds = int(sd.get("rejected_rounds", 0))
        self.consecutive_rejected = int(sd.get("consecutive_rejected", 0))
        self.nonfinite_loss_rounds = int(sd.get("nonfinite_loss_rounds", 0))

    def save_checkpoint(self, run_dir: str | Path) -> Path:
        """Write the checkpoint atomically (temp file + rename)."""
        path = Path(run_dir) / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, run_dir: str | Path, state: dict[str, Any] | None = None) -> None:
        """Restore ``run_dir``'s checkpoint; ``state`` is that file's contents if already read."""
        path = Path(run_dir) / CHECKPOINT
        if state is None and not path.is_file():
            raise SpflError(f"no checkpoint in {run_dir}: expected {path} (was the run started with --checkpoint_every?)")
        sd = read_checkpoint(path) if state is None else state
        try:
            self.load_state_dict(sd)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SpflError(f"{path} does not fit this run ({type(e).__name__}: {str(e)[:120]}); it was written by another configuration or version") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict; a damaged file (empty, truncated, garbage, wrong contents) is a
    one-line :class:`SpflError`, not a traceback."""
    def damaged(why: str) -> SpflError:
        return SpflError(f"{path} is damaged ({why}); restore a copy, or delete the run directory and start a new run")

    if path.stat().st_size == 0:
        raise damaged("empty file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, ValueError, OSError, AttributeError, ImportError) as e:
        text = str(e)
        why = ("truncated, or not a torch checkpoint" if "zip archive" in text or isinstance(e, EOFError)
               else "unreadable contents" if "Weights only load failed" in text or isinstance(e, pickle.UnpicklingError)
               else (text.splitlines()[0][:100] if text else type(e).__name__))
        raise damaged(why) from None
    need = ("round", "w", "server_opt")
    if not isinstance(sd, dict) or any(k not in sd for k in need) or not isinstance(sd["w"], torch.Tensor):
        raise damaged(f"not a spfl checkpoint: expected a dict with {', '.join(need)}")
    return sd


def legacy_stage_state(sd: dict[str, Any]) -> dict[str, Any]:
    """Stage states of a checkpoint written before the stage pipeline (aggregator state and the
    privacy module's accountant, sigma and clip under top-level keys)."""
    out: dict[str, Any] = {"aggregator": {"state": sd.get("agg_state", {})}}
    priv = sd.get("privacy") or {}
    if priv:
        out["privacy"] = {"accountant": priv["accountant"], "sigma": priv["sigma"]}
        out["dp_fedavg"] = {"clip": priv["clip"]}
    return out
