"""The attack registry and shared helpers (kept apart from ``__init__`` to avoid import cycles)."""

from __future__ import annotations

import torch

from ..rng import default_generator  # noqa: F401  (re-exported for this package)

from ..errors import ConfigError
from ..registry import Registry

ATTACKS: Registry = Registry("attack")

KNOWLEDGE = ("omniscient", "partial")


def check_inputs(U: torch.Tensor, malicious: torch.Tensor, knowledge: str) -> torch.Tensor:
    """Validate shapes and the knowledge model; return ``malicious`` as a bool ``[N]`` mask."""
    if U.dim() != 2:
        raise ValueError(f"U must be [N, D], got shape {tuple(U.shape)}")
    mal = malicious.to(device=U.device, dtype=torch.bool).reshape(-1)
    if mal.numel() != U.shape[0]:
        raise ValueError(f"malicious has {mal.numel()} entries for {U.shape[0]} rows")
    if knowledge not in KNOWLEDGE:
        raise ConfigError(f"attack knowledge must be one of {KNOWLEDGE}, got {knowledge!r}")
    return mal


def known_rows(U: torch.Tensor, mal: torch.Tensor, knowledge: str) -> torch.Tensor:
    """The rows whose statistics the attacker may use, in fp32.

    ``omniscient``: all benign rows (the original toolkit's ``--all_grads``); if every row is
    malicious, their honest rows are all there is. ``partial``: only the malicious clients' own
    honest rows (``U[malicious]`` before rewriting).

    Returns:
        ``[n_known, D]`` fp32.
    """
    if knowledge == "omniscient" and bool((~mal).any()):
        return U[~mal].float()
    return U[mal].float()


def std_rows(X: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise sample standard deviation (Bessel-corrected); zeros for a single row."""
    if X.shape[0] < 2:
        return torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    return X.std(dim=0, correction=1)


def n_byzantine(mal: torch.Tensor, f: int) -> int:
    """The Byzantine count the attack plans for: ``f`` if given (> 0), else the malicious count."""
    return int(f) if int(f) > 0 else int(mal.sum())


def with_rows(U: torch.Tensor, mal: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``U`` whose malicious rows are ``rows`` (``[D]`` broadcast or ``[n_mal, D]``)."""
    out = U.clone()
    out[mal] = rows.to(device=U.device, dtype=U.dtype)
    return out


