"""The attack registry and shared helpers (kept apart from ``__init__`` to avoid import cycles)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

from ..rng import default_generator  # noqa: F401  (re-exported for this package)

from ..aggregators._base import Collectives, Rows, check_matrix, std_rows, subset_parts  # noqa: F401  (Rows, std_rows re-exported)
from ..errors import ConfigError
from ..registry import Registry

ATTACKS: Registry = Registry("attack")

KNOWLEDGE = ("omniscient", "partial")

#: Keyword arguments the engine passes to every attack; an attack that does not take one of them
#: simply does not get it. Any other key must be one of the attack's own hyperparameters.
ENGINE_KWARGS = frozenset({"weights", "generator", "knowledge", "f", "aggregator"})


def check_inputs(U: torch.Tensor, malicious: torch.Tensor, knowledge: str) -> torch.Tensor:
    """Validate ``U``, the mask and the knowledge model; return ``malicious`` as a bool ``[N]`` mask.

    Raises:
        ConfigError: ``U`` not a float ``[N, D]`` tensor, ``malicious`` not a 0/1 tensor with N
            entries, or an unknown ``knowledge``.
    """
    check_matrix(U, "attack")
    if not isinstance(malicious, torch.Tensor):
        raise ConfigError(f"attack: malicious must be a bool torch.Tensor [N], got {type(malicious).__name__}")
    if malicious.dtype is not torch.bool and not bool(((malicious == 0) | (malicious == 1)).all()):
        raise ConfigError("attack: malicious must be a bool mask [N] (or 0/1 values), not row indices")
    mal = malicious.to(device=U.device, dtype=torch.bool).reshape(-1)
    if mal.numel() != U.shape[0]:
        raise ConfigError(f"attack: malicious has {mal.numel()} entries for {U.shape[0]} rows")
    if knowledge not in KNOWLEDGE:
        raise ConfigError(f"attack knowledge must be one of {KNOWLEDGE}, got {knowledge!r}")
    return mal


def attackers_quantile(population: int, malicious: int, cohort: int, q: float = 0.99) -> int:
    """The ``q``-quantile of the number of malicious clients in a uniformly sampled cohort.

    A cohort of ``cohort`` clients drawn without replacement from ``population`` clients, of which
    ``malicious`` are malicious, holds a hypergeometric number ``X`` of them. This returns the
    smallest ``k`` with ``P(X <= k) >= q`` (``scipy.stats.hypergeom.ppf``), clamped to the support
    ``[max(0, cohort - (population - malicious)), min(malicious, cohort)]``: with ``q = 0.99``, a
    round has more than ``k`` attackers at most 1% of the time, so an aggregator assuming
    ``f >= k`` is outnumbered in at most 1% of the rounds.

    Args:
        population: total number of clients ``K``.
        malicious: malicious clients among them, ``0 <= malicious <= population``.
        cohort: clients sampled per round, ``0 <= cohort <= population``.
        q: quantile in ``[0, 1]``.

    Returns:
        The quantile ``k`` (an int).

    Raises:
        ConfigError: a count that is not a non-negative int or is out of range, or ``q`` outside
            ``[0, 1]``.
    """
    for label, v in (("population", population), ("malicious", malicious), ("cohort", cohort)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ConfigError(f"attackers_quantile: {label} must be a non-negative int, got {v!r}")
    if malicious > population or cohort > population:
        raise ConfigError(
            f"attackers_quantile: needs malicious <= population and cohort <= population; "
            f"got population={population}, malicious={malicious}, cohort={cohort}"
        )
    if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0.0 <= float(q) <= 1.0:
        raise ConfigError(f"attackers_quantile: q must be a number in [0, 1], got {q!r}")
    lo, hi = max(0, cohort - (population - malicious)), min(malicious, cohort)
    if lo == hi:
        return int(lo)
    from scipy.stats import hypergeom  # imported here: scipy.stats is slow to import

    k = float(hypergeom.ppf(float(q), int(population), int(malicious), int(cohort)))
    if math.isnan(k):  # not expected for valid arguments; the support's top is the safe answer
        return int(hi)
    return int(min(max(k, lo), hi))


def known_rows(U: torch.Tensor, mal: torch.Tensor, knowledge: str) -> torch.Tensor:
    """The rows whose statistics the attacker may use, in fp32.

    ``omniscient``: all benign rows (the original toolkit's ``--all_grads``); if every row is
    malicious, their honest rows are all there is. ``partial``: only the malicious clients' own
    honest rows (``U[malicious]`` before rewriting).

    Returns:
        ``[n_known, D]`` fp32.
    """
    return U[known_mask(mal, knowledge)].float()


def known_mask(mal: torch.Tensor, knowledge: str) -> torch.Tensor:
    """``(N,)`` which rows :func:`known_rows` takes: the benign ones (``omniscient``, if any),
    else the malicious clients' own."""
    return ~mal if knowledge == "omniscient" and bool((~mal).any()) else mal


def n_byzantine(mal: torch.Tensor, f: int) -> int:
    """The Byzantine count the attack plans for: ``f`` if given (> 0), else the malicious count."""
    return int(f) if int(f) > 0 else int(mal.sum())


def with_rows(U: torch.Tensor, mal: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``U`` whose malicious rows are ``rows`` (``[D]`` broadcast or ``[n_mal, D]``)."""
    out = U.clone()
    out[mal] = rows.to(device=U.device, dtype=U.dtype)
    return out




# ---- the attacker's view of a cohort, in one process or sharded over processes --------------
@dataclass
class Cohort:
    """The attacker's view of a round's update rows ``U``.

    In one process (:meth:`local`) ``U`` is all ``N`` rows. Under torchrun (:meth:`sharded`) it is
    this rank's rows ``(n_r, D)``; the malicious mask of the whole cohort is known on every rank,
    the statistics of the known rows come through collectives (:meth:`known`) and each rank
    rewrites its own malicious rows (:meth:`write`), so attacks never gather ``U``.
    """

    U: torch.Tensor  # (n_r, D) the rows held here (all N in one process)
    mal: torch.Tensor  # (n_r,) bool: which of them are malicious
    mal_all: torch.Tensor  # (N,) bool: the cohort's mask
    sh: Optional[Collectives] = None
    parts: Optional[list[list[int]]] = None  # every rank's cohort positions, ascending

    @classmethod
    def local(cls, U: torch.Tensor, malicious: torch.Tensor, knowledge: str) -> "Cohort":
        """All of ``U [N, D]`` in one process (inputs validated by :func:`check_inputs`)."""
        mal = check_inputs(U, malicious, knowledge)
        return cls(U, mal, mal)

    @classmethod
    def sharded(cls, U: torch.Tensor, malicious: torch.Tensor, sh: Collectives, parts: list[list[int]]) -> "Cohort":
        """This rank's rows ``U (n_r, D)`` at cohort positions ``parts[sh.rank]`` of a cohort
        with mask ``malicious (N,)``."""
        mal_all = malicious.to(device=U.device, dtype=torch.bool).reshape(-1)
        mine = torch.tensor(parts[sh.rank], dtype=torch.long, device=U.device)
        return cls(U, mal_all[mine], mal_all, sh, parts)

    @property
    def N(self) -> int:
        return self.mal_all.numel()

    @property
    def n_mal(self) -> int:
        return int(self.mal_all.sum())

    @property
    def dim(self) -> int:
        return self.U.shape[1]

    def planned(self, f: int) -> int:
        """The Byzantine count the attack plans for (:func:`n_byzantine` over the cohort)."""
        return n_byzantine(self.mal_all, f)

    def known(self, knowledge: str) -> Rows:
        """The rows the attacker may use (see :func:`known_rows`), as :class:`Rows`."""
        if self.sh is None:
            return Rows(known_rows(self.U, self.mal, knowledge))
        use = known_mask(self.mal_all, knowledge)  # (N,)
        here = use[torch.tensor(self.parts[self.sh.rank], dtype=torch.long, device=use.device)]
        return Rows(self.U[here].float(), int(use.sum()), self.sh, subset_parts(use, self.parts))

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's part ``(n_mal_r, D)`` of ``rows (n_mal, D)``, one per malicious row of the
        cohort in cohort order (drawn identically on every rank)."""
        if self.sh is None:
            return rows
        mine = subset_parts(self.mal_all, self.parts)[self.sh.rank]  # this rank's positions among the malicious rows
        return rows[torch.tensor(mine, dtype=torch.long, device=rows.device)]

    def write(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of ``U`` whose malicious rows held here are ``rows``: ``(D,)`` (or a scalar)
        broadcast, or ``(n_mal_r, D)``."""
        return with_rows(self.U, self.mal, rows)

    def unchanged(self) -> tuple[torch.Tensor, dict]:
        return self.U.clone(), {}
