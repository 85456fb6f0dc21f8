"""Byzantine attacks on the update matrix ``U [N, D]``.

Every attack is registered in :data:`ATTACKS` and is a pure function (see
:mod:`spfl_vmap.attacks.byzantine` for the full signature)::

    fn(U, malicious, *, weights=None, generator=None, knowledge="omniscient", f=0,
       aggregator="mean", **own_hyperparameters) -> (U_attacked [N, D], metrics dict)

- ``malicious``: ``[N]`` bool mask of the Byzantine clients among the sampled ones.
- ``knowledge``: ``omniscient`` (statistics from all benign rows; the original toolkit's
  ``--all_grads``) or ``partial`` (only the malicious clients' own honest rows, ``U[malicious]``
  before rewriting).
- ``f``: the Byzantine count the attacker plans for (``0`` = number of malicious rows).
- ``aggregator``: the defended rule's registry name (``fang`` picks its variant from it).
- ``generator``: the only source of randomness (``None`` = fixed seed 0).

The result is a new tensor: benign rows are unchanged and the input is never modified.

Registered names: ``none``, ``gaussian``, ``sign_flip``, ``label_flip``, ``alie``, ``ipm``,
``min_max``, ``min_sum``, ``fang``, ``nan``, ``inf``.

Data poisoning: ``label_flip`` leaves ``U`` unchanged; its function attribute ``data_poison``
(:func:`flip_labels`, ``y -> num_classes - 1 - y``) is what the engine applies to the malicious
clients' labels during local training (round step 4). :func:`data_poison` returns that function
for any attack name (``None`` for pure model-poisoning attacks). Engine use, at round step 6::

    poison = data_poison(cfg.attack)          # before local training; None for most attacks
    U, m = attack(cfg.attack, U, malicious, weights=counts, generator=gen, f=cfg.f,
                  knowledge=cfg.knowledge, aggregator=cfg.aggregator, **cfg.attack_kwargs)

:func:`attack` passes only the keyword arguments the attack accepts.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..aggregators import accepted_kwargs
from ._base import ATTACKS, KNOWLEDGE
from .byzantine import (
    alie,
    alie_z,
    fang,
    flip_labels,
    gaussian,
    inf,
    ipm,
    label_flip,
    max_feasible,
    min_max,
    min_sum,
    nan,
    none,
    sign_flip,
)

__all__ = [
    "ATTACKS",
    "KNOWLEDGE",
    "alie",
    "alie_z",
    "attack",
    "data_poison",
    "fang",
    "flip_labels",
    "gaussian",
    "inf",
    "ipm",
    "label_flip",
    "max_feasible",
    "min_max",
    "min_sum",
    "nan",
    "none",
    "sign_flip",
]


def attack(name: str, U: torch.Tensor, malicious: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
    """Run the registered attack ``name``, passing only the keyword arguments it accepts.

    Args:
        name: registry name (see :data:`ATTACKS`).
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        **kwargs: ``weights``, ``generator``, ``knowledge``, ``f``, ``aggregator`` and the
            attack's hyperparameters; keys it does not accept are dropped.

    Returns:
        ``([N, D] attacked U, metrics)``.
    """
    fn = ATTACKS.get(name)
    return fn(U, malicious, **accepted_kwargs(fn, kwargs))


def data_poison(name: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The label-poisoning function an attack needs during local training, or ``None``."""
    return getattr(ATTACKS.get(name), "data_poison", None)
