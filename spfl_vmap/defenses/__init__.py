"""Certified defenses (the pure layer): the maths, no engine, config or module code.

* :mod:`spfl_vmap.defenses.crfl`: CRFL (Xie, Chen, Chen & Li, "CRFL: Certifiably Robust
  Federated Learning against Backdoor Attacks", ICML 2021): the global-model clip, the parameter
  smoothing vote's confidence bounds and the certified radius. The round stage that uses them is
  ``spfl_vmap.modules.crfl``; ``spfl certify`` (``spfl_vmap.experiments.certify``) certifies a run.
"""

from .crfl import (
    certified_accuracy,
    certified_radius,
    clip_model,
    clopper_pearson,
    contraction,
    crfl_lipschitz,
    hellinger_budget,
    rho_at,
    smoothing_bounds,
    top_two,
)

__all__ = [
    "certified_accuracy",
    "certified_radius",
    "clip_model",
    "clopper_pearson",
    "contraction",
    "crfl_lipschitz",
    "hellinger_budget",
    "rho_at",
    "smoothing_bounds",
    "top_two",
]
