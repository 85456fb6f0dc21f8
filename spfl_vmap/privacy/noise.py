"""Noise scales of DP-SGD and DP-FedAvg, and the adaptive clipping update.

Pure arithmetic that works on Python floats and on broadcasting tensors alike, so a sweep can pass
a tensor of noise multipliers or clip norms with a leading configuration dimension.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, TypeVar

from ..errors import ConfigError

Num = TypeVar("Num")  # float, or a torch.Tensor that broadcasts


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    # Only Python/numpy scalars are checked: reading a tensor's values would force a device sync.
    if isinstance(value, numbers.Real):
        ok = value >= 0 if allow_zero else value > 0
        if not (ok and math.isfinite(value)):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{name} must be finite and {bound}, got {value!r}")


def dp_sgd_noise_std(noise_multiplier: Num, clip: Num, expected_batch: Num) -> Num:
    """Std of the noise on a DP-SGD averaged gradient.

    DP-SGD (Abadi et al. 2016, Algorithm 1) clips each per-example gradient to L2 norm ``C``,
    sums the lot, adds ``N(0, sigma^2 C^2 I)`` and divides by the expected batch size ``L = qn``
    (a fixed denominator, so one example's influence on the average stays bounded by ``C/L``).
    The noise on the averaged gradient therefore has std ``sigma * C / L``.

    Args:
        noise_multiplier: sigma, the noise std in units of the clip norm; float or tensor.
        clip: Per-example clip norm C; float or tensor.
        expected_batch: Expected batch size L = q * n (the batch size for fixed-size batches).

    Returns:
        ``noise_multiplier * clip / expected_batch``, per coordinate of the averaged gradient.
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip", clip)
    _check_positive("expected_batch", expected_batch)
    return noise_multiplier * clip / expected_batch


def dp_fedavg_noise_std(noise_multiplier: Num, clip: Num, expected_cohort: Num) -> Num:
    """Std of the noise on a DP-FedAvg averaged update (user-level DP).

    DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent Language Models",
    Algorithm 1 with the fixed-denominator estimator and uniform weights) clips each client's
    update to L2 norm ``S``, sums the sampled clients' updates, adds ``N(0, z^2 S^2 I)`` and
    divides by the expected cohort size ``qW``. The noise on the averaged update has std
    ``z * S / (qW)``.

    Args:
        noise_multiplier: z, the noise std in units of the clip norm; float or tensor.
        clip: Per-client update clip norm S; float or tensor.
        expected_cohort: Expected number of clients per round, q times the client count.

    Returns:
        ``noise_multiplier * clip / expected_cohort``, per coordinate of the averaged update.
    """
    _check_positive("noise_multiplier", noise_multiplier, allow_zero=True)
    _check_positive("clip", clip)
    _check_positive("expected_cohort", expected_cohort)
    return noise_multiplier * clip / expected_cohort


def adaptive_clip_update(
    clip: Num, frac_unclipped_noisy: Num, target_quantile: Num, lr: Num
) -> Num:
    """One geometric step of adaptive clipping towards a quantile of the update norms.

    Andrew, Thakkar, McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive
    Clipping" (NeurIPS), Algorithm 1: ``C <- C * exp(-lr * (b - gamma))``, where ``b`` is the
    (noised) fraction of clients whose update norm was at most ``C`` and ``gamma`` the target
    quantile. When more than ``gamma`` of the updates fit, the clip shrinks, and vice versa.

    Args:
        clip: Current clip norm C > 0; float or tensor.
        frac_unclipped_noisy: ``b~ = (sum_i 1[|u_i| <= C] + N(0, sigma_b^2)) / expected_cohort``;
            may fall outside [0, 1] because of the noise.
        target_quantile: gamma in [0, 1], e.g. 0.5 for the median norm.
        lr: Geometric learning rate eta_C >= 0 (0.2 in the paper).

    Returns:
        The new clip norm, same type as the inputs.
    """
    _check_positive("clip", clip)
    _check_positive("lr", lr, allow_zero=True)
    if isinstance(target_quantile, numbers.Real) and not 0.0 <= target_quantile <= 1.0:
        raise ConfigError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    exponent = -lr * (frac_unclipped_noisy - target_quantile)
    if isinstance(exponent, numbers.Real):
        return clip * math.exp(exponent)
    return clip * exponent.exp()  # tensor (torch or numpy-like with .exp())


def adaptive_clip_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the updates when adaptive clipping also spends privacy.

    Andrew et al. 2021, Theorem 1: releasing the noised unclipped count with std ``sigma_b``
    together with updates noised at ``z_delta`` is as private as one Gaussian mechanism with
    multiplier ``z`` when ``z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``. Account with ``z``.

    Args:
        noise_multiplier: z, the total noise multiplier the accountant uses, > 0.
        count_noise_std: sigma_b, std of the noise on the unclipped count; must exceed z / 2.

    Returns:
        z_delta, the noise multiplier to apply to the clipped updates.

    Raises:
        ConfigError: ``count_noise_std <= noise_multiplier / 2`` leaves no budget for updates.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("count_noise_std", count_noise_std)
    rest = noise_multiplier**-2 - (2.0 * count_noise_std) ** -2
    if rest <= 0:
        raise ConfigError(
            f"count_noise_std={count_noise_std:g} must exceed noise_multiplier/2="
            f"{noise_multiplier / 2:g} for adaptive clipping"
        )
    return rest**-0.5
