"""The client dimension sharded over torch.distributed (``spfl_vmap.distributed``).

Two-process gloo jobs on the CPU, started from here: one job (``tests/distributed_job.py``, two
plain processes with torchrun's environment) runs FedAvg ``lr`` through the ``spfl`` command with
``--dist_gather`` (straight, and checkpointed then resumed by both ranks) and, through
``spfl_vmap.run``, FedAvg ``lr`` and ``cnn``, Krum under a Gaussian attack, DP-FedAvg, DP-SGD and
a DBA backdoor; then a run in which rank 1 raises. Each result is compared with the same config
run here in one process:

* every update row gathered (Krum, DBA's attack stages, ``--dist_gather``): bit-identical model
  and metrics;
* mean (FedAvg, DP-SGD's) and DP-FedAvg reduced by all_reduce of per-rank sums (another order of additions):
  model within 1e-6 relative (L2 per tensor), losses within 1e-6 relative, same accuracy.

A second job, launched by torchrun (``-m spfl_vmap run``), has one rank killed mid-run: torchrun
must end the job with an error within the collective timeout. A third runs ``spfl bench scale
--nproc 2``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spfl_vmap import Config, ConfigError, run
from spfl_vmap import distributed as sd
from spfl_vmap.attacks import attack
from spfl_vmap.data import pack_clients

pytestmark = pytest.mark.usefixtures("one_thread")

JOB = Path(__file__).with_name("distributed_job.py")
TIMEOUT_S = 45  # --dist_timeout of the jobs (margin for a loaded 2-core CI machine: a rank may import torch._dynamo for its first traced step while the other waits)
BASE = dict(
    dataset="synthetic", synthetic_train=600, synthetic_test=200, model="lr", partition_method="hetero",
    partition_alpha=0.5, partition_min_samples=10, client_num_in_total=12, client_num_per_round=8, comm_round=2,
    batch_size=10, lr=0.05, frequency_of_the_test=1, progress=False, device="cpu", dist_timeout=TIMEOUT_S,
    eval_batch_size=64,  # 4 test batches: each process evaluates 2
)
CONFIGS = {
    "fedavg_lr": {},
    "fedavg_cnn": dict(model="cnn", synthetic_train=240, client_num_in_total=6, client_num_per_round=4),
    "krum_gaussian": dict(by_attack="gaussian", by_defense="krum", by_frac=0.25, by_mode="per_round"),
    # attacks on per-process rows, their statistics by collectives (U never whole)
    "alie_mean": dict(by_attack="alie", by_frac=0.25, by_mode="per_round"),
    "min_max_multi_krum": dict(by_attack="min_max", by_defense="multi_krum", by_frac=0.25, by_mode="per_round"),
    # coordinate-wise rules on U sharded by columns (one all_to_all), under an attack and with a NaN row
    "median_alie": dict(by_attack="alie", by_defense="median", by_frac=0.25, by_mode="per_round"),
    "trimmed_mean_nan": dict(by_attack="nan", by_defense="trimmed_mean", by_workers=1, by_mode="per_round", by_f=2),
    # weighted sums from per-row scalars: norms gathered, sums all_reduced (centered clipping's state across rounds)
    "norm_clip_ipm": dict(by_attack="ipm", by_defense="norm_clip", by_frac=0.25, by_mode="per_round"),
    "centered_clipping_gaussian": dict(by_attack="gaussian", by_defense="centered_clipping", by_defense_params="tau=0.5,n_iter=2",
                                       by_frac=0.25, by_mode="per_round"),
    "fltrust_sign_flip": dict(by_attack="sign_flip", by_attack_params="scale=4", by_defense="fltrust", by_frac=0.25,
                              by_mode="per_round"),
    "rlr_alie": dict(by_attack="alie", by_defense="rlr", by_defense_params="theta=3", by_frac=0.25, by_mode="per_round"),
    "flame_gaussian": dict(by_attack="gaussian", by_attack_params="sigma=1", by_defense="flame", by_frac=0.25, by_mode="per_round"),
    "ipm_dp_fedavg": dict(by_attack="ipm", by_attack_params="epsilon=2", by_frac=0.25, by_mode="per_round",
                          dp_mode="user", dp_sigma=0.5, grad_norm=0.5),
    # no update stage: distances in per-process blocks, the selected rows all_reduced (U never whole)
    "krum_blocks": dict(by_defense="krum", by_f=1),
    "multi_krum_blocks": dict(by_defense="multi_krum", by_f=1),
    "dp_fedavg": dict(dp_mode="user", dp_sigma=0.5, grad_norm=0.5),
    "dp_sgd": dict(dp_mode="example", dp_sigma=0.8, grad_norm=1.0),
    "dba_backdoor": dict(bd_attack="dba", by_frac=0.25, by_mode="per_round", bd_boost=2.0),
}

#: runs whose rows stay in their processes (partial sums, distance blocks, attack statistics by collectives)
ROW_SHARDED = ("fedavg_lr", "fedavg_cnn", "dp_fedavg", "dp_sgd", "krum_blocks", "multi_krum_blocks", "krum_gaussian",
               "alie_mean", "min_max_multi_krum", "ipm_dp_fedavg", "median_alie", "trimmed_mean_nan", "norm_clip_ipm",
               "centered_clipping_gaussian", "fltrust_sign_flip", "rlr_alie", "flame_gaussian")
#: how the rows meet (``config.json``'s ``distributed.aggregation``), by user-level DP or the rule
SHARDED_PATHS = {True: "all_reduce of per-process clipped sums", "mean": "all_reduce of per-process sums",
                 "krum": "distance blocks", "multi_krum": "distance blocks",
                 "median": "U sharded by columns", "trimmed_mean": "U sharded by columns",
                 **dict.fromkeys(("norm_clip", "centered_clipping", "fltrust", "rlr", "flame"), "per-row scalars gathered")}

#: of those, runs with no reordered sum: Krum returns a selected row's bits; the trimmed mean
#: on column blocks sums each column in row order, as on the whole U; NaN rows are row-local
EXACT_SHARDED = ("krum_blocks", "krum_gaussian", "trimmed_mean_nan")

#: Attacks on a cohort of 11 rows split over 2 processes (``owner``: each row's rank). Layout
#: "attackers0": rank 0 holds exactly the malicious rows, so it holds no benign row (omniscient
#: statistics come wholly from rank 1) and rank 1 no malicious one; "mixed": both hold both.
ATTACK_LAYOUTS = {"attackers0": [0, 1, 1, 0, 1, 1, 1, 0, 1, 1, 1], "mixed": [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0]}
ATTACK_MALICIOUS = [0, 3, 7]
SHARDED_ATTACKS = [
    ("gaussian", {}), ("sign_flip", {}), ("label_flip", {}), ("alie", {}), ("ipm", {}),
    ("min_max", {}), ("min_max", {"perturbation": "sign"}), ("min_sum", {"perturbation": "std"}),
    ("fang", {"aggregator": "krum"}), ("fang", {"aggregator": "trimmed_mean"}), ("nan", {}), ("inf", {}),
]
ATTACK_CASES = [
    {"id": f"{name}{kw}-{know}-{layout}", "attack": name, "owner": owner, "malicious": ATTACK_MALICIOUS, "dim": 29,
     "seed": 11 + i, "kwargs": {**kw, "knowledge": know, "f": 3}}
    for i, (name, kw) in enumerate(SHARDED_ATTACKS) for know in ("omniscient", "partial") for layout, owner in ATTACK_LAYOUTS.items()
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes of ``python args`` with the environment torchrun gives its workers."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One two-process job: every config of :data:`CONFIGS`, the CLI run, then a failing run."""
    tmp = tmp_path_factory.mktemp("dist")
    cli = ["run", "--dataset", "synthetic", "--synthetic_train", "600", "--synthetic_test", "200", "--model", "lr",
           "--client_num_in_total", "12", "--client_num_per_round", "8", "--frequency_of_the_test", "1", "--lr", "0.05",
           "--device", "cpu", "--no-progress", "--dist_gather", "--dist_timeout", str(TIMEOUT_S), "--eval_batch_size", "64"]
    runs = [
        {"argv": [*cli, "--comm_round", "2", "--out", str(tmp / "cli"), "--save_path", str(tmp / "cli" / "model.pt")]},
        # one round with a checkpoint, then every rank resumes from rank 0's checkpoint for the second
        {"argv": [*cli, "--comm_round", "1", "--checkpoint_every", "1", "--out", str(tmp / "resumed")]},
        {"argv": ["run", "--resume", str(tmp / "resumed"), "--comm_round", "2", "--save_path", str(tmp / "resumed" / "model.pt")]},
    ]
    spec = {
        "runs": runs + [{"config": {**BASE, **kw}, "result": str(tmp / f"{name}.pt")} for name, kw in CONFIGS.items()],
        "attacks": {"cases": ATTACK_CASES, "result": str(tmp / "attacks.pt")},
        "fail": {"rank": 1, "round": 2, "config": BASE},
    }
    (tmp / "spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    procs = launch([str(JOB), str(tmp / "spec.json")])
    outs = [p.communicate(timeout=240) for p in procs]
    return {"dir": tmp, "codes": [p.returncode for p in procs], "out": outs, "seconds": time.perf_counter() - t0}


def one_process(cfg: Config) -> dict:
    hist = run(cfg)
    return {"model": hist.model_state, "rows": hist.rows}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_run_equals_one_process(job, name):
    cfg = Config(**{**BASE, **CONFIGS[name]})
    got = torch.load(job["dir"] / f"{name}.pt", weights_only=False)
    ref = one_process(cfg)
    mode = got["summary"]["distributed"]["aggregation"]
    assert got["summary"]["distributed"]["processes"] == 2
    assert [r["round"] for r in got["rows"]] == [r["round"] for r in ref["rows"]] == list(range(1, cfg.comm_round + 1))
    if mode.startswith("all_gather"):  # every row gathered: the same bits as one process
        assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"])
        for g, r in zip(got["rows"], ref["rows"]):
            assert (g["test_acc"], g["test_loss"], g["train_loss"]) == (r["test_acc"], r["test_loss"], r["train_loss"])
    elif name in EXACT_SHARDED:  # rows stay in their processes, yet no sum changes order: the same bits
        assert all(torch.equal(got["model"][k], ref["model"][k]) for k in ref["model"]), name
        assert [(g["test_acc"], g["test_loss"]) for g in got["rows"]] == [(r["test_acc"], r["test_loss"]) for r in ref["rows"]]
    else:  # partial sums all_reduced: equal to float rounding
        assert name in ROW_SHARDED, mode
        for k in ref["model"]:
            assert rel(got["model"][k], ref["model"][k]) <= 1e-6, k
        for g, r in zip(got["rows"], ref["rows"]):
            assert g["test_acc"] == r["test_acc"]
            assert g["test_loss"] == pytest.approx(r["test_loss"], rel=1e-6)
            assert g["train_loss"] == pytest.approx(r["train_loss"], rel=1e-6)
    if name in ROW_SHARDED:  # nothing in these runs needs all of U in one process
        assert not mode.startswith("all_gather"), mode
        assert mode.startswith(SHARDED_PATHS[cfg.dp_mode == "user" or cfg.by_defense]), mode
        assert mode.endswith("attack statistics by collectives") == (cfg.by_attack != "none"), mode
    if "krum" in name and cfg.by_attack != "none":
        assert [r["malicious_selected"] for r in got["rows"]] == [r["malicious_selected"] for r in ref["rows"]]
    for key in ("malicious", "attack_z", "attack_gamma", "nonfinite_excluded", "agg_trim_k", "agg_clip_norm", "agg_clipped_frac",
                "flagged", "malicious_flagged", "agg_trust_sum", "agg_server_norm", "agg_flipped_frac",
                "selected_ids", "agg_clusters", "agg_clip_bound", "agg_clipped", "agg_noise_std"):
        assert [r.get(key) for r in got["rows"]] == [pytest.approx(r[key], rel=1e-6) if key in r else None for r in ref["rows"]], key
    if name.endswith("krum_blocks"):  # the same clients selected from the block distances
        assert not mode.startswith("all_gather"), mode
        assert [r["selected_ids"] for r in got["rows"]] == [r["selected_ids"] for r in ref["rows"]]
        assert all(0 < len(r["selected_ids"]) < cfg.client_num_per_round or name == "krum_blocks" for r in got["rows"])
    if name == "dp_fedavg":  # the noise is in the release once: twice would be sqrt(2) times as large
        assert [r["dp_cohort"] for r in got["rows"]] == [r["dp_cohort"] for r in ref["rows"]]


@pytest.mark.parametrize("case", ATTACK_CASES, ids=[c["id"] for c in ATTACK_CASES])
def test_sharded_attack_equals_one_process(job, case):
    """Each rank rewrote its own malicious rows from statistics taken by collectives: the rows
    equal the attack on the whole ``U`` in one process (to the order of additions), and so do
    the metrics."""
    got, got_m = torch.load(job["dir"] / "attacks.pt", weights_only=False)[case["id"]]
    N = len(case["owner"])
    U = torch.randn(N, case["dim"], generator=torch.Generator().manual_seed(case["seed"]))
    mal = torch.zeros(N, dtype=torch.bool)
    mal[case["malicious"]] = True
    ref, ref_m = attack(case["attack"], U, mal, generator=torch.Generator().manual_seed(7), **case["kwargs"])
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(got[~mal], U[~mal])  # benign rows untouched
    assert got_m.keys() == ref_m.keys()
    for k, v in ref_m.items():
        assert got_m[k] == (pytest.approx(v, rel=1e-6) if isinstance(v, float) else v), k


def test_cli_under_two_processes_is_bit_identical_and_rank0_writes(job):
    ref = run(Config(**BASE))  # the test metrics too: each process evaluated half of the test batches
    for run_dir in ("cli", "resumed"):  # resumed: 1 round, then a resume of both ranks from rank 0's checkpoint
        got = torch.load(job["dir"] / run_dir / "model.pt")
        assert all(torch.equal(got[k], ref.model_state[k]) for k in got), run_dir
    rows = [json.loads(line) for line in (job["dir"] / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["test_acc"], r["test_loss"]) for r in rows] == [(r["test_acc"], r["test_loss"]) for r in ref.rows]
    (out0, _), (out1, _) = job["out"]
    assert out0.count("spfl run: synthetic / lr") == 3 and "final test acc" in out0 and "resuming" in out0
    assert out1 == ""  # rank 1 prints nothing and writes nothing
    assert json.loads((job["dir"] / "cli" / "config.json").read_text())["distributed"]["aggregation"] == "all_gather of U"


def test_failing_rank_ends_the_job_with_its_error(job):
    """The last run raises in rank 1 only: rank 1 exits with its error, and rank 0 (waiting in a
    collective) fails too instead of hanging; no timeout needed."""
    (_, err0), (_, err1) = job["out"]
    assert job["codes"][1] == 1, err1[-2000:]
    assert "injected failure in rank 1 before round 2" in err1 and "rank 1 of 2 failed" in err1
    assert job["codes"][0] != 0, err0[-2000:]
    assert job["seconds"] < 200


def test_killed_rank_ends_the_torchrun_job(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "spfl_vmap", "run",
           "--dataset", "synthetic", "--model", "lr", "--client_num_in_total", "8", "--client_num_per_round", "8",
           "--comm_round", "100000", "--frequency_of_the_test", "1", "--device", "cpu", "--no-progress",
           "--dist_timeout", str(TIMEOUT_S), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.2)
        victim = worker_of(proc.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        t_kill = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT_S + 30)
        ended = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert ended < TIMEOUT_S + 15
    assert "SIGKILL" in err and "spfl_vmap" in err  # torchrun's failure report names the signal and the job


def test_bench_scale_reports_each_process(tmp_path):
    cmd = [sys.executable, "-m", "spfl_vmap", "bench", "scale", "--nproc", "2", "--clients", "8", "--repeats", "1",
           "--by_attack", "alie", "--by_frac", "0.25", "--out", str(tmp_path)]
    p = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads((tmp_path / "scale_nproc.json").read_text())["rows"]
    assert row["processes"] == 2 and row["clients"] == 8 and row["aggregation"] == "all_reduce of per-process sums; attack statistics by collectives"
    assert len(row["peak_rss_mb"]) == 2 and all(m > 0 for m in row["peak_rss_mb"]) and row["s_per_round"] > 0


def worker_of(agent: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank`` (a child of ``agent``)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(p.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {agent}")


# ---- without processes --------------------------------------------------------------------------
@pytest.mark.parametrize("K,P", [(1, 1), (7, 2), (40, 3), (100, 4)])
def test_assignment_is_balanced_and_deterministic(K, P):
    g = torch.Generator().manual_seed(K * 10 + P)
    counts = torch.randint(0, 50, (K,), generator=g).tolist()
    owner = sd.assign_clients(counts, P)
    assert owner == sd.assign_clients(counts, P)
    assert sorted(set(owner)) == list(range(min(P, K)))
    loads = [sum(c for c, o in zip(counts, owner) if o == r) for r in range(P)]
    assert max(loads) - min(loads) <= max(counts)  # LPT's bound (Graham 1969)
    # brute force on small cases: no assignment has a smaller largest load by more than 1/3 (LPT's 4/3 bound)
    if K == 7:
        best = min(max(sum(c for i, c in enumerate(counts) if (m >> i) & 1 == r) for r in range(2)) for m in range(2 ** K))
        assert max(loads) <= best * 4 / 3


def test_equal_counts_are_dealt_round_robin():
    assert sd.assign_clients([5] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]


def test_nothing_changes_without_torchrun(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not sd.launched() and not sd.active() and sd.is_main() and sd.world_size() == 1
    dev = torch.device("cpu")
    assert sd.setup("auto", 600.0, dev) == dev
    x, y = torch.randn(10, 1, 2, 2), torch.arange(10)
    assert sd.extremes(x) is x
    import numpy as np

    parts = [np.arange(0, 4), np.arange(4, 10)]
    a, b = sd.pack_owned(x, y, parts, dev), pack_clients(x, y, parts, dev)
    assert type(a) is type(b) and torch.equal(a.index, b.index) and torch.equal(a.counts, b.counts)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one process: still one process
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "0" if k == "RANK" else "x")
    assert not sd.launched()


def test_flags_are_checked():
    with pytest.raises(ConfigError, match="--dist_backend"):
        Config(dist_backend="mpi")
    with pytest.raises(ConfigError, match="--dist_timeout"):
        Config(dist_timeout=0)
