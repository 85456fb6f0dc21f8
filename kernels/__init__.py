"""Fused kernels over the client dimension.

Each op lives in ``kernels/<stem>.py`` with a private Triton kernel ``_<stem>_kernel``, a launcher
``<stem>_triton``, a pure-torch twin ``<stem>_torch`` with the same signature, and a dispatcher
``<stem>(..., impl="auto")``. ``auto`` picks Triton for CUDA tensors and torch otherwise; the
environment variable ``SPFL_IMPL`` (``torch`` or ``triton``) overrides ``auto``.
"""

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
