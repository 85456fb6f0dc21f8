"""What a backdoor costs (``spfl bench backdoor``): full rounds of a backdoor run against the
clean run of the same size, side by side in one process.

Every variant is a :class:`~spfl_vmap.Simulator` on the same loaded dataset, partition and
cohorts; only the backdoor flags differ. Calls alternate over the variants (clean, variant 1,
..., clean, variant 1, ...) after one warm-up round each, so a noisy neighbour slows all alike,
and the table reports medians:

* ``round_s``: one round (local training with the batch transforms, update stages,
  aggregation, server step), without evaluation;
* ``eval_s``: one evaluation (test accuracy, plus the attack success rate of a backdoor run,
  which classifies the triggered test set too);
* ``run_ratio``: ``(round_s + eval_s / k) / (clean round_s + clean eval_s / k)`` for an
  evaluation every ``k`` rounds (``--frequency_of_the_test``), the cost of a whole run.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import torch

from ..builder import Simulator
from ..config import Config
from ..data import Dataset, load_dataset
from ..errors import ConfigError

#: name -> the flags that turn a clean config into the variant
VARIANTS: dict[str, dict[str, Any]] = {
    "badnets": {"bd_attack": "badnets"},
    "badnets+boost": {"bd_attack": "badnets", "bd_boost_auto": True},
    "dba": {"bd_attack": "dba"},
    "badnets+toolkit_defense": {"bd_attack": "badnets", "bd_defense": "toolkit_clip_noise", "bd_clip": 1.0, "bd_noise": 0.001},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_backdoor(
    base: Config,
    variants: Sequence[str],
    repeats: int = 5,
    data: Dataset | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Median round and evaluation seconds of ``base`` (clean) and each backdoor variant.

    Args:
        base: the clean run's config (no backdoor flags; ``by_frac`` / ``by_workers`` set the
            attackers of the variants, and are ignored by the clean run).
        variants: names from :data:`VARIANTS`.
        repeats: timed rounds per variant, after one warm-up round.
        data: a loaded dataset to share (default: loaded from ``base``).
        log: progress printer.

    Returns:
        ``{"config": {...}, "rows": [{"variant", "round_s", "eval_s", "round_ratio",
        "eval_ratio", "run_ratio"}]}``, the clean row first.

    Raises:
        ConfigError: an unknown variant, ``repeats < 1`` or a base with a backdoor attack.
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown backdoor variant(s) {', '.join(unknown)}; choose from: {', '.join(VARIANTS)}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if base.bd_attack != "none":
        raise ConfigError("the benchmark's base is the clean run: drop --bd_attack (the variants set it)")
    if not (base.by_frac or base.by_workers):
        base = base.replace(by_frac=0.1)
    rounds = repeats + 1
    # the clean run has no attackers: the Byzantine flags stay only on the variants
    clean = base.replace(by_frac=0.0, by_workers=0, comm_round=rounds, frequency_of_the_test=10**9)
    configs = {"clean": clean}
    for v in variants:
        configs[v] = base.replace(comm_round=rounds, frequency_of_the_test=10**9, **VARIANTS[v])
    ds = data if data is not None else load_dataset(base.dataset, base.data_dir, base.download,
                                                    synthetic_train=base.synthetic_train, synthetic_test=base.synthetic_test)
    sims = {name: Simulator(cfg, ds) for name, cfg in configs.items()}
    step: dict[str, list[float]] = {n: [] for n in sims}
    evals: dict[str, list[float]] = {n: [] for n in sims}
    for r in range(rounds):
        for name, sim in sims.items():
            t0 = time.perf_counter()
            sim.step()
            _sync(sim.device)
            t1 = time.perf_counter()
            sim.evaluation()
            _sync(sim.device)
            t2 = time.perf_counter()
            if r > 0:  # the first round warms up
                step[name].append(t1 - t0)
                evals[name].append(t2 - t1)
        log(f"  round {r + 1}/{rounds}" + (" (warm-up)" if r == 0 else ""))
    k = max(1, base.frequency_of_the_test)
    med = {n: (statistics.median(step[n]), statistics.median(evals[n])) for n in sims}
    c_round, c_eval = med["clean"]
    rows = []
    for name in sims:
        rs, es = med[name]
        rows.append({"variant": name, "round_s": rs, "eval_s": es, "round_ratio": rs / c_round, "eval_ratio": es / c_eval,
                     "run_ratio": (rs + es / k) / (c_round + c_eval / k)})
    meta = {"dataset": base.dataset, "model": base.model, "clients": base.client_num_in_total,
            "per_round": base.client_num_per_round, "partition": base.partition_method, "alpha": base.partition_alpha,
            "by_frac": base.by_frac, "by_workers": base.by_workers, "epochs": base.epochs, "batch_size": base.batch_size,
            "eval_every": k, "repeats": repeats, "device": str(sims["clean"].device), "threads": torch.get_num_threads(),
            "strategy": sims["clean"].trainer.strategy, "torch": torch.__version__}
    return {"config": meta, "rows": rows}


def format_backdoor_rows(rows: list[dict[str, Any]]) -> str:
    head = f"{'variant':<26}{'round s':>10}{'eval s':>10}{'round x':>10}{'eval x':>10}{'run x':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['variant']:<26}{r['round_s']:>10.3f}{r['eval_s']:>10.3f}{r['round_ratio']:>10.2f}"
                     f"{r['eval_ratio']:>10.2f}{r['run_ratio']:>8.2f}")
    return "\n".join(lines)


__all__ = ["VARIANTS", "bench_backdoor", "format_backdoor_rows"]
