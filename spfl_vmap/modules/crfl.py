"""CRFL as a round stage: the global model clipped and noised after every round.

Xie, Chen, Chen & Li, "CRFL: Certifiably Robust Federated Learning against Backdoor Attacks",
ICML 2021. After round ``t``'s aggregation the server sets the global model to
``clip(w_{t-1} + aggregate, rho_t) + N(0, sigma^2 I)`` (whole-model L2 clip; the maths is in
:mod:`spfl_vmap.defenses.crfl`). ``spfl certify`` then smooths the final model in parameter space
and certifies each test point against a bounded backdoor (``spfl_vmap.experiments.certify``).

Flags (``--crfl --crfl_rho --crfl_rho_init --crfl_rho_step --crfl_sigma``) combine with any
aggregator, with or without a backdoor or Byzantine attack, and with the backdoor module's
defenses (which act before it).

A server stage sees the aggregate update ``agg (D,)``, not the model: :class:`CRFLClipNoise`
returns the update that makes the server's step land on the clipped, noised model. That is only
possible when the step is a fixed linear function of the update: plain SGD, ``w + s * lr * agg``
with ``s = +1`` for model deltas and ``s = -1`` for uploaded gradients (``--use_gradient``), so
the returned update is ``s * (target - w) / lr``. With server momentum (FedAvgM) or Adam
(FedAdam) the step also depends on optimizer state the stage cannot see (and Adam's step is not
invertible coordinate-wise in general), so the config section refuses them.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Optional

import torch

from ..config import SECTIONS, Config, need
from ..defenses.crfl import clip_model, rho_at
from ..stages import BuildEnv, Metrics, RoundContext, ServerStage, Stage

CRFL_FLAGS = ("crfl_rho", "crfl_rho_init", "crfl_rho_step", "crfl_sigma")


# ---- the config section -----------------------------------------------------------------------
@SECTIONS.register("crfl")
def validate(cfg: Config) -> None:
    """The ``--crfl*`` flags: positive clip norms, a non-negative noise, no flag without ``--crfl``,
    and a server step the model-space clip can be expressed through (plain SGD)."""
    need(math.isfinite(cfg.crfl_rho) and cfg.crfl_rho > 0, f"--crfl_rho must be a finite number > 0, got {cfg.crfl_rho}")
    if cfg.crfl_rho_init is not None:
        need(math.isfinite(cfg.crfl_rho_init) and cfg.crfl_rho_init > 0, f"--crfl_rho_init must be a finite number > 0, got {cfg.crfl_rho_init}")
    need(math.isfinite(cfg.crfl_rho_step) and cfg.crfl_rho_step >= 0, f"--crfl_rho_step must be a finite number >= 0, got {cfg.crfl_rho_step}")
    need(cfg.crfl_rho_step == 0 or cfg.crfl_rho_init is not None, "--crfl_rho_step grows the clip from --crfl_rho_init: give both")
    need(math.isfinite(cfg.crfl_sigma) and cfg.crfl_sigma >= 0, f"--crfl_sigma must be a finite number >= 0, got {cfg.crfl_sigma}")
    if not cfg.crfl:
        defaults = {f.name: f.default for f in fields(Config)}
        given = [f"--{k}" for k in CRFL_FLAGS if getattr(cfg, k) != defaults[k]]
        need(not given, f"{', '.join(given)} configure CRFL: add --crfl")
        return
    need(cfg.server_optimizer == "sgd" and cfg.server_momentum == 0,
         f"--crfl clips the global model through the server step, which needs --server_optimizer sgd without --server_momentum "
         f"(got {cfg.server_optimizer}, momentum {cfg.server_momentum}: its optimizer state would move the model off the clipped one)")


def schedule_text(rho: float, rho_init: Optional[float], rho_step: float) -> str:
    return f"{rho:g}" if rho_init is None else f"min({rho:g}, {rho_init:g} + {rho_step:g} t)"


# ---- the stage ----------------------------------------------------------------------------------
class CRFLClipNoise(ServerStage):
    """Round step 9: the aggregate rewritten so that the global model becomes
    ``clip(w + s * lr * agg, rho_t) + sigma * N(0, I)`` (CRFL's Algorithm 1).

    The noise comes from ``ctx.generator("crfl")``. The stage keeps the last clipped model before
    its noise (``clipped``, checkpointed): ``spfl certify`` smooths around it, as the authors do
    (their saved model is the clipped one; the noise of round ``T`` is the smoothing noise).

    Metrics: ``crfl_norm`` (the global model's norm before the clip), ``crfl_clipped`` (1 if the
    clip acted), ``crfl_rho`` (this round's clip norm).
    """

    name = "crfl"

    def __init__(self, rho: float, sigma: float, rho_init: Optional[float] = None, rho_step: float = 0.0) -> None:
        self.rho, self.sigma, self.rho_init, self.rho_step = rho, sigma, rho_init, rho_step
        self.clipped: Optional[torch.Tensor] = None  # (D,) the last round's clipped model, before the noise
        self.round = 0  # the round ``clipped`` belongs to

    @classmethod
    def from_config(cls, cfg: Config) -> "CRFLClipNoise":
        return cls(cfg.crfl_rho, cfg.crfl_sigma, cfg.crfl_rho_init, cfg.crfl_rho_step)

    def rho_at(self, t: int) -> float:
        return rho_at(t, self.rho, self.rho_init, self.rho_step)

    def apply(self, ctx: RoundContext, agg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        G = ctx.spec.flatten(ctx.global_params).to(agg.dtype)  # (D,) the model the round started from
        s = -1.0 if ctx.use_gradient else 1.0  # plain SGD moves w by s * lr * agg
        lr = ctx.server_lr
        rho = self.rho_at(ctx.round)
        clipped, norm = clip_model(G + s * lr * agg, rho)  # (D,), ()
        target = clipped
        if self.sigma > 0:
            g = ctx.generator("crfl", device=agg.device)
            target = clipped + self.sigma * torch.randn(agg.shape, generator=g, device=agg.device, dtype=agg.dtype)
        self.clipped, self.round = clipped.detach(), ctx.round
        return s * (target - G) / lr, {"crfl_norm": float(norm), "crfl_clipped": int(bool(norm > rho)), "crfl_rho": rho}

    def state_dict(self) -> dict[str, Any]:
        return {"clipped": None if self.clipped is None else self.clipped.detach().cpu().clone(), "round": self.round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = state.get("clipped")
        self.clipped = None if c is None else c.clone()
        self.round = int(state.get("round", 0))

    def describe(self) -> dict[str, Any]:
        return {"crfl": {"rho": self.rho, "rho_schedule": schedule_text(self.rho, self.rho_init, self.rho_step), "sigma": self.sigma}}


def stages(cfg: Config, env: BuildEnv) -> list[Stage]:
    """The module's stage for ``cfg``: :class:`CRFLClipNoise` with ``--crfl``, else none."""
    return [CRFLClipNoise.from_config(cfg)] if cfg.crfl else []


__all__ = ["CRFLClipNoise", "schedule_text", "stages", "validate"]
