"""The batch schedule of one round, shared by the vectorized and the loop engine.

Each client shuffles its own samples every epoch with a generator seeded by
``(seed, "batches", round, client_id, epoch)``, drawn outside vmap: a client's batches do not
depend on which other clients were sampled. Every client runs ``S = max_k ceil(n_k / B)``
steps per epoch; the slots past a client's count are masked, so they change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rng import generator


@dataclass
class Schedule:
    pos: torch.Tensor  # (N, T, B) positions into each client's index row
    mask: torch.Tensor  # (N, T, B) bool: real sample
    steps_per_epoch: int

    @property
    def num_steps(self) -> int:
        return self.pos.shape[1]

    @property
    def active(self) -> torch.Tensor:
        return self.mask.any(dim=2)  # (N, T)

    def select(self, rows: slice | torch.Tensor) -> "Schedule":
        return Schedule(self.pos[rows], self.mask[rows], self.steps_per_epoch)


def make_schedule(
    client_ids: list[int], counts: list[int], batch_size: int, epochs: int, seed: int, round_idx: int, shuffle: bool = True
) -> Schedule:
    """Build the ``(N, epochs * S, B)`` schedule for the sampled clients."""
    n_clients = len(client_ids)
    B = batch_size
    S = max(1, max((-(-c // B) for c in counts), default=1))
    slots = S * B
    pos = torch.zeros(n_clients, epochs, slots, dtype=torch.long)
    for i, (cid, n_k) in enumerate(zip(client_ids, counts)):
        if shuffle:
            g = generator(seed, "batches", round_idx, cid)
            for e in range(epochs):
                pos[i, e, :n_k] = torch.randperm(n_k, generator=g)
        else:
            pos[i, :, :n_k] = torch.arange(n_k)
    cnt = torch.tensor(counts, dtype=torch.long)
    mask = torch.arange(slots)[None, None, :] < cnt[:, None, None]  # (N, 1, S*B)
    mask = mask.expand(n_clients, epochs, slots)
    return Schedule(pos.reshape(n_clients, epochs * S, B), mask.reshape(n_clients, epochs * S, B).contiguous(), S)
