"""``spfl bench`` and ``bench/engine_bench.py`` at toy sizes (seconds, not measurements)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from spfl_vmap.experiments.bench import REF, bench_engine, build_workload, make_trainers, time_trainers
from spfl_vmap.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_bench_engine_table_and_json(tmp_path, capsys):
    out = tmp_path / "e.json"
    rc = main(["bench", "engine", "--model", "lr", "--clients", "6", "--steps", "2", "--batch_size", "4",
               "--repeats", "1", "--strategies", "auto,vmap,loop", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "loop/this" in text and "vectorized auto=vmap" in text and REF in text
    res = json.loads(out.read_text())
    assert res["config"]["client_steps_per_round"] == 6 * 2
    rows = {r["engine"]: r for r in res["rows"]}
    assert rows[REF]["speedup_vs_loop"] == pytest.approx(1.0)
    for r in rows.values():
        assert r["s_per_round"] > 0 and r["peak_mem_mb"] >= 0 and r["client_steps_per_s"] > 0


def test_bench_engine_conv_auto_is_loop_on_cpu():
    res = bench_engine("cnn", 2, steps=1, batch_size=3, input_shape=(1, 8, 8), repeats=1)
    assert {r["strategy"] for r in res["rows"]} == {"loop", "reference-loop"}


def test_workload_gives_every_client_steps_full_batches():
    w = build_workload("lr", 5, per_round=3, steps=4, batch_size=2)
    assert len(w.ids) == 3 and all(w.sim.counts[i] == 8 for i in w.ids)
    assert w.client_steps == 3 * 4
    t = time_trainers(w, make_trainers(w, ["vmap"]), repeats=2)
    assert all(len(v.seconds) == 2 for v in t.values())


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["bench", "nope"], "unknown bench"),
        (["bench", "engine", "--model", "nope", "--clients", "2"], "unknown model"),
        (["bench", "engine", "--clients", "2", "--per_round", "3"], "cannot exceed"),
        (["bench", "engine", "--clients", "2", "--strategies", "fast"], "--strategies"),
        (["bench", "engine", "--clients", "2", "--repeats", "0"], "--repeats"),
        (["bench", "scale", "--clients", "0"], "--clients"),
    ],
)
def test_bench_user_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_bench_scale_writes_json_and_png(tmp_path):
    rc = main(["bench", "scale", "--model", "lr", "--clients", "2,4", "--loop_max", "2", "--batch_size", "3",
               "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert [(r["clients"], r["engine"] == REF) for r in rows] == [(2, False), (2, True), (4, False)]
    assert (tmp_path / "scale.png").stat().st_size > 1000


def test_gpu_engine_results_smoke_path():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import engine_bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    res = engine_bench.gpu_engine_results(sizes="smoke", device="cpu")
    assert set(res["workloads"]) == {"pfl_cifar10_cnn", "lr_1000", "cnn_1000", "lr_dirichlet_1000_100"}
    assert {r["engine"] for r in res["workloads"]["lr_dirichlet_1000_100"]["rows"]} == {"vectorized vmap off", "vectorized vmap trace", REF}
    for name, w in res["workloads"].items():
        assert "error" not in w, w
        assert any(r["engine"] == REF for r in w["rows"])
    proj = res["workloads"]["pfl_cifar10_cnn"]["projected_pfl_1500_rounds_s"]
    assert proj[REF] > 0 and len(proj) == 2
    json.dumps(res)  # JSON-serialisable, as gpu_check writes it
