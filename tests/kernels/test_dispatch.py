"""Dispatchers: ``impl`` = torch / triton / auto, the ``SPFL_IMPL`` override, bad names."""

from __future__ import annotations

import importlib

import pytest
import torch

from spfl_kernels.dispatch import resolve_impl

# importlib: ``kernels.<stem>`` attributes are the dispatcher functions, which shadow the modules.
pd_mod = importlib.import_module("spfl_kernels.pairwise_sqdist")
csnr_mod = importlib.import_module("spfl_kernels.clip_scale_noise_reduce")
os_mod = importlib.import_module("spfl_kernels.order_stats")

from kernels_testutil import randn

U = randn((5, 33), "dispatch")
W = torch.full((5,), 0.2)

# (module, dispatcher name, launcher name, twin name, args)
CASES = [
    (pd_mod, "pairwise_sqdist", "pairwise_sqdist_triton", "pairwise_sqdist_torch", (U,)),
    (csnr_mod, "clip_rows", "clip_rows_triton", "clip_rows_torch", (U, 1.0)),
    (csnr_mod, "clip_scale_noise_reduce", "clip_scale_noise_reduce_triton", "clip_scale_noise_reduce_torch", (U, 1.0, W, 0.0, 0)),
    (os_mod, "order_stats", "order_stats_triton", "order_stats_torch", (U, "median", 0)),
]
IDS = [c[1] for c in CASES]


def _spy(monkeypatch: pytest.MonkeyPatch, mod, triton_name: str, torch_name: str) -> list[str]:
    """Replace both implementations with recorders that still call the real function."""
    calls: list[str] = []
    for name, tag in ((triton_name, "triton"), (torch_name, "torch")):
        real = getattr(mod, name)

        def rec(*a, _real=real, _tag=tag, **kw):
            calls.append(_tag)
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, rec)
    return calls


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize(
    "impl,env,expected",
    [
        ("torch", None, "torch"),
        ("triton", None, "triton"),
        ("auto", None, "cuda-dependent"),
        ("auto", "triton", "triton"),
        ("auto", "torch", "torch"),
        ("torch", "triton", "torch"),  # an explicit impl beats the environment
    ],
)
def test_dispatch(case, impl: str, env: str | None, expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mod, disp, tri, tor, args = case
    if env is None:
        monkeypatch.delenv("SPFL_IMPL", raising=False)
    else:
        monkeypatch.setenv("SPFL_IMPL", env)
    calls = _spy(monkeypatch, mod, tri, tor)
    getattr(mod, disp)(*args, impl=impl)
    if expected == "cuda-dependent":
        expected = "triton" if args[0].is_cuda else "torch"
    assert calls[0] == expected


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_impl_raises(case, monkeypatch: pytest.MonkeyPatch) -> None:
    mod, disp, _, _, args = case
    with pytest.raises(ValueError):
        getattr(mod, disp)(*args, impl="cuda")
    monkeypatch.setenv("SPFL_IMPL", "fast")
    with pytest.raises(ValueError):
        getattr(mod, disp)(*args, impl="auto")


def test_resolve_impl_auto_is_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPFL_IMPL", raising=False)
    assert resolve_impl("auto", torch.zeros(1)) == "torch"
