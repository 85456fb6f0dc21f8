"""The round loop.

One round, as in DESIGN.md section 3:
    1. sample clients with a generator seeded by (seed, round);
    2. gather their slices of the pre-packed client data;
    3. broadcast the global model to stacked parameters ``[N, ...]``;
    4. local training (vectorized, or the reference loop);
    5. updates ``U [N, D]`` (trained - global, or gradients with ``--use_gradient``);
    6. attacks rewrite malicious rows of ``U`` (module issues);
    7. client-side defenses (module issues);
    8. aggregation to ``[D]``;
    9. server-side defenses and the server optimizer step;
    10. evaluate, log, account privacy.

All randomness is a function of ``(seed, round, client)``, so a run resumed from a checkpoint
continues bit-identically: the checkpoint only needs the global model, the server optimizer and
aggregator state, and the round number.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..config import Config
from ..data import Dataset, load_dataset, pack_clients, partition, partition_stats
from ..errors import ConfigError, SpflError
from ..rng import derive_seed, generator
from .modules import ByzantineStage, PrivacyStage
from .local import VmapTrainer
from .loop import LoopTrainer
from .optim import ServerOptimizer
from .params import ParamSpec, Params, init_model
from .schedule import make_schedule

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

    @property
    def final(self) -> dict[str, Any]:
        return self.rows[-1] if self.rows else {}

    def column(self, key: str) -> list[Any]:
        return [r[key] for r in self.rows if key in r]


class Simulator:
    """Step-by-step control of a federated run.

    Example:
        >>> sim = Simulator(Config(dataset="digits", model="lr", comm_round=3))
        >>> while not sim.done:
        ...     metrics = sim.step()
    """

    def __init__(self, cfg: Config, data: Dataset | None = None) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        ds = data if data is not None else load_dataset(
            cfg.dataset, cfg.data_dir, cfg.download, synthetic_train=cfg.synthetic_train, synthetic_test=cfg.synthetic_test
        )
        self.dataset = ds
        labels = ds.y_train.numpy()
        parts = partition(labels, cfg.client_num_in_total, cfg.partition_method, cfg.partition_alpha, cfg.seed, cfg.partition_min_samples)
        self.parts = parts
        self.partition_stats = partition_stats(parts, labels)
        self.packed = pack_clients(ds.x_train, ds.y_train, parts, self.device)  # packed once
        self.counts = [len(p) for p in parts]
        self.x_test, self.y_test = ds.x_test.to(self.device), ds.y_test.to(self.device)

        self.model = init_model(cfg.model, ds.input_shape, ds.num_classes, cfg.model_width, cfg.seed).to(self.device)
        self.spec = ParamSpec.of(self.model)
        self.w = self.spec.flatten({k: p.detach() for k, p in self.model.named_parameters()}).clone()  # (D,)
        self.server_opt = ServerOptimizer(cfg.server_optimizer, cfg.effective_server_lr, cfg.server_momentum)
        self.byz = ByzantineStage(cfg, ds.num_classes)
        self.privacy = PrivacyStage(cfg, self.counts, len(ds.y_train))
        if self.privacy.mode == "example":
            from ..privacy.dpsgd import DPSGDTrainer

            self.trainer = DPSGDTrainer(self.model, self.spec, self.packed, self.privacy.trainer_config(cfg), self.device)
        else:
            trainer_cls = LoopTrainer if cfg.engine == "loop" else VmapTrainer
            self.trainer = trainer_cls(self.model, self.spec, self.packed, cfg, self.device)
        self.trainer.label_poison = self.byz.label_poison
        self.agg_state: dict[str, Any] = {}
        self.stopped: str | None = None  # why the run ended early (privacy budget)
        self.round = 0  # rounds completed
        self.history = History()
        self.elapsed = 0.0  # wall seconds spent in rounds and evaluation

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
            **self.byz.describe(),
            **self.privacy.describe(),
        }

    # ---- one round ------------------------------------------------------------------------
    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids of round ``round_idx`` (1-based), sorted; seeded by (seed, round)."""
        K, n = self.cfg.client_num_in_total, self.cfg.client_num_per_round
        if self.privacy.poisson_clients:  # DP-FedAvg: each client joins independently w.p. q
            keep = torch.rand(K, generator=generator(self.cfg.seed, "sample", round_idx)) < n / K
            return torch.nonzero(keep).flatten().tolist()
        if n == K:
            return list(range(K))
        perm = torch.randperm(K, generator=generator(self.cfg.seed, "sample", round_idx))
        return sorted(perm[:n].tolist())

    def step(self) -> dict[str, Any]:
        """Run one round; evaluate when due. Returns the round's metrics."""
        if self.done:
            raise SpflError(f"the run has finished all {self.cfg.comm_round} rounds")
        cfg = self.cfg
        r = self.round + 1
        t0 = time.perf_counter()
        # 1. sample clients; 2. their data slices are gathered per step from the packed tensors
        ids = self.sample_clients(r)
        counts = [self.counts[i] for i in ids]
        # DP-SGD draws its own Poisson batches; every other trainer follows the shuffled schedule
        sched = None if self.privacy.mode == "example" else make_schedule(
            ids, counts, cfg.batch_size, 1 if cfg.use_gradient else cfg.epochs, cfg.seed, r, shuffle=not cfg.use_gradient)
        malicious = self.byz.malicious_mask(ids, r)  # (N,) bool
        if not self.privacy.may_train(ids, counts):
            self.stopped = self.privacy.stop_reason
            return {"round": r, "stopped": self.stopped}
        # 3.-5. broadcast, local training (data poisoning inside), updates U (N, D)
        extra = {"round_idx": r} if self.privacy.mode == "example" else {}  # DP-SGD draws its Poisson batches per round
        local = self.trainer.train(self.global_params, ids, sched, poisoned=malicious if self.byz.poisons_data else None, **extra)
        U = local.U
        weights = torch.tensor(counts, dtype=U.dtype, device=U.device)  # (N,)
        metrics: dict[str, Any] = {"round": r, "clients": len(ids)}
        # 6. attacks rewrite the malicious rows
        U, m = self.byz.attack(U, malicious, weights, r)
        metrics.update(m)
        # 7. client-side defenses (local DP: each client clips and noises its own update)
        U, m = self.privacy.client_side(U, ids, r)
        metrics.update(m)
        # 8. aggregation to (D,): DP-FedAvg's clipped noisy sum, or the registered aggregator
        if self.privacy.mode == "user":
            agg, m = self.privacy.dp_fedavg(U, r)
        else:
            agg, m = self.byz.aggregate(U, weights, malicious, self.agg_state, r)
        metrics.update(m)
        # 9. server step: the pseudo-gradient is -update (weights mode) or the gradient itself
        if not m.get("round_rejected", False):
            pseudo_grad = agg if cfg.use_gradient else -agg
            self.w = self.server_opt.step(self.w, pseudo_grad)
        # 10. account privacy for what this round released
        self.privacy.account(ids, counts, r)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        train_s = time.perf_counter() - t0
        self.round = r
        metrics.update(
            train_loss=float(local.train_loss.mean()) if len(ids) else float("nan"),
            round_s=train_s,
            clients_per_s=len(ids) / max(train_s, 1e-9),
        )
        # 10. evaluate and log
        if r % cfg.frequency_of_the_test == 0 or r == cfg.comm_round:
            acc, loss = self.evaluate()
            metrics.update(test_acc=acc, test_loss=loss)
            metrics.update(self.privacy.report(r))
        self.elapsed += time.perf_counter() - t0
        metrics["wall_s"] = self.elapsed
        if "test_acc" in metrics:
            self.history.rows.append(metrics)
        return metrics

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Global model accuracy and mean loss over the full test set, in batches."""
        params = self.global_params
        correct, loss_sum = 0, 0.0
        bs = self.cfg.eval_batch_size
        for lo in range(0, len(self.y_test), bs):
            x, y = self.x_test[lo : lo + bs], self.y_test[lo : lo + bs]
            logits = functional_call(self.model, params, (x,))
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = len(self.y_test)
        return correct / n, loss_sum / n

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "w": self.w.detach().cpu().clone(),
            "server_opt": {k: v.cpu() for k, v in self.server_opt.state_dict().items()},
            "elapsed": self.elapsed,
            "agg_state": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.agg_state.items()},
            "privacy": self.privacy.state_dict(),
            "config": self.cfg.to_dict(),
            "rng": "all randomness is derived from (seed, round, client); no generator state to save",
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["w"].numel() != self.spec.dim:
            raise SpflError(f"checkpoint has {sd['w'].numel()} parameters, the model has {self.spec.dim}")
        self.round = int(sd["round"])
        self.w = sd["w"].to(self.device).clone()
        self.server_opt.load_state_dict({k: v.to(self.device) for k, v in sd["server_opt"].items()})
        self.elapsed = float(sd.get("elapsed", 0.0))
        self.agg_state = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in sd.get("agg_state", {}).items()}
        self.privacy.load_state_dict(sd.get("privacy", {}))

    def save_checkpoint(self, run_dir: str | Path) -> Path:
        """Write the checkpoint atomically (temp file + rename)."""
        path = Path(run_dir) / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, run_dir: str | Path) -> None:
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise SpflError(f"no checkpoint in {run_dir}: expected {path} (was the run started with --checkpoint_every?)")
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
