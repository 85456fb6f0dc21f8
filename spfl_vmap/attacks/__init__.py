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
``min_max``, ``min_sum``, ``agr_tal``, ``fang``, ``nan``, ``inf``.

Data poisoning: ``label_flip`` leaves ``U`` unchanged; its function attribute ``data_poison``
(:func:`flip_labels`, ``y -> num_classes - 1 - y``) is what the engine applies to the malicious
clients' labels during local training (round step 4). :func:`data_poison` returns that function
for any attack name (``None`` for pure model-poisoning attacks). Engine use, at round step 6::

    poison = data_poison(cfg.attack)          # before local training; None for most attacks
    U, m = attack(cfg.attack, U, malicious, weights=counts, generator=gen, f=cfg.f,
                  knowledge=cfg.knowledge, aggregator=cfg.aggregator, **cfg.attack_kwargs)

:func:`attack` validates the inputs and the keyword arguments: the engine's ``weights``,
``generator``, ``knowledge``, ``f`` and ``aggregator`` (:data:`ENGINE_KWARGS`) are dropped for an
attack that does not take them; any other key the attack does not take, or a value of the wrong
type, is a :class:`~spfl_vmap.errors.ConfigError` naming it (a misspelled hyperparameter is never
ignored).

:func:`attack_cohort` runs an attack on a :class:`Cohort` sharded over processes (under torchrun):
each rank rewrites its own malicious rows and the statistics of the known rows (means, standard
deviations, extremes, pairwise distances) come through collectives, so ``U`` is never gathered.
Every attack but ``agr_tal`` (which simulates the aggregator on whole rows) has that path
(:func:`shards_rows`).

:func:`attackers_quantile` sizes ``f`` for sampled cohorts: the ``q``-quantile of the
hypergeometric number of malicious clients in a cohort.

Backdoor (trigger) poisoning lives in :mod:`spfl_vmap.attacks.backdoor`: trigger masks
(:func:`trigger_mask`, :func:`dba_parts`), :func:`apply_trigger`, the poisoned slots of a chunk
(:func:`poison_rows`, :func:`poison_batch`) and the attack success rate (:func:`attack_success`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..errors import ConfigError
from ..aggregators._base import check_matrix, check_weights, resolve_kwargs
from ._base import ATTACKS, ENGINE_KWARGS, KNOWLEDGE, Cohort, Rows, attackers_quantile
from .agr_tailored import AGR_TAL_RULES, agr_tal
from .backdoor import TRIGGERS, apply_trigger, attack_success, dba_parts, poison_batch, poison_rows, trigger_mask
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
    "AGR_TAL_RULES",
    "ATTACKS",
    "Cohort",
    "ENGINE_KWARGS",
    "KNOWLEDGE",
    "TRIGGERS",
    "agr_tal",
    "alie",
    "alie_z",
    "apply_trigger",
    "attack",
    "attack_success",
    "attackers_quantile",
    "data_poison",
    "dba_parts",
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
    "poison_batch",
    "poison_rows",
    "Rows",
    "attack_cohort",
    "shards_rows",
    "sign_flip",
    "trigger_mask",
]


def attack(name: str, U: torch.Tensor, malicious: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict]:
    """Run the registered attack ``name`` after validating its inputs and keyword arguments.

    Args:
        name: registry name (see :data:`ATTACKS`).
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        **kwargs: ``weights``, ``generator``, ``knowledge``, ``f``, ``aggregator`` (dropped if
            the attack does not take them) and the attack's hyperparameters.

    Returns:
        ``([N, D] attacked U, metrics)``.

    Raises:
        ConfigError: unknown name; an unknown hyperparameter (the message lists the accepted
            ones) or a value of the wrong type; ``U`` not a float ``[N, D]`` tensor; ``weights``
            or ``malicious`` without N entries.
    """
    fn = ATTACKS.get(name)
    who = f"attack {name!r}"
    check_matrix(U, who)
    check_weights(kwargs.get("weights"), U.shape[0], who)
    return fn(U, malicious, **resolve_kwargs(fn, kwargs, ENGINE_KWARGS, who))


def data_poison(name: str) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
    """The label-poisoning function an attack needs during local training, or ``None``."""
    return getattr(ATTACKS.get(name), "data_poison", None)


def shards_rows(name: str) -> bool:
    """Whether attack ``name`` runs on a sharded :class:`Cohort` (its ``on_cohort`` core)."""
    return hasattr(ATTACKS.get(name), "on_cohort")


def attack_cohort(name: str, cohort: Cohort, **kwargs: Any) -> tuple[torch.Tensor, dict]:
    """Attack ``name`` on ``cohort``: under torchrun this rank's rows, rewritten with statistics
    taken over every rank's rows by collectives; every rank must call it for the same round.

    The keyword arguments are those of :func:`attack`; the ones the attack's core does not use
    are dropped.

    Returns:
        ``(U (n_r, D) with this rank's malicious rows rewritten, metrics)``, the metrics the same
        on every rank.
    """
    fn = ATTACKS.get(name)
    core = getattr(fn, "on_cohort", None)
    if core is None:
        raise ConfigError(f"attack {name!r} needs every update row in one process; it has no sharded path")
    resolve_kwargs(fn, kwargs, ENGINE_KWARGS, f"attack {name!r}")  # the public signature's checks
    return core(cohort, **{k: v for k, v in kwargs.items() if k in inspect.signature(core).parameters})
