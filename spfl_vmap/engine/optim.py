"""Optimizers over stacked parameters ``{name: [N, *shape]}``, with a per-client active mask.

They reproduce ``torch.optim.SGD`` (momentum, weight decay) and ``torch.optim.Adam`` step for
step, so the vectorized engine matches the per-client loop. A client whose step is inactive
(no real sample in its batch) keeps its parameters *and* optimizer state: momentum, weight
decay and Adam's step count do not advance on padding.

Hyperparameters are floats (then each update uses ``torch.optim``'s exact op, so the engines
agree to rounding) or tensors that broadcast against the client dimension (``[]`` or ``[N]``),
so a sweep can put a configuration dimension in front without new code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


Hyper = Union[float, torch.Tensor]


def _bcast(h: Hyper, like: torch.Tensor) -> Hyper:
    """A float, or a ``[]`` / ``[N]`` tensor made broadcastable against ``[N, *shape]``."""
    if isinstance(h, torch.Tensor) and h.dim():
        return h.reshape(h.shape + (1,) * (like.dim() - h.dim()))
    return h


def _axpy(y: torch.Tensor, x: torch.Tensor, a: Hyper) -> torch.Tensor:
    """``y + a * x``, as ``torch.add(y, x, alpha=a)`` for a float (torch.optim's own op and
    rounding) and as ``torch.addcmul(y, a, x)`` for tensor hyperparameters (sweeps), which
    rounds like ``add(alpha=)`` (once, not after the product as ``y + a * x`` would).
    A tensor ``a`` is cast to ``y``'s dtype, as ``add`` casts its Python-float alpha."""
    if isinstance(a, torch.Tensor):
        return torch.addcmul(y, _bcast(a.to(y.dtype), y), x)
    return torch.add(y, x, alpha=a)


def _keep(active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the client's step is active, ``old`` where it is padding; ``active=None``
    means every client is active (the host knows this, so the select is skipped)."""
    return new if active is None else torch.where(_bcast(active, new), new, old)


Hypers = dict[str, torch.Tensor]  # {"lr" | "momentum" | "wd": (n,)} per-client values


def _hypers(hypers: Hypers | None, lr: Hyper, momentum: Hyper, wd: Hyper) -> tuple[Hyper, Hyper, Hyper]:
    """The step's ``(lr, momentum, wd)``: per-client tensors from ``hypers`` where given."""
    h = hypers or {}
    return h.get("lr", lr), h.get("momentum", momentum), h.get("wd", wd)


def _nonzero(h: Hyper) -> bool:
    """Whether a term with ``h`` must be computed: a float's value; a tensor always (its rows may
    differ, ``0 * x`` adds nothing, and a host-side check would break graph tracing)."""
    return True if isinstance(h, torch.Tensor) else h != 0


@dataclass
class StackedSGD:
    """``torch.optim.SGD`` (no dampening): ``d = g + wd p; buf = m buf + d; p -= lr buf``, op for op."""

    lr: Hyper
    momentum: Hyper
    wd: Hyper

    def init(self, params: Params) -> State:
        m = self.momentum
        if not (bool((m != 0).any()) if isinstance(m, torch.Tensor) else m != 0):
            return {}
        return {f"buf.{k}": torch.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params, state: State, active: torch.Tensor | None) -> tuple[Params, State]:
        new_p, new_s = {}, {}
        for k, p in params.items():
            d = _axpy(grads[k], p, self.wd) if _nonzero(self.wd) else grads[k]
            if state:
                # torch starts buf as a copy of d; m * 0 + d == d exactly, so zeros work too
                buf = state[f"buf.{k}"] * _bcast(self.momentum, p) + d
                new_s[f"buf.{k}"] = _keep(active, buf, state[f"buf.{k}"])
                d = buf
            new_p[k] = _keep(active, _axpy(p, d, -self.lr), p)
        return new_p, new_s

    def step_(self, params: Params, grads: Params, state: State, hypers: Hypers | None = None) -> None:
        """The same step in place, every client active (the engine trains only active clients).

        ``params``/``state`` may be views (a prefix of the stacked clients); ``hypers`` holds
        per-client ``(n,)`` tensors that replace ``lr``/``momentum``/``wd`` (vectorized sweeps).
        """
        lr, mom, wd = _hypers(hypers, self.lr, self.momentum, self.wd)
        for k, p in params.items():
            d = _axpy(grads[k], p, wd) if _nonzero(wd) else grads[k]
            if state:
                buf = state[f"buf.{k}"]
                if isinstance(mom, torch.Tensor):
                    buf.mul_(_bcast(mom.to(buf.dtype), buf)).add_(d)
                else:
                    buf.mul_(mom).add_(d)  # torch.optim's ops (its first buf = d = 0 * m + d)
                d = buf
            if isinstance(lr, torch.Tensor):
                p.addcmul_(_bcast(lr.to(p.dtype), p), d, value=-1)  # rounds as add(alpha=-lr)
            else:
                p.add_(d, alpha=-lr)


@dataclass
class StackedAdam:
    """``torch.optim.Adam`` (L2 weight decay), op for op, with per-client step counts.

    Bias corrections are computed in float64 as torch does with its Python-float step, then
    applied as float32 per-client scalars.
    """

    lr: Hyper
    wd: Hyper
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, params: Params) -> State:
        first = next(iter(params.values()))
        st: State = {"step": torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)}
        for k, v in params.items():
            st[f"m.{k}"] = torch.zeros_like(v)
            st[f"v.{k}"] = torch.zeros_like(v)
        return st

    def step(self, params: Params, grads: Params, state: State, active: torch.Tensor | None) -> tuple[Params, State]:
        step = state["step"] + (1.0 if active is None else active.to(torch.float64))  # (N,)
        safe = step.clamp(min=1)
        lr = self.lr.double() if isinstance(self.lr, torch.Tensor) else self.lr
        neg_step_size = (-(lr / (1 - self.beta1**safe))).float()  # (N,)
        bc2_sqrt = torch.sqrt(1 - self.beta2**safe).float()  # (N,)
        new_p: Params = {}
        new_s: State = {"step": step}
        for k, p in params.items():
            g = _axpy(grads[k], p, self.wd) if _nonzero(self.wd) else grads[k]
            m = torch.lerp(state[f"m.{k}"], g, 1 - self.beta1)
            v = torch.addcmul(state[f"v.{k}"] * self.beta2, g, g, value=1 - self.beta2)
            denom = torch.sqrt(v) / _bcast(bc2_sqrt, p) + self.eps
            upd = p + _bcast(neg_step_size, p) * (m / denom)  # addcdiv's order
            new_p[k] = _keep(active, upd, p)
            new_s[f"m.{k}"] = _keep(active, m, state[f"m.{k}"])
            new_s[f"v.{k}"] = _keep(active, v, state[f"v.{k}"])
        return new_p, new_s

    def step_(self, params: Params, grads: Params, state: State, hypers: Hypers | None = None) -> None:
        """The same step in place, every client active (see :meth:`StackedSGD.step_`)."""
        lr, _, wd = _hypers(hypers, self.lr, 0.0, self.wd)
        step = state["step"]
        step.add_(1.0)
        lr64 = lr.double() if isinstance(lr, torch.Tensor) else lr
        neg_step_size = (-(lr64 / (1 - self.beta1**step))).float()  # (n,)
        bc2_sqrt = torch.sqrt(1 - self.beta2**step).float()  # (n,)
        for k, p in params.items():
            g = _axpy(grads[k], p, wd) if _nonzero(wd) else grads[k]
            m, v = state[f"m.{k}"], state[f"v.{k}"]
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = torch.sqrt(v) / _bcast(bc2_sqrt, p) + self.eps
            p.add_(_bcast(neg_step_size, p) * (m / denom))


def make_client_optimizer(name: str, lr: Hyper, momentum: Hyper, wd: Hyper):
    if name == "sgd":
        return StackedSGD(lr, momentum, wd)
    if name == "adam":
        return StackedAdam(lr, wd)
    raise ValueError(name)


class ServerOptimizer:
    """Applies the aggregate to the flat global model ``w [D]``.

    The pseudo-gradient is ``-aggregate`` for model updates and ``aggregate`` for uploaded
    gradients, so ``sgd`` with lr 1 and no momentum is plain FedAvg, momentum gives FedAvgM
    (Hsu et al. 2019) and ``adam`` gives FedAdam (Reddi et al. 2021).
    """

    def __init__(self, name: str, lr: float, momentum: float = 0.0, beta1: float = 0.9, beta2: float = 0.99, eps: float = 1e-3) -> None:
        self.name, self.lr, self.momentum = name, lr, momentum
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.state: dict[str, torch.Tensor] = {}

    def step(self, w: torch.Tensor, pseudo_grad: torch.Tensor) -> torch.Tensor:
        if self.name == "sgd":
            if self.momentum == 0:
                return w - self.lr * pseudo_grad
            buf = self.state.get("buf")
            buf = pseudo_grad.clone() if buf is None else self.momentum * buf + pseudo_grad
            self.state["buf"] = buf
            return w - self.lr * buf
        m = self.state.get("m", torch.zeros_like(w))
        v = self.state.get("v", torch.zeros_like(w))
        m = self.beta1 * m + (1 - self.beta1) * pseudo_grad
        v = self.beta2 * v + (1 - self.beta2) * pseudo_grad * pseudo_grad
        self.state.update(m=m, v=v)
        return w - self.lr * m / (torch.sqrt(v) + self.eps)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in sd.items()}
