"""``pairwise_sqdist``: Triton kernel vs torch twin, and a Krum-style consumer."""

from __future__ import annotations

import pytest
import torch

from spfl_kernels.pairwise_sqdist import pairwise_sqdist_torch, pairwise_sqdist_triton

from kernels_testutil import DS, NS, poisoned, randn

# Big tiles keep the interpreter fast; the multi-tile test below covers tile edges and mirroring.
FAST = dict(block_m=64, block_n=64, block_k=1024)


def _assert_close(got: torch.Tensor, ref: torch.Tensor, X: torch.Tensor, rtol: float = 1e-5) -> None:
    # Distances come from |a|^2 + |b|^2 - 2ab, so the error scales with the squared norms.
    scale = max(1.0, float((X.float() ** 2).sum(dim=1).max()))
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_matches_twin(N: int, D: int) -> None:
    U = randn((N, D), "pairwise", N, D)
    out = poisoned((N, N))
    got = pairwise_sqdist_triton(U, out=out, **FAST)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any()
    _assert_close(got, pairwise_sqdist_torch(U), U)
    assert torch.all(got.diagonal() == 0)
    assert torch.all(got >= 0)


@pytest.mark.parametrize("N,D", [(33, 1023), (17, 40), (50, 7)])
def test_multi_tile_edges_and_mirror(N: int, D: int) -> None:
    U = randn((N, D), "pairwise-tiles", N, D)
    got = pairwise_sqdist_triton(U, out=poisoned((N, N)), block_m=16, block_n=16, block_k=16)
    assert not torch.isnan(got).any()
    _assert_close(got, pairwise_sqdist_torch(U), U)


def test_bf16_input_is_upcast() -> None:
    U = randn((7, 1023), "pairwise-bf16", dtype=torch.bfloat16)
    got = pairwise_sqdist_triton(U, **FAST)
    assert got.dtype == torch.float32
    _assert_close(got, pairwise_sqdist_torch(U), U)


def test_identical_rows_give_zero() -> None:
    U = randn((1, 1023), "pairwise-dup").repeat(5, 1)
    got = pairwise_sqdist_triton(U, **FAST)
    assert torch.all(got.diagonal() == 0)
    _assert_close(got, torch.zeros(5, 5), U)


def _krum_scores(d: torch.Tensor, f: int) -> torch.Tensor:
    """Krum score: sum of the n - f - 2 smallest distances to other rows (Blanchard et al. 2017)."""
    n = d.shape[0]
    m = n - f - 2
    others = d + torch.diag(torch.full((n,), float("inf")))  # exclude self
    return others.sort(dim=1).values[:, :m].sum(dim=1)  # (N,)


@pytest.mark.parametrize("N,D,f", [(7, 1023, 2), (33, 4097, 8), (33, 1, 5)])
def test_krum_choice_identical(N: int, D: int, f: int) -> None:
    U = randn((N, D), "krum", N, D)
    U[: f] += 3.0 * randn((f, D), "krum-byz", N, D)  # a few outliers
    s_tri = _krum_scores(pairwise_sqdist_triton(U, **FAST), f)
    s_ref = _krum_scores(pairwise_sqdist_torch(U), f)
    assert int(s_tri.argmin()) == int(s_ref.argmin())
    # Multi-Krum keeps the m best scores: same set.
    m = N - f
    assert set(s_tri.argsort()[:m].tolist()) == set(s_ref.argsort()[:m].tolist())


def test_rejects_bad_blocks() -> None:
    with pytest.raises(ValueError):
        pairwise_sqdist_triton(torch.zeros(3, 3), block_m=8, block_n=8)


@pytest.mark.gpu
@pytest.mark.parametrize("N,D", [(1, 5), (100, 1_000_003), (1000, 4097), (333, 65_537)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_twin(N: int, D: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # fp32 reference
    U = randn((N, D), "pairwise-cuda", N, D, dtype, device="cuda", dtype=dtype)
    got = pairwise_sqdist_triton(U, out=poisoned((N, N), device="cuda"))
    ref = pairwise_sqdist_torch(U)
    assert not torch.isnan(got).any()
    _assert_close(got, ref, U, rtol=1e-5)


@pytest.mark.gpu
def test_cuda_krum_choice_identical(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    N, D, f = 50, 200_003, 10
    U = randn((N, D), "krum-cuda", device="cuda")
    U[:f] += 2.0
    s_tri = _krum_scores(pairwise_sqdist_triton(U), f)
    s_ref = _krum_scores(pairwise_sqdist_torch(U), f)
    assert int(s_tri.argmin()) == int(s_ref.argmin())
