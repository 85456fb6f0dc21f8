"""The batch schedule of one round, shared by the vectorized and the loop engine.

Each client shuffles its own samples every epoch with a generator seeded by
``(seed, "batches", round, client_id, epoch)``, drawn outside vmap: a client's batches do not
depend on which other clients were sampled. Client ``k`` takes ``T_k = epochs * ceil(n_k / B)``
steps, and they come first in its row: step ``t < T_k`` is epoch ``t // s_k``, batch
``t % s_k`` (``s_k = ceil(n_k / B)``); the slots of a partial last batch and every step
``t >= T_k`` are masked. So the clients still training at step ``t`` are those with
``T_k > t``; sorted by ``T_k`` they are a prefix, which the vectorized engine trains without
any masked (dead) steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rng import generator


@dataclass
class Schedule:
    pos: torch.Tensor  # (N, T, B) positions into each client's index row
    mask: torch.Tensor  # (N, T, B) bool: real sample
    steps: torch.Tensor  # (N,) long: real steps T_k of each client (its first T_k steps)

    @property
    def num_steps(self) -> int:
        return self.pos.shape[1]

    @property
    def active(self) -> torch.Tensor:
        return torch.arange(self.num_steps)[None, :] < self.steps[:, None]  # (N, T)

    def select(self, rows: slice | torch.Tensor) -> "Schedule":
        return Schedule(self.pos[rows], self.mask[rows], self.steps[rows])


def make_schedule(
    client_ids: list[int], counts: list[int], batch_size: int, epochs: int, seed: int, round_idx: int, shuffle: bool = True
) -> Schedule:
    """Build the ``(N, T, B)`` schedule of the sampled clients, ``T = max_k T_k``."""
    n_clients = len(client_ids)
    B = batch_size
    per_epoch = [-(-c // B) for c in counts]  # s_k (0 for an empty client)
    steps = torch.tensor([epochs * s for s in per_epoch], dtype=torch.long)
    T = max(1, int(steps.max()) if n_clients else 1)
    pos = torch.zeros(n_clients, T * B, dtype=torch.long)
    mask = torch.zeros(n_clients, T * B, dtype=torch.bool)
    orders = []  # each (client, epoch)'s sample order, client-major
    for cid, n_k in zip(client_ids, counts):
        if shuffle:
            g = generator(seed, "batches", round_idx, cid)
            orders += [torch.randperm(n_k, generator=g) for _ in range(epochs)]
        else:
            orders += [torch.arange(n_k)] * epochs
    if orders:
        # segment (i, e) fills columns e * s_k * B + [0, n_k) of row i: one scatter, not N * E copies
        n = torch.tensor(counts, dtype=torch.long).repeat_interleave(epochs)  # (N * E,) segment lengths
        base = (torch.arange(epochs).repeat(n_clients) * torch.tensor(per_epoch).repeat_interleave(epochs) * B)  # (N * E,)
        seg = torch.repeat_interleave(torch.arange(len(n)), n)  # (M,) segment of each entry
        start = torch.cumsum(n, 0) - n  # (N * E,) first entry of each segment
        cols = base[seg] + torch.arange(len(seg)) - start[seg]
        rows = seg // epochs
        pos[rows, cols] = torch.cat(orders)
        mask[rows, cols] = True
    return Schedule(pos.reshape(n_clients, T, B), mask.reshape(n_clients, T, B), steps)
