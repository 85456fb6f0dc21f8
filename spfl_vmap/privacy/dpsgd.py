"""Example-level DP-SGD inside every client, vectorized over clients and samples.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", Algorithm 1), run by each
sampled client on its own data during local training:

1. **Poisson sampling.** At every step each of the client's ``n_k`` samples is included
   independently with probability ``q_k = min(1, B / n_k)``, so the batch size is random with
   mean ``B`` (the configured ``--batch_size``). A client takes ``ceil(n_k / B)`` steps per
   epoch (``= ceil(1 / q_k)``, the engine's own step count), ``epochs`` times that in all. The
   count is fixed in advance, so the accountant knows it: :meth:`DPSGDTrainer.steps_per_client`
   and :meth:`DPSGDTrainer.sample_rates` give what ``ClientAccountants.step`` needs.
   A step whose Poisson batch happens to be empty still runs (noise only): skipping it would
   reveal that the batch was empty.
2. **Per-sample gradients**, by ``vmap`` over samples of ``grad`` of the one-sample loss,
   nested inside the ``vmap`` over clients: ``(n, L, *shape)`` per parameter.
3. **Clipping** of each per-sample gradient to L2 norm ``C`` over all parameters jointly:
   ``g * min(1, C / (|g| + 1e-6))`` (Opacus' factor; the 1e-6 keeps ``|g| = 0`` finite).
4. **Noise.** The clipped gradients of the included samples are summed and
   ``N(0, sigma^2 C^2 I)`` is added, then the sum is divided by the *expected* batch size
   ``q_k n_k = min(B, n_k)``, not the realised one: with a fixed denominator one example moves
   the average by at most ``C / (q_k n_k)``, which is what the accountant assumes. The noise
   comes from a per-client generator seeded by ``(seed, "dpsgd-noise", round, client)``, one
   ``randn(D)`` per step, drawn outside vmap.
5. **Optimizer step** with the stacked SGD / Adam of ``engine/optim.py`` (weight decay and
   momentum act on the privatised gradient, as in Opacus).

Vectorized layout. The Poisson masks of a round are drawn on the host from per-client
generators seeded by ``(seed, "dpsgd", round, client)``, so a client's batches do not depend on
which other clients were sampled. They are compacted to positions ``pos [N, T, L_max]`` plus a
mask, with each step's included samples first; ``L_max`` is the largest realised batch in the
round (about ``B + 4 sqrt(B)``). A chunk of clients at step ``t`` processes only the first
``L_t = max`` realised batch size *of that chunk at that step* columns, so padding costs little.
Per-sample gradients cost ``n * L_t * P`` floats, so the client chunk is sized from ``P`` and
``L_max`` (:func:`dpsgd_auto_chunk`).

Deterministic batches (``poisson=False``). The trainer can instead consume the engine's regular
:class:`~spfl_vmap.engine.schedule.Schedule` (shuffled fixed-size batches, a partial last
batch, padded steps inactive) and divide by the *realised* batch size. With ``C = inf`` and
``sigma = 0`` this is exactly plain local training, which is how the tests pin the clipping and
averaging code to :class:`~spfl_vmap.engine.local.VmapTrainer`. Accounting such runs with the
Poisson accountant is the usual approximation (see ``privacy/accountant.py``).

:func:`dpsgd_reference_client` is the slow oracle: one client, one sample at a time, autograd on
an ``nn.Module`` and ``torch.optim``, fed the same masks and noise.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ..data.packing import PackedClients
from ..engine.local import LocalResult, VmapTrainer, activation_numel, available_memory
from ..engine.params import ParamSpec, Params
from ..engine.schedule import Schedule
from ..errors import ConfigError
from ..rng import generator

CLIP_EPS = 1e-6  # added to per-sample norms before dividing (Opacus' convention)


# --------------------------------------------------------------------------------------------
# Sampling: rates, step counts, masks, noise (pure functions of (seed, round, client))
# --------------------------------------------------------------------------------------------


def dpsgd_sample_rate(n_k: int, batch_size: int) -> float:
    """Poisson sampling rate ``q_k = min(1, B / n_k)`` of a client with ``n_k`` samples."""
    return min(1.0, batch_size / n_k)


def dpsgd_num_steps(n_k: int, batch_size: int, epochs: int) -> int:
    """Local DP-SGD steps of a client: ``epochs * ceil(n_k / B)`` (``ceil(1 / q_k)`` per epoch)."""
    return epochs * -(-n_k // batch_size)


def sample_rates(counts: Sequence[int], batch_size: int) -> list[float]:
    """Per-client Poisson rates ``q_k = min(1, B / n_k)`` (what ``ClientAccountants.step`` takes)."""
    return [dpsgd_sample_rate(int(n), batch_size) for n in counts]


def steps_per_client(counts: Sequence[int], batch_size: int, epochs: int) -> list[int]:
    """DP-SGD steps each client takes in one round: ``epochs * ceil(n_k / B)``."""
    return [dpsgd_num_steps(int(n), batch_size, epochs) for n in counts]


def client_poisson_masks(seed: int, round_idx: int, client_id: int, n_k: int, batch_size: int, epochs: int) -> torch.Tensor:
    """Poisson inclusion masks of one client for one round.

    Args:
        seed: Run seed.
        round_idx: Round number (1-based in the simulator).
        client_id: Global client id.
        n_k: The client's number of samples.
        batch_size: Expected batch size B.
        epochs: Local epochs.

    Returns:
        ``(T_k, n_k)`` bool, ``T_k = epochs * ceil(n_k / B)``: sample ``j`` is in the batch of
        step ``t``. Drawn from a generator seeded by ``(seed, "dpsgd", round, client)`` only.
    """
    q = dpsgd_sample_rate(n_k, batch_size)
    g = generator(seed, "dpsgd", round_idx, client_id)
    return torch.rand(dpsgd_num_steps(n_k, batch_size, epochs), n_k, generator=g) < q


def noise_generator(seed: int, round_idx: int, client_id: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one client's DP-SGD noise in one round."""
    return generator(seed, "dpsgd-noise", round_idx, client_id, device=device)


def draw_noise(g: torch.Generator, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One step's standard normal noise ``(D,)``; the trainer and :func:`client_noise` share it."""
    return torch.randn(dim, generator=g, device=device)


def client_noise(seed: int, round_idx: int, client_id: int, num_steps: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The standard normal noise of a client's first ``num_steps`` active steps, ``(num_steps, D)``."""
    g = noise_generator(seed, round_idx, client_id, device)
    if num_steps == 0:
        return torch.zeros(0, dim, device=device)
    return torch.stack([draw_noise(g, dim, device) for _ in range(num_steps)])


@dataclass
class DPBatches:
    """The batches of one round, for a cohort of ``N`` clients.

    ``pos``/``mask`` have the layout of :class:`Schedule`. ``active`` says which steps run
    (and draw noise); under Poisson sampling a step with an empty batch is still active.
    ``divisor`` is the per-client denominator of the summed gradient: the expected batch size
    ``(N,)``, or ``None`` for the realised batch size of each step.
    """

    pos: torch.Tensor  # (N, T, L) positions into each client's index row
    mask: torch.Tensor  # (N, T, L) bool: included sample
    active: torch.Tensor  # (N, T) bool: the client takes this step
    divisor: Optional[torch.Tensor]  # (N,) float expected batch sizes, or None (realised)

    @property
    def num_steps(self) -> int:
        return self.pos.shape[1]

    @property
    def max_batch(self) -> int:
        return self.pos.shape[2]

    def select(self, rows: slice) -> "DPBatches":
        div = None if self.divisor is None else self.divisor[rows]
        return DPBatches(self.pos[rows], self.mask[rows], self.active[rows], div)


def poisson_batches(client_ids: Sequence[int], counts: Sequence[int], batch_size: int, epochs: int, seed: int, round_idx: int) -> DPBatches:
    """Poisson-sampled batches of a cohort, compacted to ``[N, T, L_max]``.

    Args:
        client_ids: Global ids of the ``N`` sampled clients.
        counts: Their sample counts ``n_k``.
        batch_size: Expected batch size B.
        epochs: Local epochs.
        seed: Run seed.
        round_idx: Round number.

    Returns:
        :class:`DPBatches` with ``T = max_k T_k`` and ``L_max`` the largest realised batch
        (at least 1). Each step's included positions come first, in increasing order; steps
        ``t >= T_k`` are inactive; the divisor is ``q_k n_k = min(B, n_k)``.
    """
    incs = [client_poisson_masks(seed, round_idx, c, n, batch_size, epochs) for c, n in zip(client_ids, counts)]
    N = len(incs)
    T = max(inc.shape[0] for inc in incs)
    L = max(1, max(int(inc.sum(1).max()) for inc in incs))
    pos = torch.zeros(N, T, L, dtype=torch.long)
    mask = torch.zeros(N, T, L, dtype=torch.bool)
    active = torch.zeros(N, T, dtype=torch.bool)
    for i, inc in enumerate(incs):
        T_k, n_k = inc.shape
        w = min(n_k, L)
        order = torch.argsort((~inc).to(torch.int8), dim=1, stable=True)  # (T_k, n_k) included first
        pos[i, :T_k, :w] = order[:, :w]
        mask[i, :T_k] = torch.arange(L)[None, :] < inc.sum(1, keepdim=True)
        active[i, :T_k] = True
    divisor = torch.tensor([dpsgd_sample_rate(n, batch_size) * n for n in counts], dtype=torch.float32)
    return DPBatches(pos, mask, active, divisor)


def schedule_batches(sched: Schedule) -> DPBatches:
    """The engine's deterministic schedule as :class:`DPBatches`, divided by the realised size."""
    return DPBatches(sched.pos, sched.mask, sched.active, None)


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


def per_sample_norms(grads: Params) -> torch.Tensor:
    """L2 norms over all parameters jointly of per-sample gradients ``{k: (..., L, *shape)}``.

    Args:
        grads: Per-sample gradients; every entry has the same leading dims ``lead`` and the
            parameter's shape after them. ``lead`` is ``(n, L)`` here (clients, samples).

    Returns:
        ``lead``-shaped norms.
    """
    lead = 2
    sq = sum(g.flatten(lead).pow(2).sum(lead) for g in grads.values())
    return sq.sqrt()


def clip_factors(norms: torch.Tensor, clip: float | torch.Tensor) -> torch.Tensor:
    """Per-sample clip factors ``min(1, C / (|g| + 1e-6))`` (Abadi et al. 2016, Alg. 1; Opacus).

    ``C = inf`` gives exactly 1, so clipping is then the identity.
    """
    return (clip / (norms + CLIP_EPS)).clamp(max=1.0)


def clip_and_sum(grads: Params, weights: torch.Tensor, clip: float | torch.Tensor) -> tuple[Params, torch.Tensor]:
    """Clip per-sample gradients to norm ``C`` and sum them with ``weights``.

    Args:
        grads: ``{k: (n, L, *shape)}`` per-sample gradients.
        weights: ``(n, L)`` float, 1 for included samples and 0 for padding.
        clip: Clip norm C (float or broadcasting tensor; may be inf).

    Returns:
        ``({k: (n, *shape)}`` sums of the clipped gradients, ``(n, L)`` per-sample norms).
    """
    norms = per_sample_norms(grads)  # (n, L)
    f = clip_factors(norms, clip) * weights  # (n, L)
    return {k: torch.einsum("nl,nl...->n...", f, g) for k, g in grads.items()}, norms


# --------------------------------------------------------------------------------------------
# The vectorized trainer
# --------------------------------------------------------------------------------------------


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


class DPSGDTrainer(VmapTrainer):
    """Example-level DP-SGD (Abadi et al. 2016) in every client, all clients at once.

    Same contract as :class:`VmapTrainer`: ``train(global_params, client_ids, sched)`` returns the
    ``[N, D]`` update matrix. Reads from ``cfg``, besides what ``VmapTrainer`` reads
    (``client_optimizer, lr, momentum, wd, strategy, client_chunk, batch_size,
    client_num_per_round``): ``grad_norm`` (clip C, may be inf when ``dp_sigma`` is 0),
    ``dp_sigma`` (noise multiplier), ``epochs`` and ``seed``.

    Args:
        model: The global model's module (used functionally; its weights are not touched).
        spec: Parameter layout.
        packed: Client data packed once.
        cfg: Run config.
        device: Where training runs.
        poisson: Poisson-sample each step's batch and divide by the expected batch size (DP-SGD
            proper). ``False`` trains on the ``sched`` passed to :meth:`train` and divides by the
            realised batch size (see the module docstring).
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, packed: PackedClients, cfg, device: torch.device, poisson: bool = True) -> None:
        if getattr(cfg, "use_gradient", False):
            raise ConfigError("DP-SGD trains locally; it cannot be combined with --use_gradient")
        super().__init__(model, spec, packed, cfg, device)
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
        self.batch_size, self.epochs, self.seed = cfg.batch_size, cfg.epochs, cfg.seed
        self._opt_slots = {"sgd": 1 if cfg.momentum else 0, "adam": 2}[cfg.client_optimizer]
        self._rounds_seen = 0
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
    def train(
        self,
        global_params: Params,
        client_ids: list[int],
        sched: Optional[Schedule] = None,
        poisoned: Optional[torch.Tensor] = None,
        round_idx: Optional[int] = None,
    ) -> LocalResult:
        """Run DP-SGD local training for ``client_ids``; returns the ``[N, D]`` update matrix.

        Args:
            global_params: ``{k: (*shape)}`` global model.
            client_ids: The ``N`` sampled clients.
            sched: The engine's schedule; used only with ``poisson=False``.
            poisoned: ``(N,)`` bool, clients that train on ``self.label_poison(y)`` (as in
                :meth:`VmapTrainer.train`).
            round_idx: Round number seeding the Poisson masks and the noise. The simulator
                should pass it: a resumed run then stays bit-identical, where the fallback
                (``None``: count the calls to ``train`` from 1) restarts at round 1 and would
                reuse that round's noise.

        Returns:
            :class:`LocalResult` with ``U (N, D)`` and the mean loss over each client's steps.
        """
        self._rounds_seen += 1
        r = self._rounds_seen if round_idx is None else int(round_idx)
        N = len(client_ids)
        if self.poisson:
            counts = [int(c) for c in self.packed.counts[torch.tensor(client_ids, device=self.packed.counts.device)].tolist()]
            batches = poisson_batches(client_ids, counts, self.batch_size, self.epochs, self.seed, r)
        else:
            if sched is None:
                raise ValueError("poisson=False trains on the schedule passed to train(); got None")
            batches = schedule_batches(sched)
        if self.strategy == "dpsgd-loop":
            self.chunk = 1
        elif self.cfg.client_chunk:
            self.chunk = self.cfg.client_chunk
        else:
            self.chunk = dpsgd_auto_chunk(self.model, tuple(self.packed.x.shape[1:]), batches.max_batch, self._opt_slots, self.device, N)
        U = torch.empty(N, self.spec.dim, device=self.device)
        losses = torch.empty(N, device=self.device)
        for lo in range(0, N, self.chunk):
            hi = min(N, lo + self.chunk)
            # label poisoning goes through VmapTrainer._batch, which reads self._poison
            self._poison = None if poisoned is None or not bool(poisoned[lo:hi].any()) else poisoned[lo:hi].to(self.device)
            U[lo:hi], losses[lo:hi] = self._dp_chunk(global_params, client_ids[lo:hi], batches.select(slice(lo, hi)), r)
        self._poison = None
        return LocalResult(U, losses, self.strategy, self.chunk)

    def _dp_chunk(self, global_params: Params, client_ids: list[int], b: DPBatches, round_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, D, dev = len(client_ids), self.spec.dim, self.device
        ids = torch.tensor(client_ids, device=dev)
        rows = self.packed.index[ids]  # (n, n_max)
        params = {k: v.expand(n, *v.shape).clone() for k, v in global_params.items()}  # broadcast
        state = self.opt.init(params)
        # host-side decisions: which steps run, how many columns each step needs (no device sync)
        active_cpu = b.active
        sizes_cpu = b.mask.sum(2)  # (n, T) realised batch sizes
        width_cpu = (b.mask * torch.arange(1, b.max_batch + 1)).amax(2)  # (n, T) last included + 1
        pos, mask, active = b.pos.to(dev), b.mask.to(dev), b.active.to(dev)
        divisor = None if b.divisor is None else b.divisor.to(dev)[:, None]  # (n, 1)
        gens = [noise_generator(self.seed, round_idx, c, dev) for c in client_ids] if self.sigma > 0 else []
        noise = torch.zeros(n, D, device=dev)
        loss_sum = torch.zeros(n, device=dev)
        loss_steps = torch.zeros(n, device=dev)
        for t in range(b.num_steps):
            act_t = active_cpu[:, t]
            if not bool(act_t.any()):
                continue
            L_t = max(1, int(width_cpu[:, t].max()))
            x, y = self._batch(rows, pos[:, t, :L_t])  # (n, L, ...), (n, L)
            m = mask[:, t, :L_t].to(x.dtype)  # (n, L)
            grads, sample_losses = self.per_sample_grads(params, x, y)  # {k: (n, L, *s)}, (n, L)
            summed, _ = clip_and_sum(grads, m, self.clip)  # {k: (n, *s)}
            if self.sigma > 0:
                for i in range(n):  # per-client generators, drawn outside vmap, active steps only
                    if act_t[i]:
                        noise[i] = draw_noise(gens[i], D, dev)
                noisy = self.spec.flatten(summed, stacked=True) + (self.sigma * self.clip) * noise  # (n, D)
                summed = self.spec.unflatten(noisy)
            div = divisor if divisor is not None else m.sum(1, keepdim=True).clamp(min=1.0)  # (n, 1)
            grads_t = {k: g / div.reshape(n, *([1] * (g.dim() - 1))) for k, g in summed.items()}
            params, state = self.opt.step(params, grads_t, state, active[:, t])
            nonempty = (sizes_cpu[:, t] > 0).to(dev, loss_sum.dtype)  # (n,)
            loss_sum += (sample_losses * m).sum(1) / m.sum(1).clamp(min=1.0) * nonempty
            loss_steps += nonempty
        U = self.spec.flatten(params, stacked=True) - self.spec.flatten(global_params)[None]
        return U, loss_sum / loss_steps.clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# The slow reference
# --------------------------------------------------------------------------------------------


def dpsgd_reference_client(
    model: nn.Module,
    global_params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    include: torch.Tensor,
    noise: torch.Tensor,
    clip: float,
    noise_multiplier: float,
    divisor: float,
    client_optimizer: str,
    lr: float,
    momentum: float = 0.0,
    wd: float = 0.0,
) -> tuple[torch.Tensor, float]:
    """DP-SGD for one client, one sample at a time (Abadi et al. 2016, Algorithm 1).

    The oracle of the tests: an ``nn.Module``, autograd per sample (microbatches of 1), explicit
    clipping, noise and ``torch.optim``. Every row of ``include`` is a step, empty ones included.

    Args:
        model: Module of the right architecture (copied; not modified).
        global_params: ``{k: (*shape)}`` starting weights.
        x: ``(n_k, *input)`` the client's samples, in index-row order.
        y: ``(n_k,)`` labels.
        include: ``(T, n_k)`` bool Poisson masks (:func:`client_poisson_masks`).
        noise: ``(T, D)`` standard normal noise (:func:`client_noise`); ignored if sigma is 0.
        clip: Per-sample clip norm C.
        noise_multiplier: sigma.
        divisor: Expected batch size ``q_k n_k``.
        client_optimizer: ``"sgd"`` or ``"adam"``.
        lr: Learning rate.
        momentum: SGD momentum.
        wd: Weight decay.

    Returns:
        ``(update (D,) = trained - global, mean loss over the non-empty steps)``.
    """
    model = copy.deepcopy(model)
    params = list(model.parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(global_params[name])
    w0 = torch.cat([p.detach().reshape(-1) for p in params])
    if client_optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
    else:
        opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
    total, nonempty = 0.0, 0
    for t in range(include.shape[0]):
        acc = torch.zeros_like(w0)
        idx = include[t].nonzero().flatten().tolist()
        step_loss = 0.0
        for j in idx:
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[j : j + 1]), y[j : j + 1])
            loss.backward()
            g = torch.cat([p.grad.reshape(-1) for p in params])
            acc += g * min(1.0, clip / (float(g.norm()) + CLIP_EPS))
            step_loss += float(loss.detach())
        if idx:
            total += step_loss / len(idx)
            nonempty += 1
        if noise_multiplier > 0:
            acc = acc + noise_multiplier * clip * noise[t]
        g = acc / divisor
        off = 0
        for p in params:
            p.grad = g[off : off + p.numel()].reshape(p.shape).clone()
            off += p.numel()
        opt.step()
    w = torch.cat([p.detach().reshape(-1) for p in params])
    return w - w0, total / max(nonempty, 1)
