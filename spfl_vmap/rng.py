"""Seed derivation. Library code never touches global RNG state.

Every random draw in a run comes from a generator seeded by a tuple such as
``(seed, "batches", round, client_id)``, so results depend only on that tuple: a client's
batches do not depend on which other clients were sampled, and a resumed run needs no saved
generator state to continue bit-identically.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """Hash ``parts`` to a 63-bit seed (stable across processes and platforms)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def generator(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` seeded by :func:`derive_seed` of ``parts``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """The passed generator, or a fresh one seeded 0 (never the global RNG)."""
    if generator is not None:
        return generator
    return generator_from_seed(0)


def generator_from_seed(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
