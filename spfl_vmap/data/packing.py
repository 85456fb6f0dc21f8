"""Client data packed once onto the device.

The samples stay in one flat tensor ``x [n_train, C, H, W]``; each client is a padded row of an
index table ``index [K, n_max]`` plus its count. A step gathers ``x[index[clients, positions]]``.
This is DESIGN.md's padded ``[K, n_max, ...]`` layout with one indirection, chosen because a
Dirichlet split's largest client can be several times the mean, and padding the images
themselves would multiply memory by ``K * n_max / n_train``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PackedClients:
    x: torch.Tensor  # (n_train, C, H, W)
    y: torch.Tensor  # (n_train,)
    index: torch.Tensor  # (K, n_max) int64, padded with 0
    counts: torch.Tensor  # (K,) int64

    @property
    def num_clients(self) -> int:
        return self.index.shape[0]

    def client_indices(self, k: int) -> torch.Tensor:
        return self.index[k, : int(self.counts[k])]


def pack_clients(x: torch.Tensor, y: torch.Tensor, parts: list[np.ndarray], device: torch.device) -> PackedClients:
    counts = np.array([len(p) for p in parts], dtype=np.int64)
    n_max = int(counts.max())
    index = np.zeros((len(parts), n_max), dtype=np.int64)
    for k, p in enumerate(parts):
        index[k, : len(p)] = p
    return PackedClients(
        x=x.to(device).contiguous(),
        y=y.to(device),
        index=torch.from_numpy(index).to(device),
        counts=torch.from_numpy(counts).to(device),
    )
