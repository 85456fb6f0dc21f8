"""Differential privacy maths (the pure layer): accounting, noise scales, DP-SGD sampling and
clipping. Opacus is imported lazily, on the first epsilon computed. The round stages that use
these are in ``spfl_vmap.modules.privacy``."""

from .accountant import (
    ACCOUNTANTS,
    BudgetExceeded,
    ClientAccountants,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    check_budget,
    check_delta,
    compute_epsilon,
    default_delta,
    epsilon_from_history,
    would_exceed,
)
from .noise import (
    adaptive_clip_noise_multiplier,
    adaptive_clip_update,
    dp_fedavg_noise_std,
    dp_sgd_noise_std,
)

__all__ = [
    "ACCOUNTANTS",
    "BudgetExceeded",
    "ClientAccountants",
    "PrivacyAccountant",
    "adaptive_clip_noise_multiplier",
    "adaptive_clip_update",
    "calibrate_noise_multiplier",
    "check_budget",
    "check_delta",
    "compute_epsilon",
    "default_delta",
    "dp_fedavg_noise_std",
    "dp_sgd_noise_std",
    "epsilon_from_history",
    "would_exceed",
]

# Example-level DP-SGD maths (Abadi et al. 2016); the trainer is spfl_vmap.modules.dpsgd.
from .dpsgd import (  # noqa: E402
    client_noise,
    client_poisson_masks,
    dpsgd_num_steps,
    dpsgd_reference_client,
    dpsgd_sample_rate,
    poisson_batches,
    sample_rates,
    steps_per_client,
)

__all__ += [
    "client_noise",
    "client_poisson_masks",
    "dpsgd_num_steps",
    "dpsgd_reference_client",
    "dpsgd_sample_rate",
    "poisson_batches",
    "sample_rates",
    "steps_per_client",
]
