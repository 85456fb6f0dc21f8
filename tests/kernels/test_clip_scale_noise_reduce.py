"""``clip_scale_noise_reduce`` and ``clip_rows``: Triton kernels vs torch twins; noise by moments."""

from __future__ import annotations

import math

import pytest
import torch

from spfl_kernels.clip_scale_noise_reduce import (
    clip_rows_torch,
    clip_rows_triton,
    clip_scale_noise_reduce_torch,
    clip_scale_noise_reduce_triton,
)

from kernels_testutil import DS, NS, TOL, gen, poisoned, randn

# Small chunks so pass 1 has several partial sums per row even at D = 4097.
FAST = dict(block_d=1024, chunk=2048)


def _clip_thresholds(U: torch.Tensor) -> list[float]:
    """A threshold that clips about half the rows, and ``inf`` (no clipping)."""
    return [float(U.norm(dim=1).median()) if U.shape[1] > 0 else 1.0, math.inf]


@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_reduce_matches_twin(N: int, D: int) -> None:
    U = randn((N, D), "csnr", N, D) * (1.0 + torch.arange(N, dtype=torch.float32))[:, None]
    w = torch.rand(N, generator=gen("csnr-w", N, D)) + 0.1
    for max_norm in _clip_thresholds(U):
        out, norms_out = poisoned((D,)), poisoned((N,))
        got, norms = clip_scale_noise_reduce_triton(U, max_norm, w, 0.0, 0, out=out, norms_out=norms_out, **FAST)
        ref, ref_norms = clip_scale_noise_reduce_torch(U, max_norm, w, 0.0, 0)
        assert got.data_ptr() == out.data_ptr() and norms.data_ptr() == norms_out.data_ptr()
        assert not torch.isnan(got).any() and not torch.isnan(norms).any()
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
        # Error scale of a weighted sum: sum_i |c_i| |U_id|.
        factor = torch.ones(N) if math.isinf(max_norm) else (max_norm / (ref_norms + 1e-6)).clamp(max=1.0)
        scale = float(((w * factor) @ U.abs()).max())
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


def test_reduce_clips_to_max_norm() -> None:
    # One row of norm 5 clipped to 1, weight 2: the result is 2 * row / 5 (hand-checkable).
    U = torch.tensor([[3.0, 4.0, 0.0]])
    got, norms = clip_scale_noise_reduce_triton(U, 1.0, torch.tensor([2.0]), 0.0, 0, **FAST)
    torch.testing.assert_close(norms, torch.tensor([5.0]))
    torch.testing.assert_close(got, torch.tensor([1.2, 1.6, 0.0]), rtol=1e-5, atol=1e-6)


def test_reduce_bf16_input() -> None:
    U = randn((7, 1023), "csnr-bf16", dtype=torch.bfloat16)
    w = torch.full((7,), 1.0 / 7)
    got, norms = clip_scale_noise_reduce_triton(U, 10.0, w, 0.0, 0, **FAST)
    ref, ref_norms = clip_scale_noise_reduce_torch(U, 10.0, w, 0.0, 0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_clip_rows_matches_twin(N: int, D: int) -> None:
    U = randn((N, D), "cliprows", N, D) * (1.0 + torch.arange(N, dtype=torch.float32))[:, None]
    for max_norm in _clip_thresholds(U):
        got, norms = clip_rows_triton(U, max_norm, out=poisoned((N, D)), **FAST)
        ref, ref_norms = clip_rows_torch(U, max_norm)
        assert not torch.isnan(got).any()
        torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        if math.isinf(max_norm):
            assert torch.equal(got, U)  # no clipping is an exact copy
        else:
            assert float(got.norm(dim=1).max()) <= max_norm * (1 + 1e-5)


def test_clip_rows_bf16_keeps_dtype() -> None:
    U = randn((7, 1023), "cliprows-bf16", dtype=torch.bfloat16)
    got, _ = clip_rows_triton(U, 5.0, out=poisoned((7, 1023), dtype=torch.bfloat16), **FAST)
    ref, _ = clip_rows_torch(U, 5.0)
    assert got.dtype == torch.bfloat16
    atol, rtol = TOL[torch.bfloat16]
    torch.testing.assert_close(got.float(), ref.float(), rtol=rtol, atol=atol)


# Noise: checked by its moments (pfl-research style), not bit-equality with the torch twin.
NOISE_D = 200_003
NOISE_STD = 2.5


def _noise(seed: int, U: torch.Tensor | None = None, block_d: int = 16384) -> torch.Tensor:
    if U is None:
        U = torch.zeros(1, NOISE_D)
    out, _ = clip_scale_noise_reduce_triton(U, 1.0, torch.ones(U.shape[0]), NOISE_STD, seed, block_d=block_d, chunk=65536)
    return out


def test_noise_moments() -> None:
    x = _noise(seed=1234).double()
    n = x.numel()
    mean, var = x.mean(), x.var()
    z = (x - mean) / var.sqrt()
    excess_kurtosis = (z**4).mean() - 3.0
    skew = (z**3).mean()
    lag1 = (z[1:] * z[:-1]).mean()
    # 5-sigma bounds from the sampling distributions of Gaussian moment estimators.
    assert abs(float(mean)) < 5 * NOISE_STD / math.sqrt(n)
    assert abs(float(var) - NOISE_STD**2) < 5 * NOISE_STD**2 * math.sqrt(2.0 / n)
    assert abs(float(skew)) < 5 * math.sqrt(6.0 / n)
    assert abs(float(excess_kurtosis)) < 5 * math.sqrt(24.0 / n)
    assert abs(float(lag1)) < 5 / math.sqrt(n)  # neighbouring columns independent


def test_noise_deterministic_per_seed() -> None:
    a, b, c = _noise(7), _noise(7), _noise(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float((a - c).abs().mean()) > NOISE_STD  # not merely a few bits different
    # Keyed on (seed, column): the block size does not change the noise.
    assert torch.equal(a, _noise(7, block_d=1024))


def test_noise_is_added_to_the_sum() -> None:
    U = randn((7, 4097), "csnr-noise")
    w = torch.rand(7, generator=gen("csnr-noise-w"))
    clean, _ = clip_scale_noise_reduce_triton(U, 3.0, w, 0.0, 5, **FAST)
    noisy, _ = clip_scale_noise_reduce_triton(U, 3.0, w, NOISE_STD, 5, **FAST)
    pure = _noise(5, U=torch.zeros(1, 4097), block_d=1024)
    torch.testing.assert_close(noisy - clean, pure, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("N,D", [(1, 5), (100, 1_000_003), (1000, 65_537)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_twin(N: int, D: int, dtype: torch.dtype) -> None:
    U = randn((N, D), "csnr-cuda", N, D, dtype, device="cuda", dtype=dtype)
    w = torch.full((N,), 1.0 / N, device="cuda")
    max_norm = float(U.float().norm(dim=1).median())
    got, norms = clip_scale_noise_reduce_triton(U, max_norm, w, 0.0, 0, out=poisoned((D,), device="cuda"))
    ref, ref_norms = clip_scale_noise_reduce_torch(U, max_norm, w, 0.0, 0)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(U.float().abs().max()))
    rows, _ = clip_rows_triton(U, max_norm, out=poisoned((N, D), device="cuda", dtype=dtype))
    ref_rows, _ = clip_rows_torch(U, max_norm)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(rows.float(), ref_rows.float(), rtol=rtol, atol=atol)


@pytest.mark.gpu
def test_cuda_noise_moments_and_determinism() -> None:
    U = torch.zeros(1, 4_000_037, device="cuda")
    one = torch.ones(1, device="cuda")
    x, _ = clip_scale_noise_reduce_triton(U, 1.0, one, NOISE_STD, 99)
    y, _ = clip_scale_noise_reduce_triton(U, 1.0, one, NOISE_STD, 99)
    assert torch.equal(x, y)
    x = x.double()
    n = x.numel()
    assert abs(float(x.mean())) < 5 * NOISE_STD / math.sqrt(n)
    assert abs(float(x.var()) - NOISE_STD**2) < 5 * NOISE_STD**2 * math.sqrt(2.0 / n)
    z = (x - x.mean()) / x.std()
    assert abs(float((z**4).mean() - 3.0)) < 5 * math.sqrt(24.0 / n)
