"""Shared helpers for the kernel tests: seeded inputs, poisoned buffers, tolerances."""

from __future__ import annotations

import zlib

import torch

NS = (1, 2, 7, 33)
DS = (1, 1023, 4097)

# dtype -> (atol, rtol) for outputs stored in that dtype, as in Liger-Kernel's tolerance triples.
# Callers multiply atol by the scale of the quantity compared, so it is relative too.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),  # one bf16 ulp: the clip factor differs in its last fp32 bits
}


def gen(*case: object) -> torch.Generator:
    """A generator seeded from the parameter case, so each case gets different inputs."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr(case).encode()))  # stable across runs, unlike hash()
    return g


def randn(shape: tuple[int, ...], *case: object, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """Fresh normal inputs, seeded per parameter case; generated on CPU then moved."""
    return torch.randn(shape, generator=gen(*case)).to(device=device, dtype=dtype)


def poisoned(shape: tuple[int, ...], device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """An output buffer full of NaN, so elements the kernel never writes show up."""
    return torch.full(shape, float("nan"), device=device, dtype=dtype)
