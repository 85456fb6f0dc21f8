"""Plain timing helpers for the fused kernels (no pytest): used by ``bench_kernels.py`` and
``gpu_check.py``.

Each ``bench_<stem>`` times the Triton launcher and the torch twin on one shape and returns a list
of flat dicts (one per implementation) with the median time and the achieved rate:

- ``pairwise_sqdist`` is compute-bound: TFLOP/s over the useful work ``N (N + 1) D`` flops (the
  ``N (N + 1) / 2`` distinct pairs, 2 flops per multiply-add), so the kernel's symmetry saving
  shows up as a higher rate. The ceiling is the measured fp32 (non-tf32) matmul rate.
- ``clip_scale_noise_reduce`` and ``order_stats`` are memory-bound: GB/s over the ideal traffic
  ``N D`` input elements read once plus the ``[D]`` fp32 output. The two-pass Triton path reads ``U``
  twice, so its ideal fraction is about 0.5 unless the second pass hits in L2. The ceiling is the
  measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

from spfl_kernels.clip_scale_noise_reduce import clip_scale_noise_reduce_torch, clip_scale_noise_reduce_triton
from spfl_kernels.order_stats import order_stats_torch, order_stats_triton
from spfl_kernels.pairwise_sqdist import pairwise_sqdist_torch, pairwise_sqdist_triton


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: torch.device | str, warmup: int = 1, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds: CUDA events on the GPU, ``perf_counter`` on the CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_ceilings(device: torch.device | str = "cuda", copy_bytes: int = 2 << 30, mm: int = 8192) -> dict:
    """The card's measured ceilings: copy bandwidth and fp32 / tf32 matmul rates.

    Args:
        device: where to measure.
        copy_bytes: size of the copied tensor (read + write are both counted).
        mm: square matmul size.

    Returns:
        ``{"copy_gbps", "fp32_tflops", "tf32_tflops"}``.
    """
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=5)
    copy_gbps = 2 * copy_bytes / t / 1e9
    del src, dst
    a = torch.randn(mm, mm, device=device)
    b = torch.randn(mm, mm, device=device)
    flops = 2 * mm**3
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        fp32 = flops / time_fn(lambda: a @ b, device, warmup=1, reps=3) / 1e12
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = flops / time_fn(lambda: a @ b, device, warmup=1, reps=3) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    del a, b
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"copy_gbps": copy_gbps, "fp32_tflops": fp32, "tf32_tflops": tf32}


def _make_u(N: int, D: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return torch.randn((N, D), generator=g, device=device, dtype=torch.float32).to(dtype)


def _row(op: str, impl: str, N: int, D: int, dtype: torch.dtype, t: float, **extra) -> dict:
    return {"op": op, "impl": impl, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""), "ms": t * 1e3, **extra}


def _rate_fields(work: float, t: float, unit: str, ceiling: float | None) -> dict:
    rate = work / t / (1e12 if unit == "TFLOP/s" else 1e9)
    out = {"unit": unit, "rate": rate}
    if ceiling:
        out["fraction_of_ceiling"] = rate / ceiling
    return out


def bench_pairwise_sqdist(
    N: int, D: int, device: str, impls=("torch", "triton"), dtype=torch.float32, ceilings: dict | None = None,
    warmup: int = 1, reps: int = 3,
) -> list[dict]:
    """Time ``pairwise_sqdist``; TFLOP/s over ``N (N + 1) D`` useful flops vs fp32 matmul."""
    U = _make_u(N, D, device, dtype)
    fns = {"torch": lambda: pairwise_sqdist_torch(U), "triton": lambda: pairwise_sqdist_triton(U)}
    rows = []
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the twin must do fp32 work too
    try:
        for impl in impls:
            t = time_fn(fns[impl], device, warmup, reps)
            ceil = (ceilings or {}).get("fp32_tflops")
            rows.append(_row("pairwise_sqdist", impl, N, D, dtype, t, **_rate_fields(N * (N + 1) * D, t, "TFLOP/s", ceil)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return rows


def bench_clip_scale_noise_reduce(
    N: int, D: int, device: str, impls=("torch", "triton"), dtype=torch.float32, ceilings: dict | None = None,
    warmup: int = 1, reps: int = 5,
) -> list[dict]:
    """Time ``clip_scale_noise_reduce`` with clipping and noise on; GB/s vs copy bandwidth."""
    U = _make_u(N, D, device, dtype)
    w = torch.full((N,), 1.0 / N, device=device)
    max_norm = math.sqrt(D)  # about half the rows clipped
    fns = {
        "torch": lambda: clip_scale_noise_reduce_torch(U, max_norm, w, 0.1, 1),
        "triton": lambda: clip_scale_noise_reduce_triton(U, max_norm, w, 0.1, 1),
    }
    nbytes = N * D * U.element_size() + 4 * D
    ceil = (ceilings or {}).get("copy_gbps")
    return [
        _row("clip_scale_noise_reduce", impl, N, D, dtype, t, **_rate_fields(nbytes, t, "GB/s", ceil))
        for impl in impls
        for t in [time_fn(fns[impl], device, warmup, reps)]
    ]


def bench_order_stats(
    N: int, D: int, device: str, impls=("torch", "triton"), dtype=torch.float32, ceilings: dict | None = None,
    ops=("median", "trimmed_mean", "bulyan_mean"), warmup: int = 1, reps: int = 3,
) -> list[dict]:
    """Time ``order_stats`` for each op; GB/s vs copy bandwidth."""
    U = _make_u(N, D, device, dtype)
    k = {"median": 0, "trimmed_mean": N // 4, "bulyan_mean": max(1, N - 2 * (N // 4))}
    nbytes = N * D * U.element_size() + 4 * D
    ceil = (ceilings or {}).get("copy_gbps")
    rows = []
    for op in ops:
        fns = {"torch": lambda: order_stats_torch(U, op, k[op]), "triton": lambda: order_stats_triton(U, op, k[op])}
        for impl in impls:
            t = time_fn(fns[impl], device, warmup, reps)
            rows.append(_row(f"order_stats:{op}", impl, N, D, dtype, t, **_rate_fields(nbytes, t, "GB/s", ceil)))
    return rows


def free(device: str) -> None:
    """Release cached blocks between big shapes."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: list[dict]) -> str:
    """A compact fixed-width table of bench rows."""
    head = f"{'op':<26} {'impl':<6} {'N':>5} {'D':>10} {'ms':>10} {'rate':>9} {'unit':<8} {'frac':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('op', '?'):<26} {r.get('impl', ''):<6} ERROR {r['error'][:60]}")
            continue
        frac = r.get("fraction_of_ceiling")
        lines.append(
            f"{r['op']:<26} {r['impl']:<6} {r['N']:>5} {r['D']:>10} {r['ms']:>10.3f} {r['rate']:>9.2f} "
            f"{r['unit']:<8} {'' if frac is None else f'{frac:6.2f}'}"
        )
    return "\n".join(lines)
