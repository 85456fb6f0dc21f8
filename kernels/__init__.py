"""Fused kernels over the client dimension, installed and imported as ``spfl_kernels``.

The folder is ``kernels/`` at the top of the repository, but ``kernels`` is the import name of an
unrelated, widely installed PyPI distribution; pyproject.toml maps ``spfl_kernels`` to this folder.

Each op lives in ``kernels/<stem>.py`` with a private Triton kernel ``_<stem>_kernel``, a launcher
``<stem>_triton``, a pure-torch twin ``<stem>_torch`` with the same signature, and a dispatcher
``<stem>(..., impl="auto")``. ``auto`` picks Triton for CUDA tensors and torch otherwise; the
environment variable ``SPFL_IMPL`` (``torch`` or ``triton``) overrides ``auto``.
"""

if __name__ != "spfl_kernels":  # imported as ``kernels`` from the repository root: refuse the wrong name
    raise ImportError(f"spfl_vmap's kernels are imported as 'spfl_kernels', not {__name__!r}")

from .dispatch import resolve_impl
from .pairwise_sqdist import pairwise_sqdist, pairwise_sqdist_torch
from .clip_scale_noise_reduce import (
    clip_rows,
    clip_rows_torch,
    clip_scale_noise_reduce,
    clip_scale_noise_reduce_torch,
)
from .order_stats import order_stats, order_stats_torch

__all__ = [
    "resolve_impl",
    "pairwise_sqdist",
    "pairwise_sqdist_torch",
    "clip_rows",
    "clip_rows_torch",
    "clip_scale_noise_reduce",
    "clip_scale_noise_reduce_torch",
    "order_stats",
    "order_stats_torch",
]
