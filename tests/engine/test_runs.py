"""Run-level behaviour: determinism, resume, run directory, API."""

import json

import pytest
import torch

from helpers import Killed, kill_at, small_config
from spfl_vmap import Simulator, run
from spfl_vmap.runner import MetricsLog


def strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in ("wall_s", "round_s", "clients_per_s")} for r in rows]


def test_same_seed_same_metrics():
    cfg = small_config(comm_round=3, client_num_in_total=6, client_num_per_round=3)
    a, b = run(cfg), run(cfg)
    assert strip_timing(a.rows) == strip_timing(b.rows)
    c = run(cfg.replace(seed=1))
    assert strip_timing(a.rows) != strip_timing(c.rows)


def test_client_sampling_is_seeded_per_round():
    sim = Simulator(small_config(client_num_in_total=20, client_num_per_round=5, synthetic_train=400))
    s1, s2 = sim.sample_clients(1), sim.sample_clients(2)
    assert s1 == sim.sample_clients(1) and s1 != s2 and len(s1) == 5 and len(set(s1)) == 5


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    hist = run(small_config(comm_round=4, frequency_of_the_test=2, out=str(out)))
    for f in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (out / f).is_file(), f
    rows = MetricsLog(out / "metrics.jsonl").read()
    assert [r["round"] for r in rows] == [2, 4]
    for key in ("round", "test_acc", "test_loss", "train_loss", "wall_s", "clients_per_s"):
        assert key in rows[0]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["comm_round"] == 4 and "version" in cfg and "strategy" in cfg
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == hist.final["test_acc"]


def test_resume_is_bit_identical(tmp_path):
    cfg = small_config(comm_round=6, frequency_of_the_test=1, client_num_in_total=6, client_num_per_round=3,
                       momentum=0.9, server_momentum=0.5, checkpoint_every=2)
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = run(cfg.replace(out=str(full_dir)))

    with pytest.raises(Killed):  # dies after round 3; the last checkpoint is round 2
        run(cfg.replace(out=str(cut_dir)), on_round=kill_at(3))
    assert [r["round"] for r in MetricsLog(cut_dir / "metrics.jsonl").read()] == [1, 2, 3]
    resumed = run(cfg.replace(out=str(cut_dir)), resume_dir=cut_dir)
    assert strip_timing(resumed.rows) == strip_timing(full.rows)
    assert [r["round"] for r in MetricsLog(cut_dir / "metrics.jsonl").read()] == list(range(1, 7))
    a = torch.load(full_dir / "checkpoint.pt", weights_only=True)["w"]
    b = torch.load(cut_dir / "checkpoint.pt", weights_only=True)["w"]
    assert torch.equal(a, b)


def test_simulator_steps_round_by_round():
    sim = Simulator(small_config(comm_round=2, frequency_of_the_test=2))
    m1 = sim.step()
    assert m1["round"] == 1 and "test_acc" not in m1
    m2 = sim.step()
    assert "test_acc" in m2 and sim.done
    acc, loss = sim.evaluate()
    assert acc == m2["test_acc"] and loss == m2["test_loss"]


def test_library_leaves_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    run(small_config(comm_round=1))
    assert torch.equal(before, torch.random.get_rng_state())


@pytest.mark.parametrize("model,dataset", [("cnn_cifar", "synthetic"), ("convnet", "synthetic"), ("resnet20", "synthetic")])
def test_other_models_train_one_round(model, dataset):
    cfg = small_config(model=model, dataset=dataset, synthetic_train=60, synthetic_test=20, epochs=1, batch_size=16,
                       client_num_in_total=2, client_num_per_round=2, partition_method="homo", model_width=8)
    sim = Simulator(cfg)
    w0 = sim.w.clone()
    m = sim.step()
    assert torch.isfinite(sim.w).all() and not torch.equal(sim.w, w0) and 0 <= m["test_acc"] <= 1
