"""Defenses (the pure layer): the maths, no engine, config or module code.

* :mod:`spfl_vmap.defenses.crfl`: CRFL (Xie, Chen, Chen & Li, "CRFL: Certifiably Robust
  Federated Learning against Backdoor Attacks", ICML 2021): the global-model clip, the parameter
  smoothing vote's confidence bounds and the certified radius. The round stage that uses them is
  ``spfl_vmap.modules.crfl``; ``spfl certify`` (``spfl_vmap.experiments.certify``) certifies a run.
* :mod:`spfl_vmap.defenses.ats`: ATS (Gao et al., CVPR 2021): the 50 image-transformation
  sub-policies as batched tensor ops, the toolkit's policy lists and :func:`~spfl_vmap.defenses.ats.apply_policy`.
* :mod:`spfl_vmap.defenses.pruning`: gradient pruning (Zhu et al., "Deep Leakage from Gradients",
  NeurIPS 2019), per layer and per client over ``U (N, D)``.
* :mod:`spfl_vmap.defenses.ats_search`: ATS's policy search scores (S_pri, S_acc), batched over
  candidate policies, and the ranked policy CSV (``spfl ats-search``).
* :mod:`spfl_vmap.defenses.soteria`: Soteria (Sun et al., CVPR 2021), pruning the last layer's
  gradient columns of the representation features that leak the most.

The stages that use ATS, pruning and Soteria are in ``spfl_vmap.modules.inference``.
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
