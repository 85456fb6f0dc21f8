"""Parameter dictionaries <-> flat vectors.

The server keeps the global model as one flat ``[D]`` vector; clients train stacked parameter
dicts ``{name: [N, *shape]}``; the update matrix is ``U [N, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..models import create_model
from ..rng import derive_seed

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ParamSpec:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> "ParamSpec":
        named = list(model.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, params: Params, stacked: bool = False) -> torch.Tensor:
        """``{name: [*shape]}`` -> ``[D]``; with ``stacked``, ``{name: [N, *shape]}`` -> ``[N, D]``."""
        if stacked:
            n = params[self.names[0]].shape[0]
            return torch.cat([params[k].reshape(n, -1) for k in self.names], dim=1)
        return torch.cat([params[k].reshape(-1) for k in self.names])

    def unflatten(self, flat: torch.Tensor) -> Params:
        """``[D]`` -> ``{name: [*shape]}`` or ``[N, D]`` -> ``{name: [N, *shape]}`` (views)."""
        lead = flat.shape[:-1]
        out, off = {}, 0
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            out[name] = flat[..., off : off + n].reshape(*lead, *shape)
            off += n
        return out


def init_model(name: str, input_shape: tuple[int, ...], num_classes: int, width: int, seed: int) -> nn.Module:
    """Create a model with weights drawn from a seeded generator.

    ``nn.Module`` initialisers draw from the global RNG, so they run inside ``fork_rng``, which
    restores the global state afterwards: library code leaves global RNG state untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "init"))
        return create_model(name, input_shape, num_classes, width)
