"""A module added through the public stage protocol alone (``spfl_vmap.stages``), without editing
the round loop or the builder: an update stage that zeroes one client's update, a stateful
stage whose state survives a checkpoint, and a read-only audit."""

from __future__ import annotations

import pytest
import torch

from helpers import Killed, kill_at, small_config
from spfl_vmap import Simulator, run
from spfl_vmap.stages import Audit, EvalHook, Guard, RoundContext, Stage, UpdateStage


class ZeroClient(UpdateStage):
    """Zeroes the update of one client id whenever it is sampled."""

    name = "zero_client"

    def __init__(self, client: int) -> None:
        self.client = client

    def apply(self, ctx: RoundContext, U: torch.Tensor):
        hit = torch.tensor([c == self.client for c in ctx.client_ids], device=U.device)  # (N,)
        return torch.where(hit[:, None], torch.zeros_like(U), U), {"zeroed": int(hit.sum())}


class Capture(Audit):
    """Keeps a copy of the U the server received."""

    name = "capture"

    def apply(self, ctx: RoundContext, U: torch.Tensor):
        self.U, self.ids, self.weights = U.clone(), list(ctx.client_ids), ctx.weights.clone()
        return None, {}


class RoundCounter(Guard, EvalHook):
    """State kept across rounds and checkpointed: how many rounds it has accounted."""

    name = "counter"

    def __init__(self) -> None:
        self.rounds = 0

    def after_round(self, ctx):
        self.rounds += 1
        return None, {}

    def evaluate(self, ctx, model, params):
        return None, {"counted_rounds": self.rounds}

    def state_dict(self):
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = int(state["rounds"])


def test_toy_update_stage_zeroes_one_client():
    cfg = small_config(client_num_in_total=4, client_num_per_round=4, comm_round=1)
    plain_cap = Capture()
    plain = Simulator(cfg, stages=[plain_cap])
    plain.step()
    cap = Capture()
    sim = Simulator(cfg, stages=[ZeroClient(2), cap])
    w0 = sim.w.clone()
    m = sim.step()
    assert m["zeroed"] == 1
    i = cap.ids.index(2)
    assert torch.equal(cap.U[i], torch.zeros_like(cap.U[i]))
    others = [j for j in range(len(cap.ids)) if j != i]
    assert torch.equal(cap.U[others], plain_cap.U[others]) and plain_cap.U[i].abs().sum() > 0
    # the server applied FedAvg's weighted mean of exactly what the stage returned
    expect = (cap.weights[:, None] * cap.U).sum(0) / cap.weights.sum()
    torch.testing.assert_close(sim.w - w0, expect, rtol=1e-5, atol=1e-7)


def test_stage_state_is_checkpointed(tmp_path):
    cfg = small_config(comm_round=3, checkpoint_every=1)
    full = run(cfg.replace(out=str(tmp_path / "full")), stages=[RoundCounter()])
    assert full.final["counted_rounds"] == 3

    with pytest.raises(Killed):
        run(cfg.replace(out=str(tmp_path / "cut")), on_round=kill_at(2), stages=[RoundCounter()])
    resumed = run(cfg.replace(out=str(tmp_path / "cut")), resume_dir=tmp_path / "cut", stages=[RoundCounter()])
    assert resumed.final["counted_rounds"] == 3  # restored 2 from the checkpoint, then one more
    assert resumed.summary["counted_rounds"] == 3


def test_a_stage_must_implement_a_protocol():
    class Nothing(Stage):
        name = "nothing"

    with pytest.raises(TypeError, match="implements none"):
        Simulator(small_config(), stages=[Nothing()])


def test_stage_names_must_be_unique():
    with pytest.raises(ValueError, match="named 'capture'"):
        Simulator(small_config(), stages=[Capture(), Capture()])
