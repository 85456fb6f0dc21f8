"""pytest-benchmark: each fused kernel vs its torch twin.

Run with ``pytest bench/bench_kernels.py``. On the CPU only the torch twins run, at small sizes
(the Triton interpreter is a correctness tool, not a speed target). On CUDA both run at moderate
sizes; ``scripts/gpu_check`` runs the big GPU sizes through :mod:`kernel_bench` directly.

``benchmark.extra_info`` gets the rate (TFLOP/s for the Gram matrix, GB/s for the memory-bound
ops, see :mod:`kernel_bench` for the work models) and, on CUDA, the fraction of the card's
measured ceiling.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernel_bench import measure_ceilings
from spfl_kernels.clip_scale_noise_reduce import clip_scale_noise_reduce_torch, clip_scale_noise_reduce_triton
from spfl_kernels.order_stats import order_stats_torch, order_stats_triton
from spfl_kernels.pairwise_sqdist import pairwise_sqdist_torch, pairwise_sqdist_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
IMPLS = ("torch", "triton") if CUDA else ("torch",)
SIZES = [(100, 1_000_000), (1000, 100_000)] if CUDA else [(7, 4097), (33, 65_537)]


@pytest.fixture(scope="session")
def ceilings() -> dict:
    return measure_ceilings(DEVICE, copy_bytes=1 << 30, mm=4096) if CUDA else {}


def _inputs(N: int, D: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE)
    g.manual_seed(N * 1_000_003 + D)
    return torch.randn((N, D), generator=g, device=DEVICE)


def _run(benchmark, fn, work: float, unit: str, ceiling: float | None) -> None:
    def call():
        r = fn()
        if CUDA:
            torch.cuda.synchronize()
        return r

    benchmark.pedantic(call, rounds=5, warmup_rounds=1)
    t = benchmark.stats.stats.median
    rate = work / t / (1e12 if unit == "TFLOP/s" else 1e9)
    benchmark.extra_info.update({"unit": unit, "rate": rate})
    if ceiling:
        benchmark.extra_info["fraction_of_ceiling"] = rate / ceiling


@pytest.mark.parametrize("N,D", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_pairwise_sqdist(benchmark, ceilings, impl: str, N: int, D: int) -> None:
    U = _inputs(N, D)
    fn = pairwise_sqdist_torch if impl == "torch" else pairwise_sqdist_triton
    _run(benchmark, lambda: fn(U), N * (N + 1) * D, "TFLOP/s", ceilings.get("fp32_tflops"))


@pytest.mark.parametrize("N,D", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_clip_scale_noise_reduce(benchmark, ceilings, impl: str, N: int, D: int) -> None:
    U = _inputs(N, D)
    w = torch.full((N,), 1.0 / N, device=DEVICE)
    fn = clip_scale_noise_reduce_torch if impl == "torch" else clip_scale_noise_reduce_triton
    _run(benchmark, lambda: fn(U, math.sqrt(D), w, 0.1, 1), 4 * (N * D + D), "GB/s", ceilings.get("copy_gbps"))


@pytest.mark.parametrize("op", ["median", "trimmed_mean", "bulyan_mean"])
@pytest.mark.parametrize("N,D", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_order_stats(benchmark, ceilings, impl: str, N: int, D: int, op: str) -> None:
    U = _inputs(N, D)
    k = {"median": 0, "trimmed_mean": N // 4, "bulyan_mean": max(1, N - 2 * (N // 4))}[op]
    fn = order_stats_torch if impl == "torch" else order_stats_triton
    _run(benchmark, lambda: fn(U, op, k), 4 * (N * D + D), "GB/s", ceilings.get("copy_gbps"))
