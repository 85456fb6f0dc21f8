"""``spfl sweep``: grid and random points, flag validation, sweep points equal to their separate
runs (sequential and vectorized), resume after a kill, one sweep per directory."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import Killed, rel_err
from spfl_vmap.cli import main
from spfl_vmap.errors import ConfigError
from spfl_vmap.experiments.sweep import (
    Range,
    SweepSpec,
    load_sweep_file,
    parse_grid,
    parse_range,
    point_configs,
    run_sweep,
)
from spfl_vmap.runner import RunLock, run

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = dict(dataset="synthetic", synthetic_train=300, synthetic_test=100, client_num_in_total=6, client_num_per_round=4,
            comm_round=3, batch_size=7, frequency_of_the_test=1, progress=False, device="cpu")
FLAGS = ["--dataset", "synthetic", "--synthetic_train", "300", "--synthetic_test", "100", "--client_num_in_total", "6",
         "--client_num_per_round", "4", "--batch_size", "7", "--frequency_of_the_test", "1", "--device", "cpu", "--no-progress"]


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def csv_without(path: Path, drop: tuple[str, ...] = ("wall_s", "mode")) -> list[dict]:
    with open(path) as fh:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


# ---- grid, random search, validation ---------------------------------------------------------------
def test_grid_is_the_cartesian_product_first_flag_slowest():
    spec = SweepSpec(base={"dataset": "digits"}, grid=parse_grid(["lr=0.01,0.1", "by-defense=krum,median", "seed=0,1"]))
    pts = spec.points()
    assert len(pts) == 8
    assert pts[0] == {"lr": 0.01, "by_defense": "krum", "seed": 0}
    assert pts[1] == {"lr": 0.01, "by_defense": "krum", "seed": 1}
    assert pts[-1] == {"lr": 0.1, "by_defense": "median", "seed": 1}
    assert all(isinstance(p["seed"], int) and isinstance(p["lr"], float) for p in pts)  # spfl run's types
    # values holding commas are separated by ';'
    assert parse_grid(["by_defense_params=tau=5,n_iter=3;tau=10"]) == {"by_defense_params": ["tau=5,n_iter=3", "tau=10"]}


@pytest.mark.parametrize("items, msg", [
    (["lrr=0.1,0.2"], "unknown flag 'lrr' (did you mean lr?)"),
    (["lr=0.1,abc"], "--lr expects float, got 'abc'"),
    (["comm_round=2.5"], "--comm_round expects int"),
    (["out=a,b"], "--out cannot be swept"),
    (["lr=0.1,0.1"], "repeats the value 0.1"),
    (["lr"], "must look like NAME=V1,V2"),
])
def test_bad_grid_is_a_one_line_error(items, msg):
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_grid(items)


def test_bad_flags_are_one_line_errors_on_the_command_line(tmp_path, capsys):
    cases = [
        (["--grid", "lrr=0.1"], "unknown flag 'lrr'"),
        (["--grid", "lr=0.1", "--lr", "0.2"], "--lr is given as a base flag and swept"),
        (["--grid", "by_defense=krum,nosuch"], "sweep point by_defense=nosuch"),
        (["--random", "3"], "--random N needs at least one --range"),
        (["--range", "lr=log:0.001:0.1"], "give --random N as well"),
        (["--random", "2", "--range", "lr=log:0:0.1"], "a log range needs LOW > 0"),
        (["--random", "2", "--range", "by_defense=0:1"], "by_defense is not a number"),
        ([], "a sweep needs --grid, --random or a --sweep_file"),
    ]
    for argv, msg in cases:
        assert main(["sweep", *argv, *FLAGS, "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "s").exists()  # refused before anything was written


def test_invalid_point_is_refused_before_any_work(tmp_path):
    # Krum needs n >= 2f + 3: a point with too few clients is named before any data loads
    spec = SweepSpec(base={**BASE, "by_frac": 0.25}, grid={"by_defense": ["mean", "krum"]})
    with pytest.raises(ConfigError, match="sweep point by_defense=krum"):
        point_configs(spec, tmp_path)


def test_random_points_are_seeded_and_within_their_ranges():
    name, r = parse_range("lr=log:0.001:0.1")
    assert (name, r) == ("lr", Range(0.001, 0.1, True))

    def spec(seed: int) -> SweepSpec:
        return SweepSpec(random=200, ranges={"lr": r, "momentum": Range(0.0, 0.9), "epochs": Range(1, 3)},
                         choices={"by_defense": ["krum", "median"]}, sweep_seed=seed)

    a, b = spec(0).points(), spec(1).points()
    assert a == spec(0).points() and a != b
    lrs = torch.tensor([p["lr"] for p in a], dtype=torch.float64)
    assert bool(((lrs >= 0.001) & (lrs <= 0.1)).all())
    # log-uniform: log10(lr) is uniform on [-3, -1], so its mean is -2 (200 draws: sd 0.58/sqrt(200) = 0.04)
    assert abs(float(lrs.log10().mean()) + 2) < 0.15
    assert all(0 <= p["momentum"] <= 0.9 for p in a)
    assert {p["epochs"] for p in a} == {1, 2, 3} and all(isinstance(p["epochs"], int) for p in a)
    assert {p["by_defense"] for p in a} == {"krum", "median"}
    # grid x random: every draw at every grid point
    both = SweepSpec(grid={"seed": [0, 1]}, random=3, ranges={"lr": r}).points()
    assert [p["seed"] for p in both] == [0, 0, 0, 1, 1, 1] and [p["lr"] for p in both[:3]] == [p["lr"] for p in both[3:]]


def test_sweep_file(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("base: {dataset: digits, comm-round: 4}\ngrid: {lr: [0.01, 0.1]}\n"
                 "random: {n: 2, seed: 3, ranges: {momentum: '0:0.9'}, choices: {by_defense: [krum, median]}}\n")
    spec = SweepSpec(**load_sweep_file(f))
    assert spec.base == {"dataset": "digits", "comm_round": 4} and spec.grid == {"lr": [0.01, 0.1]}
    assert spec.random == 2 and spec.sweep_seed == 3 and len(spec.points()) == 4
    assert SweepSpec.from_dict(spec.to_dict()).to_dict() == spec.to_dict()  # what sweep.json stores reads back
    f.write_text("grid: {lr: [0.01]}\nbase: {nosuch: 1}\n")
    with pytest.raises(ConfigError, match="base: unknown flag 'nosuch'"):
        load_sweep_file(f)


# ---- points equal their separate runs ----------------------------------------------------------------
def test_sequential_points_equal_their_separate_runs(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--grid", "by_defense=mean,median", "--comm_round", "3", *FLAGS, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[1/2] by_defense=mean -> test_acc" in text and "[2/2] by_defense=median -> test_acc" in text
    spec = SweepSpec(base=BASE, grid={"by_defense": ["mean", "median"]})
    for cfg in point_configs(spec, out):
        d, ref_dir = Path(cfg.out), tmp_path / "ref" / Path(cfg.out).name
        ref = run(cfg.replace(out=str(ref_dir)))  # the same point as its own spfl run
        key = ("round", "test_acc", "test_loss", "train_loss")
        assert [[r[k] for k in key] for r in rows_of(d)] == [[r[k] for k in key] for r in rows_of(ref_dir)]  # bit-identical
        saved = json.loads((d / "config.json").read_text())["config"]
        assert saved == {**json.loads((ref_dir / "config.json").read_text())["config"], "out": str(d)}
        assert set(os.listdir(d)) >= {"config.json", "metrics.jsonl", "summary.json", "accuracy.png"}
        assert json.loads((d / "summary.json").read_text())["final_test_acc"] == ref.summary["final_test_acc"]
    rows = csv_without(out / "sweep.csv", drop=())
    assert [r["mode"] for r in rows] == ["sequential"] * 2 and [r["status"] for r in rows] == ["ok"] * 2
    for name in ("sweep.md", "sweep.json", "curves.png", "final_vs_by_defense.png"):
        assert (out / name).is_file()


@pytest.mark.parametrize("optimizer, ranges", [
    ("sgd", {"lr": Range(0.01, 0.1), "momentum": Range(0.0, 0.9), "wd": Range(0.0, 0.01), "server_lr": Range(0.5, 1.0)}),
    ("adam", {"lr": Range(0.005, 0.02), "wd": Range(0.0, 0.01)}),  # Adam amplifies rounding at large lr
])
def test_vectorized_points_equal_their_separate_runs(tmp_path, optimizer, ranges):
    """Three random points, each with its own client lr, momentum, weight decay and server lr,
    trained as one [points x clients] program, each equal to its own run."""
    spec = SweepSpec(base={**BASE, "dataset": "digits", "client_optimizer": optimizer, "checkpoint_every": 3}, random=3,
                     ranges=ranges)
    points = run_sweep(spec, tmp_path / "sweep", log=lambda s: None)
    assert all(p.mode == "vectorized (group 1)" for p in points)
    assert len({p.values["lr"] for p in points}) == 3
    for p in points:
        ref = run(p.cfg.replace(out=None))
        got = rows_of(p.dir)
        assert [r["round"] for r in got] == [r["round"] for r in ref.rows]
        for a, b in zip(got, ref.rows):
            assert abs(a["test_loss"] - b["test_loss"]) <= 1e-5 * abs(b["test_loss"]), p.label
            assert abs(a["test_acc"] - b["test_acc"]) <= 1e-5 * abs(b["test_acc"]), p.label
        w = torch.load(p.dir / "checkpoint.pt", weights_only=True)["w"]
        w_ref = torch.cat([v.reshape(-1) for v in ref.model_state.values()])
        assert rel_err(w, w_ref) <= 1e-5, p.label


@pytest.mark.parametrize("base, grid", [
    ({"dp_mode": "user", "client_num_in_total": 12, "client_num_per_round": 4}, {"dp_sigma": [0.3, 1.0], "grad_norm": [0.5, 2.0]}),
    ({"by_attack": "gaussian", "by_workers": 1, "by_defense": "median"}, {"by_attack_params": ["sigma=0.1", "sigma=10"]}),
    ({"dp_mode": "example", "momentum": 0.5}, {"dp_sigma": [0.5, 1.5], "grad_norm": [0.3, 1.0], "lr": [0.05, 0.1]}),
])
def test_server_side_scalars_vectorize(tmp_path, base, grid):
    """Points that differ in DP-FedAvg's or DP-SGD's noise multiplier and clip, or in an
    attack's strength, share local training ([points x clients] in one call) and equal their
    separate runs."""
    spec = SweepSpec(base={**BASE, **base}, grid=grid)
    points = run_sweep(spec, tmp_path / "sweep", log=lambda s: None)
    assert all(p.mode == "vectorized (group 1)" for p in points)
    finals = set()
    for p in points:
        ref = run(p.cfg.replace(out=None))
        got = rows_of(p.dir)
        for a, b in zip(got, ref.rows):
            assert abs(a["test_loss"] - b["test_loss"]) <= 1e-5 * abs(b["test_loss"]), p.label
        finals.add(round(got[-1]["test_loss"], 6))
    assert len(finals) == len(points)  # the swept values took effect


def test_vectorize_off_and_blocked_groups_run_one_by_one(tmp_path):
    spec = SweepSpec(base={**BASE, "engine": "loop"}, grid={"lr": [0.02, 0.1]})
    lines: list[str] = []
    points = run_sweep(spec, tmp_path / "a", log=lines.append)
    assert [p.mode for p in points] == ["sequential"] * 2
    spec = SweepSpec(base=BASE, grid={"lr": [0.02, 0.1]})
    points = run_sweep(spec, tmp_path / "b", vectorize="off", log=lines.append)
    assert [p.mode for p in points] == ["sequential"] * 2


# ---- resume, locking ---------------------------------------------------------------------------------
@pytest.mark.parametrize("vectorize", ["off", "auto"])
def test_sweep_resumes_after_an_interruption(tmp_path, vectorize):
    """Killed in point 1's round 2 (each round checkpointed): the rerun skips finished points,
    continues the interrupted ones from their checkpoints, and ends with the same table."""
    spec = SweepSpec(base={**BASE, "checkpoint_every": 1, "comm_round": 3}, grid={"lr": [0.02, 0.05, 0.1]})
    full = tmp_path / "full"
    run_sweep(spec, full, vectorize=vectorize, log=lambda s: None)

    def kill(i: int, m: dict) -> None:
        if i == 1 and m["round"] == 2:
            raise Killed

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run_sweep(spec, out, vectorize=vectorize, on_round=kill, log=lambda s: None)
    lines: list[str] = []
    run_sweep(spec, out, vectorize=vectorize, log=lines.append)
    text = "\n".join(lines)
    if vectorize == "off":
        assert "[1/3] lr=0.02: finished earlier, skipped" in text
        assert "lr=0.05: resuming" in text and "after round 2" in text
    else:  # the group was interrupted together: point 0 after round 2, points 1 and 2 after round 1 or 2
        assert "resuming" in text and "finished earlier" not in text
    a, b = csv_without(full / "sweep.csv"), csv_without(out / "sweep.csv")
    assert [r["point"] for r in a] == [r["point"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["status"] == rb["status"] == "ok" and ra["rounds"] == rb["rounds"]
        for k in ("final_test_acc", "best_test_acc", "final_test_loss"):
            if vectorize == "off":
                assert ra[k] == rb[k]  # bit-identical
            else:  # catch-up rounds stack fewer points: equal to rounding
                assert math.isclose(float(ra[k]), float(rb[k]), rel_tol=1e-5)
    for p in range(3):
        d = next((out / "points").glob(f"{p:03d}-*"))
        assert [r["round"] for r in rows_of(d)] == [1, 2, 3]  # no row lost or repeated


def test_sweep_resumes_after_sigkill(tmp_path):
    """A real kill: the sweep process is SIGKILLed once its first point has finished."""
    out = tmp_path / "s"
    argv = ["sweep", "--grid", "lr=0.02,0.1", "--comm_round", "12", "--checkpoint_every", "1", "--vectorize", "off",
            *FLAGS, "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spfl_vmap", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while not list((out / "points").glob("000-*/summary.json")) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list((out / "points").glob("000-*/summary.json")), proc.stderr.read().decode()[-500:]
    lines: list[str] = []
    spec = SweepSpec(base={**BASE, "comm_round": 12, "checkpoint_every": 1}, grid={"lr": [0.02, 0.1]})
    run_sweep(spec, out, vectorize="off", log=lines.append)  # the same sweep, continued
    assert "[1/2] lr=0.02: finished earlier, skipped" in "\n".join(lines)
    run_sweep(spec, tmp_path / "full", vectorize="off", log=lambda s: None)
    assert csv_without(out / "sweep.csv") == csv_without(tmp_path / "full" / "sweep.csv")


def test_resume_flag_and_a_different_sweep_is_refused(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--grid", "lr=0.02,0.1", "--comm_round", "2", *FLAGS, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["sweep", "--resume", str(out)]) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert main(["sweep", "--grid", "lr=0.02,0.1", "--comm_round", "3", *FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a different sweep (base.comm_round differs)" in err and err.count("\n") == 1


def test_two_sweeps_into_one_directory_are_refused(tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    with RunLock(out, holder="spfl sweep"):  # another sweep holds the directory
        assert main(["sweep", "--grid", "lr=0.02,0.1", "--comm_round", "2", *FLAGS, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {out} is in use by spfl sweep pid {os.getpid()}" in err and err.count("\n") == 1
    assert not (out / "sweep.json").exists() and not (out / "points").exists()


def test_a_failing_point_is_recorded_and_the_others_run(tmp_path, capsys):
    """A point whose data is missing fails in one line; the sweep goes on and exits with status 1."""
    out = tmp_path / "s"
    argv = ["sweep", "--grid", "dataset=digits,mnist", "--comm_round", "1", "--data_dir", str(tmp_path / "nodata"),
            *FLAGS[2:], "--out", str(out)]
    assert main(argv) == 1
    text = capsys.readouterr().out
    assert "[1/2] dataset=digits -> test_acc" in text and "[2/2] dataset=mnist -> failed: " in text
    rows = csv_without(out / "sweep.csv", drop=())
    assert rows[0]["status"] == "ok" and rows[1]["status"].startswith("failed: ") and rows[1]["final_test_acc"] == ""
