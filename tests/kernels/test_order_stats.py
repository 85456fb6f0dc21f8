"""``order_stats``: Triton kernel vs torch twin, NaN/inf semantics, ties and the large-N fallback."""

from __future__ import annotations

import importlib

import pytest
import torch

from spfl_kernels.order_stats import MAX_TRITON_N, OPS, order_stats_torch, order_stats_triton

from kernels_testutil import DS, NS, poisoned, randn

os_mod = importlib.import_module("spfl_kernels.order_stats")  # the package attribute is the dispatcher

FAST = dict(block_d=1024)  # few programs under the interpreter
NAN, INF = float("nan"), float("inf")


def _k(op: str, n: int) -> int:
    """A typical k: trim a quarter per side; Bulyan keeps n - 2f with f = n // 4."""
    if op == "trimmed_mean":
        return n // 4
    if op == "bulyan_mean":
        return max(1, n - 2 * (n // 4))
    return 0


def _assert_same(got: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("D", DS)
@pytest.mark.parametrize("N", NS)
def test_matches_twin(N: int, D: int, op: str) -> None:
    U = randn((N, D), "order", N, D, op)
    out = poisoned((D,))
    got = order_stats_triton(U, op, _k(op, N), out=out, **FAST)
    assert got.data_ptr() == out.data_ptr()
    assert not torch.isnan(got).any()
    _assert_same(got, order_stats_torch(U, op, _k(op, N)))


@pytest.mark.parametrize("N", NS)
def test_median_identical(N: int) -> None:
    # Selection, not arithmetic: the same values are picked, so the result is bit-equal.
    U = randn((N, 4097), "median-exact", N)
    assert torch.equal(order_stats_triton(U, "median", **FAST), order_stats_torch(U, "median"))


def test_hand_checked_values() -> None:
    U = torch.tensor([[0.2], [0.7], [1.0], [9.0], [-4.0]])
    assert float(order_stats_triton(U, "median", **FAST)) == pytest.approx(0.7)
    assert float(order_stats_triton(U, "trimmed_mean", 1, **FAST)) == pytest.approx((0.2 + 0.7 + 1.0) / 3)
    # |x - 0.7| = 0.5, 0, 0.3, ...: the two closest are 0.7 and 1.0.
    assert float(order_stats_triton(U, "bulyan_mean", 2, **FAST)) == pytest.approx(0.85)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("N", (2, 7, 33))
def test_one_nan_row_is_excluded(N: int, op: str) -> None:
    U = randn((N, 1023), "nan-row", N, op)
    U[N // 2] = NAN
    rest = torch.cat([U[: N // 2], U[N // 2 + 1 :]])
    k = _k(op, N - 1)
    got = order_stats_triton(U, op, k, out=poisoned((1023,)), **FAST)
    _assert_same(got, order_stats_torch(U, op, k))
    _assert_same(got, order_stats_torch(rest, op, k))  # as if the row were absent
    assert not torch.isnan(got).any()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf - inf on purpose
@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_semantics(op: str) -> None:
    N, D = 9, 1023
    U = randn((N, D), "nan-inf", op)
    U[:, 0] = NAN  # all-NaN coordinate -> NaN
    U[0, 1] = INF  # one +inf: trimmed away / ignored by the median
    U[1, 2], U[2, 2] = -INF, INF
    U[:5, 3] = INF  # +inf is the median
    U[:4, 4], U[4:8, 4] = -INF, INF  # -inf and +inf meet in the middle: median NaN
    U[3:8, 5] = NAN  # scattered NaNs: fewer valid values
    U[:8, 6] = NAN  # a single valid value
    k = _k(op, N)
    got = order_stats_triton(U, op, k, out=poisoned((D,)), **FAST)
    ref = order_stats_torch(U, op, k)
    _assert_same(got, ref)
    assert torch.isnan(got[0])
    assert not torch.isnan(got[7:]).any()


@pytest.mark.parametrize("op", OPS)
def test_ties_pick_like_stable_sort(op: str) -> None:
    # Small integers: many equal values and equal distances to the median.
    U = torch.randint(-3, 4, (12, 1023), generator=torch.Generator().manual_seed(3)).float()
    for k in (0, 1, 3, 6, 13):
        _assert_same(order_stats_triton(U, op, k, **FAST), order_stats_torch(U, op, k))


def test_trimmed_mean_trims_everything_gives_nan() -> None:
    U = randn((4, 33), "trim-all")
    got = order_stats_triton(U, "trimmed_mean", 2, **FAST)
    assert torch.isnan(got).all()
    _assert_same(got, order_stats_torch(U, "trimmed_mean", 2))


def test_default_block_size_and_bf16() -> None:
    U = randn((33, 1023), "order-bf16", dtype=torch.bfloat16)
    for op in OPS:
        _assert_same(order_stats_triton(U, op, _k(op, 33)), order_stats_torch(U, op, _k(op, 33)))


def test_large_n_falls_back_to_twin(monkeypatch: pytest.MonkeyPatch) -> None:
    U = randn((MAX_TRITON_N + 1, 5), "fallback")
    launched = []
    monkeypatch.setattr(os_mod, "_order_stats_kernel", launched)  # indexing a list would fail
    out = poisoned((5,))
    got = order_stats_triton(U, "median", out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, order_stats_torch(U, "median"))


def test_bad_op() -> None:
    with pytest.raises(ValueError):
        order_stats_triton(torch.zeros(3, 3), "mode")


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("N,D", [(1, 5), (100, 1_000_003), (256, 4097), (300, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_twin(N: int, D: int, op: str, dtype: torch.dtype) -> None:
    U = randn((N, D), "order-cuda", N, D, op, dtype, device="cuda", dtype=dtype)
    U[0, :7] = NAN
    got = order_stats_triton(U, op, _k(op, N), out=poisoned((D,), device="cuda"))
    _assert_same(got, order_stats_torch(U, op, _k(op, N)))
    if op == "median":
        assert torch.equal(got, order_stats_torch(U, op))
