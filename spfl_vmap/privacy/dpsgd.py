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
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rng import generator

Params = dict[str, torch.Tensor]

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


def schedule_batches(sched: Any) -> DPBatches:
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
