"""The DP-SGD trainer (example-level DP): every sampled client runs DP-SGD, all at once.

The maths (Poisson masks, per-sample clipping, noise, the one-sample-at-a-time reference) is in
:mod:`spfl_vmap.privacy.dpsgd`; this module assembles it with the engine's primitives into a
trainer with the engine's one interface, ``train(ctx, transforms)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ..data.packing import PackedClients
from ..engine.local import (
    LocalResult, active_counts, activation_numel, available_memory, gather_batch, largest_first, round_schedule, row_hypers,
    start_flat, start_params,
)
from ..engine.optim import make_client_optimizer
from ..engine.params import ParamSpec, Params
from ..errors import ConfigError
from ..privacy.dpsgd import (
    DPBatches,
    clip_and_sum,
    draw_noise,
    noise_generator,
    poisson_batches,
    sample_rates,
    schedule_batches,
    steps_per_client,
)
from ..stages import BatchTransform, RoundContext


def dpsgd_auto_chunk(model: nn.Module, input_shape: tuple[int, ...], max_batch: int, opt_slots: int, device: torch.device, n: int) -> int:
    """Largest client chunk whose DP-SGD state fits in a quarter (CPU) / half (CUDA) of free memory.

    Per client: parameters, the gradient sum, noise, a new copy and optimizer state (``P`` each),
    and per step ``L`` samples' per-sample gradients plus two temporaries of that size (squares
    for the norms, the einsum), activations and inputs.
    """
    P = sum(p.numel() for p in model.parameters())
    act = activation_numel(model, input_shape)
    per_client = 4 * (P * (4 + opt_slots) + max_batch * (3 * P + 3 * act + math.prod(input_shape)))
    budget = available_memory(device) // (2 if device.type == "cuda" else 4)
    return max(1, min(n, budget // max(per_client, 1)))


class DPSGDTrainer:
    """Example-level DP-SGD (Abadi et al. 2016) in every client, all clients at once.

    The engine's trainer interface (:class:`spfl_vmap.engine.local.Trainer`):
    ``train(ctx, transforms)`` returns the ``[N, D]`` update matrix. Built from the engine's
    primitives (batch gathering with the pipeline's transforms, the stacked optimizers). Reads
    from ``cfg``: ``client_optimizer, lr, momentum, wd, strategy, client_chunk, batch_size,
    epochs``, ``grad_norm`` (clip C, may be inf when ``dp_sigma`` is 0) and ``dp_sigma`` (noise
    multiplier).

    Args:
        model: The global model's module (used functionally; its weights are not touched).
        spec: Parameter layout.
        packed: Client data packed once.
        cfg: Run config.
        device: Where training runs.
        poisson: Poisson-sample each step's batch and divide by the expected batch size (DP-SGD
            proper). ``False`` trains on the engine's shuffled schedule of the round and divides
            by the realised batch size (see ``spfl_vmap.privacy.dpsgd``).
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, packed: PackedClients, cfg, device: torch.device, poisson: bool = True) -> None:
        if getattr(cfg, "use_gradient", False):
            raise ConfigError("DP-SGD trains locally; it cannot be combined with --use_gradient")
        self.model, self.spec, self.packed, self.cfg, self.device = model, spec, packed, cfg, device
        self.opt = make_client_optimizer(cfg.client_optimizer, cfg.lr, cfg.momentum, cfg.wd)
        self.chunk = 1
        self.clip = float(getattr(cfg, "grad_norm", 1.0))
        sigma = getattr(cfg, "dp_sigma", None)
        self.sigma = 1.0 if sigma is None else float(sigma)  # the config's default multiplier
        if not self.clip > 0:
            raise ConfigError(f"--grad_norm must be > 0 for DP-SGD, got {self.clip}")
        if self.sigma < 0 or not math.isfinite(self.sigma):
            raise ConfigError(f"--dp_sigma must be finite and >= 0, got {self.sigma}")
        if self.sigma > 0 and not math.isfinite(self.clip):
            raise ConfigError("DP-SGD noise sigma * C needs a finite --grad_norm")
        self.poisson = poisson
        self.batch_size, self.epochs = cfg.batch_size, cfg.epochs
        self._opt_slots = {"sgd": 1 if cfg.momentum else 0, "adam": 2}[cfg.client_optimizer]
        per_sample = grad_and_value(self._sample_loss)
        # Nested vmap for every model and device. Per-sample weight gradients of a conv are a
        # grouped conv over samples anyway, so vmapping the clients as well costs nothing extra;
        # measured on 2 CPU cores (cnn, 8x8 digits, L=10): 50 ms for one client, 81 ms for four,
        # and 220 ms for one client with a single vmap over samples against shared weights.
        # ``--strategy loop`` only means chunks of one client here.
        self._ps_grad_clients = vmap(vmap(per_sample, in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
        self.strategy = "dpsgd-loop" if cfg.strategy == "loop" else "dpsgd-vmap"

    # ---- accounting helpers ---------------------------------------------------------------
    def sample_rates(self, counts: Sequence[int]) -> list[float]:
        """``q_k = min(1, B / n_k)`` for clients with ``counts`` samples (for the accountant)."""
        return sample_rates(counts, self.batch_size)

    def steps_per_client(self, counts: Sequence[int]) -> list[int]:
        """DP-SGD steps each client takes in one round: ``epochs * ceil(n_k / B)``."""
        return steps_per_client(counts, self.batch_size, self.epochs)

    # ---- per-sample gradients ---------------------------------------------------------------
    def _sample_loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, params, (x[None],))  # (1, classes)
        return F.cross_entropy(logits, y[None])

    def per_sample_grads(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[Params, torch.Tensor]:
        """Per-sample gradients and losses of stacked clients.

        Args:
            params: ``{k: (n, *shape)}`` stacked parameters.
            x: ``(n, L, *input)`` samples.
            y: ``(n, L)`` labels.

        Returns:
            ``({k: (n, L, *shape)}, (n, L) losses)``.
        """
        return self._ps_grad_clients(params, x, y)

    # ---- training ---------------------------------------------------------------------------
    def train(self, ctx: RoundContext, transforms: Sequence[BatchTransform] = ()) -> LocalResult:
        """Run DP-SGD local training for ``ctx.client_ids``; returns the ``[N, D]`` update matrix.

        The Poisson masks and the noise are seeded by ``(ctx.seed, ..., ctx.round, client)``, so a
        resumed run draws them again identically. ``transforms`` rewrite each step's samples
        (label poisoning of malicious clients, as in the other trainers).

        Returns:
            :class:`LocalResult` with ``U (N, D)`` and the mean loss over each client's steps.
        """
        N = ctx.num_clients
        if self.poisson:
            batches = poisson_batches(ctx.client_ids, ctx.counts, self.batch_size, self.epochs, ctx.seed, ctx.round)
        else:
            batches = schedule_batches(round_schedule(ctx, self.batch_size, self.epochs, use_gradient=False))
        if self.strategy == "dpsgd-loop":
            self.chunk = 1
        elif self.cfg.client_chunk:
            self.chunk = self.cfg.client_chunk
        else:
            self.chunk = dpsgd_auto_chunk(self.model, tuple(self.packed.x.shape[1:]), batches.max_batch, self._opt_slots, self.device, N)
        U = torch.empty(N, self.spec.dim, device=self.device)
        losses = torch.empty(N, device=self.device)
        order = largest_first(batches.active.sum(1))  # (N,) cohort rows, most steps first
        for lo in range(0, N, self.chunk):
            rows = order[lo : lo + self.chunk]
            out = rows.to(self.device)
            U[out], losses[out] = self._dp_chunk(ctx, rows, batches.select(rows), transforms)
        return LocalResult(U, losses, self.strategy, self.chunk)

    def _dp_chunk(
        self, ctx: RoundContext, rows: torch.Tensor, b: DPBatches, transforms: Sequence[BatchTransform]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """DP-SGD of the cohort rows ``rows (n,)``, sorted by step count (most first): step ``t``
        runs the prefix of clients still training (no masked steps), in place on prefix views."""
        client_ids = [ctx.client_ids[int(r)] for r in rows]
        n, D, dev = len(client_ids), self.spec.dim, self.device
        ids = torch.tensor(client_ids, device=dev)
        cohort_rows = rows.to(dev)
        index_rows = self.packed.index[ids]  # (n, n_max)
        params = start_params(ctx, cohort_rows)  # {k: (n, *shape)}, trained in place
        hyp = row_hypers(ctx, cohort_rows)  # {name: (n,)} float64
        opt_h = {k: hyp[k] for k in ("lr", "momentum", "wd") if k in hyp}
        clip, sigma = hyp.get("grad_norm", self.clip), hyp.get("dp_sigma", self.sigma)
        noise_scale = sigma * clip  # float, or (n,) float64 per row as the floats' product
        if isinstance(clip, torch.Tensor):
            clip = clip.float()[:, None]  # (n, 1) against the (n, L) norms
        if isinstance(noise_scale, torch.Tensor):
            noise_scale = noise_scale.float()[:, None]  # (n, 1)
        noisy_rows = bool((sigma > 0).any()) if isinstance(sigma, torch.Tensor) else sigma > 0
        mom = opt_h.get("momentum", self.cfg.momentum)
        state = make_client_optimizer(self.cfg.client_optimizer, self.cfg.lr, mom, self.cfg.wd).init(params)
        # host-side decisions: how many clients train at each step, how many columns each step
        # needs (no device sync)
        steps = [int(k) for k in b.active.sum(1)]  # (n,) descending
        sizes_cpu = b.mask.sum(2)  # (n, T) realised batch sizes
        width_cpu = (b.mask * torch.arange(1, b.max_batch + 1)).amax(2)  # (n, T) last included + 1
        pos, mask = b.pos.to(dev), b.mask.to(dev)
        divisor = None if b.divisor is None else b.divisor.to(dev)[:, None]  # (n, 1)
        gens = [noise_generator(ctx.seed, ctx.round, c, dev) for c in client_ids] if noisy_rows else []
        loss_sum = torch.zeros(n, device=dev)
        loss_steps = torch.zeros(n, device=dev)
        for t, a in enumerate(active_counts(steps)):  # clients [:a] take step t
            L_t = max(1, int(width_cpu[:a, t].max()))
            x, y = gather_batch(self.packed, index_rows[:a], pos[:a, t, :L_t], ctx, transforms, cohort_rows[:a], mask[:a, t, :L_t])  # (a, L, ...), (a, L)
            m = mask[:a, t, :L_t].to(x.dtype)  # (a, L)
            p_t = {k: v[:a] for k, v in params.items()}
            grads, sample_losses = self.per_sample_grads(p_t, x, y)  # {k: (a, L, *s)}, (a, L)
            summed, _ = clip_and_sum(grads, m, clip if not isinstance(clip, torch.Tensor) else clip[:a])  # {k: (a, *s)}
            if noisy_rows:  # per-client generators, drawn outside vmap, one draw per step taken
                noise = torch.stack([draw_noise(gens[i], D, dev) for i in range(a)])  # (a, D)
                scale = noise_scale if not isinstance(noise_scale, torch.Tensor) else noise_scale[:a]
                noisy = self.spec.flatten(summed, stacked=True) + scale * noise
                summed = self.spec.unflatten(noisy)
            div = divisor[:a] if divisor is not None else m.sum(1, keepdim=True).clamp(min=1.0)  # (a, 1)
            grads_t = {k: g / div.reshape(a, *([1] * (g.dim() - 1))) for k, g in summed.items()}
            self.opt.step_(p_t, grads_t, {k: v[:a] for k, v in state.items()}, {k: v[:a] for k, v in opt_h.items()} or None)
            nonempty = (sizes_cpu[:a, t] > 0).to(dev, loss_sum.dtype)  # (a,)
            loss_sum[:a] += (sample_losses * m).sum(1) / m.sum(1).clamp(min=1.0) * nonempty
            loss_steps[:a] += nonempty
        U = self.spec.flatten(params, stacked=True) - start_flat(self.spec, ctx, cohort_rows)
        return U, loss_sum / loss_steps.clamp(min=1.0)
