"""What batching the inversion attack buys (``spfl bench inversion``).

The same ``M`` problems with ``R`` restarts each are attacked two ways, side by side in one
process:

* ``batched``: one call of :func:`~spfl_vmap.attacks.inversion.invert` on the ``[M, D]`` uploads,
  a single optimization over ``[M, R, B, C, H, W]``;
* ``loop``: the peers' way, a Python loop over problems and restarts, each an ``invert`` call on
  one upload with one restart (the same seeds: ``problem_ids=[m]`` and the restart's own
  generator, so both compute the same reconstructions).

Calls alternate (batched, loop, batched, loop, ...) after one warm-up each, so a noisy
neighbour slows both alike; the table reports medians and ``speedup = loop / batched``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..attacks.inversion import Upload, invert, make_upload_fn
from ..engine.params import init_model
from ..errors import ConfigError
from ..rng import generator


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_inversion(
    attack: str = "ig", model: str = "lr", input_shape: tuple[int, int, int] = (1, 28, 28), problems: int = 16,
    restarts: int = 4, batch: int = 1, iterations: int = 20, repeats: int = 3, device: str = "cpu",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Median seconds of the batched attack and of the per-problem loop on the same problems.

    Uploads are FedSGD gradients of random images at an untrained model (what they contain does
    not change the cost of an iteration).

    Returns:
        ``{"config": {...}, "rows": [{"variant", "seconds", "problems_per_s"}], "speedup"}``.
    """
    if min(problems, restarts, batch, iterations, repeats) < 1:
        raise ConfigError("--problems, --restarts, --batch, --iterations and --repeats must be >= 1")
    dev = torch.device(device)
    net = init_model(model, input_shape, 10, 64, 0).to(dev)
    params = {k: v.detach() for k, v in net.named_parameters()}
    g = generator(0, "bench-inversion")
    x = torch.randn(problems, batch, *input_shape, generator=g).to(dev)
    y = torch.randint(0, 10, (problems, batch), generator=g).to(dev)
    up = make_upload_fn(net, params, Upload())
    target = torch.stack([up(x[m], F.one_hot(y[m], 10).float()) for m in range(problems)]).detach()  # (M, D)
    kw = dict(num_images=batch, input_shape=input_shape, iterations=iterations)

    def batched() -> None:
        invert(attack, net, params, target, restarts=restarts, **kw)

    def loop() -> None:
        for m in range(problems):
            for r in range(restarts):  # one restart per call, seeded as the batched run's (m, r)
                invert(attack, net, params, target[m : m + 1], restarts=1, problem_ids=[m], restart_offset=r, **kw)

    variants = {"batched": batched, "loop": loop}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
        _sync(dev)
    for i in range(repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times[name].append(time.perf_counter() - t0)
        log(f"  repeat {i + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"variant": k, "seconds": med[k], "problems_per_s": problems * restarts / med[k]} for k in variants]
    cfg = {"attack": attack, "model": model, "input_shape": list(input_shape), "problems": problems, "restarts": restarts,
           "batch": batch, "iterations": iterations, "repeats": repeats, "device": str(dev),
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    return {"config": cfg, "rows": rows, "speedup": med["loop"] / med["batched"]}


def format_inversion_rows(res: dict[str, Any]) -> str:
    lines = ["| variant | median s | (problem x restart)/s |", "|---|---:|---:|"]
    lines += [f"| {r['variant']} | {r['seconds']:.3f} | {r['problems_per_s']:.1f} |" for r in res["rows"]]
    lines.append(f"\nspeedup (loop / batched): {res['speedup']:.1f}x")
    return "\n".join(lines)
