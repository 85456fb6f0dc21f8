"""Shared test helpers."""

from __future__ import annotations

import torch

from spfl_vmap import Config, Simulator


def small_config(**kw) -> Config:
    base = dict(
        dataset="synthetic", synthetic_train=300, synthetic_test=100, model="lr", partition_method="hetero",
        partition_alpha=0.5, partition_min_samples=10, client_num_in_total=4, client_num_per_round=4,
        comm_round=1, epochs=2, batch_size=7, lr=0.05, frequency_of_the_test=1, progress=False, device="cpu",
    )
    base.update(kw)
    return Config(**base)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def final_params(cfg: Config, rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(initial global params, params after ``rounds`` rounds)."""
    sim = Simulator(cfg.replace(comm_round=max(cfg.comm_round, rounds)))
    w0 = sim.w.clone()
    for _ in range(rounds):
        sim.step()
    return w0, sim.w


class Killed(Exception):
    """Raised by :func:`kill_at` to stop a run as a kill would."""


def kill_at(round_idx: int):
    """An ``on_round`` callback that kills the run after round ``round_idx`` (its checkpoint,
    when due, is written first)."""

    def on_round(m):
        if m["round"] == round_idx:
            raise Killed

    return on_round
