"""The reference engine: a plain per-client loop over an ordinary ``nn.Module`` and ``torch.optim``.

It consumes the same data, batch schedule and optimizer settings as the vectorized engine, so
it is both the correctness oracle and the speed baseline.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.packing import PackedClients
from .local import LocalResult
from .params import ParamSpec, Params
from .schedule import Schedule


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

    label_poison = None  # set by the simulator for data-poisoning attacks

    def train(self, global_params: Params, client_ids: list[int], sched: Schedule, poisoned: torch.Tensor | None = None) -> LocalResult:
        N = len(client_ids)
        U = torch.empty(N, self.spec.dim, device=self.device)
        losses = torch.empty(N, device=self.device)
        w0 = self.spec.flatten(global_params)
        for i, cid in enumerate(client_ids):
            self._load(global_params)
            rows = self.packed.client_indices(cid)
            poison = self.label_poison if poisoned is not None and bool(poisoned[i]) else None
            if self.cfg.use_gradient:
                U[i], losses[i] = self._full_gradient(rows, poison)
                continue
            opt = self._optimizer()
            total, steps = 0.0, 0
            for t in range(sched.num_steps):
                m = sched.mask[i, t]
                if not bool(m.any()):
                    continue
                gidx = rows[sched.pos[i, t][m].to(self.device)]
                y = self.packed.y[gidx] if poison is None else poison(self.packed.y[gidx])
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(self.packed.x[gidx]), y)
                loss.backward()
                opt.step()
                total += float(loss.detach())
                steps += 1
            U[i] = self._flat() - w0
            losses[i] = total / max(steps, 1)
        return LocalResult(U, losses, self.strategy, 1)

    def _full_gradient(self, rows: torch.Tensor, poison=None) -> tuple[torch.Tensor, float]:
        B = self.cfg.batch_size
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        for lo in range(0, len(rows), B):
            idx = rows[lo : lo + B]
            y = self.packed.y[idx] if poison is None else poison(self.packed.y[idx])
            loss = F.cross_entropy(self.model(self.packed.x[idx]), y, reduction="sum")
            loss.backward()
            total += float(loss.detach())
        g = torch.cat([p.grad.reshape(-1) for p in self.model.parameters()])
        return g / len(rows), total / len(rows)
