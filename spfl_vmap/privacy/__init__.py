"""Differential privacy: accounting (this package's ``accountant``), noise scales, the
``spfl privacy-epsilon`` command. Opacus is imported lazily, on the first epsilon computed."""

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

# Example-level DP-SGD (Abadi et al. 2016), vectorized over clients and samples.
from .dpsgd import (  # noqa: E402
    DPSGDTrainer,
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
    "DPSGDTrainer",
    "client_noise",
    "client_poisson_masks",
    "dpsgd_num_steps",
    "dpsgd_reference_client",
    "dpsgd_sample_rate",
    "poisson_batches",
    "sample_rates",
    "steps_per_client",
]
