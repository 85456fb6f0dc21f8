"""CRFL's maths: the global-model clip, parameter smoothing's vote bounds and the certified radius.

Xie, Chen, Chen & Li, "CRFL: Certifiably Robust Federated Learning against Backdoor Attacks",
ICML 2021 (code: github.com/AI-secure/CRFL).

Training (the paper's Algorithm 1; ``spfl_vmap.modules.crfl.CRFLClipNoise``): after round ``t``'s
aggregation the server clips the whole global model to L2 norm ``rho_t`` and adds
``N(0, sigma_t^2 I)`` to it::

    w_t = clip(w_{t-1} + aggregate_t, rho_t) + eps_t,     clip(w, rho) = w / max(1, ||w|| / rho)

Certification (parameter smoothing): ``M`` copies of the final clipped model ``w_T``, each with
fresh noise ``N(0, sigma_T^2 I)``, vote on a test point. With ``p_A`` a lower confidence bound of
the top class's probability and ``p_B`` an upper bound of the runner-up's, the smoothed
prediction is the same for the model trained on clean data and for one trained with a backdoor
pattern ``delta`` of norm ``||delta|| < RAD`` in the attackers' poisoned samples, where

    RAD^2 = -ln(1 - (sqrt(p_A) - sqrt(p_B))^2) * sigma_adv^2
            / (2 R sum_i p_i^2 * gamma^2 tau^2 eta^2 L_z^2 (q_B / n_B)^2 * prod_{t=t_adv+1}^{T} (2 Phi(rho_t / sigma_t) - 1))

* ``-ln(1 - (sqrt(p_A) - sqrt(p_B))^2)``: the KL budget under which two distributions give the
  same top class (a Hellinger-distance argument; :func:`hellinger_budget`);
* ``R`` attackers with aggregation weights ``p_i``, scale factor ``gamma`` (model replacement),
  ``tau`` local steps at client learning rate ``eta``, a loss whose gradient is ``L_z``-Lipschitz
  in the input, and a poisoned fraction ``q_B / n_B`` of each batch, attack at round ``t_adv``;
* ``sigma_adv``: the training noise of the attack round, ``sigma_t``: the training noise of the
  rounds after it and, at ``t = T``, the smoothing noise; each clip-and-noise round contracts the
  divergence by ``2 Phi(rho_t / sigma_t) - 1 = erf(rho_t / (sqrt(2) sigma_t))`` (:func:`contraction`).

This is the bound the authors compute (``certify_mnist.py``, ``cal_prob_bound``), term for term.
The analysis is for one attack round and for a convex model whose loss gradient is Lipschitz in
the input; their experiments use logistic regression, with ``L_z = sqrt(2 + 2 rho + rho^2)``
(:func:`crfl_lipschitz`). The authors bound ``p_A`` and ``p_B`` with Hoeffding's inequality; here
they are one-sided Clopper-Pearson bounds at ``alpha / 2`` each, so both hold together with
probability ``1 - alpha`` (:func:`smoothing_bounds`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

Counts = Union[int, torch.Tensor]


# ---- training ----------------------------------------------------------------------------------
def clip_model(w: torch.Tensor, rho: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole model clipped to L2 norm ``rho`` (the authors' ``clip_weight_norm``).

    Args:
        w: ``(D,)`` flattened parameters (every tensor of the model, biases included).
        rho: Clip norm, ``> 0``.

    Returns:
        ``(w / max(1, ||w|| / rho)  (D,), ||w||  ()``): the norm is taken in float32 or wider.
    """
    norm = w.double().norm() if w.dtype == torch.float64 else w.float().norm()
    factor = rho / torch.clamp(norm, min=rho)  # min(1, rho / ||w||); no division by zero
    return (w * factor.to(w.dtype)), norm


def rho_at(t: int, rho: float, rho_init: Optional[float] = None, rho_step: float = 0.0) -> float:
    """The clip norm of round ``t`` (1-based).

    Constant ``rho``, or CRFL's growing schedule ``min(rho, rho_init + rho_step * t)`` (the
    authors' ``main.py``: MNIST ``2 + 0.1 t`` capped at ``param_clip_thres`` 15, EMNIST
    ``4 + 0.25 t``, LOAN ``2 + 0.025 t``): the norm of a model that is still learning grows.
    """
    if rho_init is None:
        return rho
    return min(rho, rho_init + rho_step * t)


# ---- certification -----------------------------------------------------------------------------
def top_two(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``counts (n, C)`` votes -> ``(top class (n,), its votes (n,), the runner-up's votes (n,))``.

    Ties go to the lowest class index (``argmax``); a tie for the top leaves ``k_A == k_B``, which
    certifies nothing.
    """
    top = counts.argmax(dim=1)  # (n,) first maximum
    ranked = counts.sort(dim=1, descending=True).values  # (n, C)
    return top, ranked[:, 0], ranked[:, 1]


def clopper_pearson(k: Counts, n: Counts, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided Clopper-Pearson bounds of a binomial proportion, each at level ``1 - alpha``.

    Clopper & Pearson (1934): with ``k`` successes in ``n`` trials, the lower bound is the
    ``alpha`` quantile of ``Beta(k, n - k + 1)`` (``0`` when ``k = 0``) and the upper bound the
    ``1 - alpha`` quantile of ``Beta(k + 1, n - k)`` (``1`` when ``k = n``).

    Args:
        k: Successes, an int or an integer tensor ``(n_points,)``.
        n: Trials (same shape, or an int).
        alpha: One-sided error level, in ``(0, 1)``.

    Returns:
        ``(lower, upper)`` float64 tensors of ``k``'s shape.
    """
    from scipy.special import betaincinv

    k_t = torch.as_tensor(k, dtype=torch.float64).cpu()
    n_t = torch.broadcast_to(torch.as_tensor(n, dtype=torch.float64).cpu(), k_t.shape)
    kn, nn_ = k_t.numpy(), n_t.numpy()
    # betaincinv(a, b, y) is the y quantile of Beta(a, b); the where() keeps a, b > 0 in the unused branch
    lower = torch.from_numpy(betaincinv(torch.clamp(k_t, min=1).numpy(), nn_ - kn + 1, alpha))
    upper = torch.from_numpy(betaincinv(kn + 1, torch.clamp(n_t - k_t, min=1).numpy(), 1 - alpha))
    lower = torch.where(k_t == 0, torch.zeros_like(lower), lower)
    upper = torch.where(k_t == n_t, torch.ones_like(upper), upper)
    return lower, upper


def smoothing_bounds(counts: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The smoothed prediction and its vote bounds, valid together with probability ``1 - alpha``.

    Args:
        counts: ``(n, C)`` votes of ``M`` noisy models (every row sums to ``M``).
        alpha: Error level of the pair of bounds.

    Returns:
        ``(prediction (n,), p_A lower bound (n,), p_B upper bound (n,))``: one-sided Clopper-Pearson
        bounds at ``alpha / 2`` each (Bonferroni), and ``p_B <= 1 - p_A`` (the two classes' votes
        are disjoint), float64.
    """
    pred, k_a, k_b = top_two(counts)
    m = counts.sum(dim=1)  # (n,) = M
    p_a, _ = clopper_pearson(k_a, m, alpha / 2)
    _, p_b = clopper_pearson(k_b, m, alpha / 2)
    return pred, p_a, torch.minimum(p_b, 1 - p_a)


def hellinger_budget(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """``-ln(1 - (sqrt(p_A) - sqrt(p_B))^2)``: the KL divergence between the smoothed models of the
    clean and the backdoored training under which the top class cannot change (CRFL's robustness
    condition; zero or meaningless when ``p_A <= p_B``)."""
    p_a, p_b = torch.as_tensor(p_a, dtype=torch.float64), torch.as_tensor(p_b, dtype=torch.float64)
    gap = torch.sqrt(p_a) - torch.sqrt(p_b)
    return -torch.log1p(-gap * gap)


def contraction(rhos: Sequence[float], sigmas: Sequence[float]) -> float:
    """``prod_t (2 Phi(rho_t / sigma_t) - 1)``: how much the rounds after the attack, each a clip to
    ``rho_t`` and Gaussian noise ``sigma_t``, shrink the divergence between the two trainings
    (``2 Phi(x) - 1 = erf(x / sqrt(2))``; a round without noise does not contract: factor 1)."""
    if len(rhos) != len(sigmas):
        raise ValueError(f"one sigma per rho: got {len(rhos)} rhos and {len(sigmas)} sigmas")
    out = 1.0
    for rho, sigma in zip(rhos, sigmas):
        out *= math.erf(rho / (math.sqrt(2.0) * sigma)) if sigma > 0 else 1.0
    return out


def crfl_lipschitz(rho: float) -> float:
    """``L_z = sqrt(2 + 2 rho + rho^2)``: the authors' Lipschitz constant of the loss gradient in
    the input for their logistic-regression models with weights of norm ``rho`` at the attack
    round (``certify_mnist.py``)."""
    return math.sqrt(2.0 + 2.0 * rho + rho * rho)


def certified_radius(
    p_a: torch.Tensor,
    p_b: torch.Tensor,
    *,
    sigma_adv: float,
    contraction_factor: float,
    weights: Sequence[float],
    gamma: float,
    tau: float,
    lr: float,
    lipschitz: float,
    poison_ratio: float,
) -> torch.Tensor:
    """CRFL's certified radius of the backdoor pattern's L2 norm, per test point.

    Args:
        p_a: ``(n,)`` lower bounds of the top class's probability under parameter smoothing.
        p_b: ``(n,)`` upper bounds of the runner-up's.
        sigma_adv: Training noise of the attack round ``t_adv``.
        contraction_factor: :func:`contraction` of rounds ``t_adv + 1 .. T`` (``T``: smoothing noise).
        weights: ``(R,)`` the attackers' aggregation weights ``p_i``.
        gamma: The attackers' scale factor (model replacement; 1 without).
        tau: Local steps of an attacker in the attack round.
        lr: Client learning rate ``eta``.
        lipschitz: ``L_z``.
        poison_ratio: Poisoned fraction of each attacker batch ``q_B / n_B``.

    Returns:
        ``(n,)`` float64 radii: ``nan`` where ``p_A <= p_B`` (no certificate; the smoothed model
        abstains), ``inf`` where the attack has no influence (a zero denominator).
    """
    p_a, p_b = torch.as_tensor(p_a, dtype=torch.float64), torch.as_tensor(p_b, dtype=torch.float64)
    R = len(weights)
    spread = R * sum(p * p for p in weights) * (gamma * tau * lr * lipschitz * poison_ratio) ** 2
    denom = 2.0 * spread * contraction_factor
    budget = hellinger_budget(p_a, p_b) * sigma_adv**2
    rad = torch.sqrt(budget / denom) if denom > 0 else torch.full_like(budget, math.inf)
    return torch.where(p_a > p_b, rad, torch.full_like(rad, math.nan))


def certified_accuracy(radius: torch.Tensor, radii: Sequence[float], correct: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of test points whose smoothed prediction is certified at each radius (and correct).

    Args:
        radius: ``(n,)`` certified radii (``nan``: abstained).
        radii: ``(r,)`` radii to report.
        correct: ``(n,)`` bool, the smoothed prediction is right; ``None`` gives the certified rate.

    Returns:
        ``(r,)`` float64: ``mean(radius >= r and correct)`` over the ``n`` points.
    """
    r = torch.as_tensor(list(radii), dtype=torch.float64)[:, None]  # (r, 1)
    ok = torch.as_tensor(radius, dtype=torch.float64)[None, :] >= r  # (r, n); nan compares False
    if correct is not None:
        ok = ok & torch.as_tensor(correct, dtype=torch.bool)[None, :]
    return ok.double().mean(dim=1) if ok.shape[1] else torch.full((ok.shape[0],), math.nan, dtype=torch.float64)


__all__ = ["certified_accuracy", "certified_radius", "clip_model", "clopper_pearson", "contraction", "crfl_lipschitz",
           "hellinger_budget", "rho_at", "smoothing_bounds", "top_two"]
