"""The reference engine: a plain per-client loop over an ordinary ``nn.Module`` and ``torch.optim``.

It consumes the same data, batch schedule and optimizer settings as the vectorized engine, so
it is both the correctness oracle and the speed baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from typing import Sequence

from ..data.packing import PackedClients
from ..stages import BatchTransform, RoundContext
from .local import LocalResult, VmapTrainer, apply_transforms, round_schedule
from .params import ParamSpec, Params


class LoopTrainer:
    strategy = "reference-loop"
    chunk = 1

    def __init__(self, model: nn.Module, spec: ParamSpec, packed: PackedClients, cfg, device: torch.device) -> None:
        self.model, self.spec, self.packed, self.cfg, self.device = model, spec, packed, cfg, device

    def _load(self, global_params: Params) -> None:
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(global_params[name])

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        if c.client_optimizer == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.wd)
        return torch.optim.Adam(self.model.parameters(), lr=c.lr, weight_decay=c.wd)

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def train(self, ctx: RoundContext, transforms: Sequence[BatchTransform] = ()) -> LocalResult:
        """Each client in turn: load the global model, run ``torch.optim`` over its batches.

        Batch transforms see each batch as a chunk of one client, ``(1, b, ...)``.
        """
        sched = round_schedule(ctx, self.cfg.batch_size, self.cfg.epochs, self.cfg.use_gradient)
        global_params, client_ids = ctx.global_params, ctx.client_ids
        N = len(client_ids)
        U = torch.empty(N, self.spec.dim, device=self.device)
        losses = torch.empty(N, device=self.device)
        w0 = self.spec.flatten(global_params)
        for i, cid in enumerate(client_ids):
            self._load(global_params)
            rows = self.packed.client_indices(cid)
            row = torch.tensor([i], device=self.device)

            def batch(gidx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x, y = apply_transforms(ctx, transforms, self.packed.x[gidx][None], self.packed.y[gidx][None], row)
                return x[0], y[0]

            if self.cfg.use_gradient:
                U[i], losses[i] = self._full_gradient(rows, batch)
                continue
            opt = self._optimizer()
            total, steps = 0.0, 0
            for t in range(sched.num_steps):
                m = sched.mask[i, t]
                if not bool(m.any()):
                    continue
                x, y = batch(rows[sched.pos[i, t][m].to(self.device)])
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(x), y)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            U[i] = self._flat() - w0
            losses[i] = total / max(steps, 1)
        return LocalResult(U, losses, self.strategy, 1)

    def _full_gradient(self, rows: torch.Tensor, batch) -> tuple[torch.Tensor, float]:
        B = self.cfg.batch_size
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, len(rows), B):
            x, y = batch(rows[lo : lo + B])
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
            loss.backward()
            total += float(loss.detach())
        g = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        return g / len(rows), total / len(rows)


def plain_trainer(model: nn.Module, spec: ParamSpec, packed: PackedClients, cfg, device: torch.device):
    """The non-DP trainer ``cfg.engine`` names: the per-client reference loop or the vectorized one."""
    trainer_cls = LoopTrainer if cfg.engine == "loop" else VmapTrainer
    return trainer_cls(model, spec, packed, cfg, device)
