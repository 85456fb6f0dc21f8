"""Choosing between a Triton kernel and its torch twin."""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton missing on this platform
        return False
    return True


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensor ``x``.

    ``auto`` means Triton on CUDA and torch elsewhere; ``SPFL_IMPL`` overrides ``auto`` (so the
    test-suite can force the Triton path on CPU under ``TRITON_INTERPRET=1``).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("SPFL_IMPL", "auto")
        if impl not in IMPLS:
            raise ValueError(f"SPFL_IMPL must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "triton" if (x.is_cuda and triton_available()) else "torch"
    if impl == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton path on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return impl
