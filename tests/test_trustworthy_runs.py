"""Runs never report something untrue: each test reproduces a failure found by trying the tool
as a new user would (issue 10) and checks its repair."""

from __future__ import annotations

import fcntl
import json
import math

import pytest
import torch

from helpers import small_config
from spfl_vmap import Config, Simulator, run
from spfl_vmap.cli import main
from spfl_vmap.errors import ConfigError, SpflError
from spfl_vmap.modules.byzantine import assumed_f
from spfl_vmap.privacy import adaptive_clip_noise_multiplier, compute_epsilon
from spfl_vmap.runner import MetricsLog

DIGITS = ["--dataset", "digits", "--model", "lr", "--client_num_in_total", "10", "--client_num_per_round", "5",
          "--frequency_of_the_test", "1", "--no-progress"]


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---- 1. resume must not drift -------------------------------------------------------------------
def test_resume_refuses_result_changing_settings(tmp_path, capsys):
    d = str(tmp_path / "r")
    assert main(["run", *DIGITS, "--comm_round", "2", "--checkpoint_every", "1", "--out", d]) == 0
    before = json.loads((tmp_path / "r" / "config.json").read_text())["config"]
    err = one_line_error(capsys, ["run", "--resume", d, "--lr", "0.5"])
    assert "lr (0.03 -> 0.5)" in err
    err = one_line_error(capsys, ["run", "--resume", d, "--seed", "7", "--partition_alpha", "100", "--client_num_in_total", "30"])
    assert "seed (0 -> 7)" in err and "partition_alpha" in err and "client_num_in_total (10 -> 30)" in err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["config"] == before  # not rewritten
    # extending the run is what resume is for
    assert main(["run", "--resume", d, "--comm_round", "3"]) == 0
    assert [r["round"] for r in MetricsLog(tmp_path / "r" / "metrics.jsonl").read()] == [1, 2, 3]


def test_resume_check_also_guards_the_python_api(tmp_path):
    cfg = small_config(comm_round=2, checkpoint_every=1, out=str(tmp_path / "a"))
    run(cfg)
    with pytest.raises(SpflError, match="wd"):
        run(cfg.replace(wd=0.1), resume_dir=tmp_path / "a")


# ---- 2. one writer per run directory ------------------------------------------------------------
def test_second_writer_is_refused(tmp_path, capsys, monkeypatch):
    d = tmp_path / "shared"
    d.mkdir()
    with open(d / ".lock", "a+") as fh:  # another spfl process holds the directory
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fh.write("spfl run pid 4242\n")
        fh.flush()
        err = one_line_error(capsys, ["run", *DIGITS, "--comm_round", "1", "--out", str(d)])
    assert "in use by spfl run pid 4242" in err
    assert not (d / "metrics.jsonl").exists()


def test_out_is_checked_before_data_loads(tmp_path, capsys, monkeypatch):
    import spfl_vmap.engine.simulator as simulator

    def no_load(*a, **k):
        raise AssertionError("data was loaded before --out was checked")

    monkeypatch.setattr(simulator, "load_dataset", no_load)
    f = tmp_path / "file"
    f.write_text("x")
    assert "is a file" in one_line_error(capsys, ["run", *DIGITS, "--out", str(f)])
    assert "parent that is a file" in one_line_error(capsys, ["run", *DIGITS, "--out", str(f / "sub")])


def test_fresh_run_refuses_a_stale_checkpoint(tmp_path, capsys):
    d = str(tmp_path / "r")
    assert main(["run", *DIGITS, "--comm_round", "1", "--checkpoint_every", "1", "--out", d]) == 0
    (tmp_path / "r" / "metrics.jsonl").unlink()  # only checkpoint.pt is left
    assert "checkpoint.pt" in one_line_error(capsys, ["run", *DIGITS, "--comm_round", "1", "--out", d])


def test_failed_start_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "runs" / "x"
    one_line_error(capsys, ["run", "--dataset", "cifar10", "--data_dir", str(tmp_path / "none"), "--model", "cnn_cifar",
                            "--out", str(out)])
    assert not (tmp_path / "runs").exists()


# ---- 3. privacy flags never ignored -------------------------------------------------------------
@pytest.mark.parametrize("flag", [["--target_epsilon", "2"], ["--dp_sigma", "1"], ["--dp_delta", "1e-5"], ["--grad_norm", "0.5"]])
def test_privacy_flag_without_mode_is_refused(flag, capsys):
    err = one_line_error(capsys, ["run", *DIGITS, *flag])
    assert flag[0] in err and "nothing would be private" in err


def test_toolkit_switch_turns_privacy_on(tmp_path):
    hist = run(small_config(differential_privacy=True, dp_sigma=1.0, comm_round=1, out=str(tmp_path / "p")))
    assert hist.summary["privacy"]["mode"] == "example" and hist.summary["eps_max"] > 0
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert cfg["privacy"]["mode"] == "example" and cfg["privacy"]["noise_multiplier"] == 1.0


# ---- 4. adaptive clipping accounts for what it releases -----------------------------------------
def test_adaptive_clip_infeasible_budget_is_refused():
    with pytest.raises(ConfigError, match="at least 11 clients per round"):
        Config(dataset="digits", dp_mode="user", dp_adaptive_clip=True, dp_sigma=1.0, client_num_per_round=10)


def test_adaptive_clip_noises_updates_at_z_delta_and_accounts_at_z():
    z, m = 1.0, 12  # sigma_b = 0.6: z_delta = (1 - 1/1.44)^-1/2 = 1.81, far from z
    cfg = small_config(dataset="digits", dp_mode="user", dp_adaptive_clip=True, dp_sigma=z, client_num_in_total=60,
                       client_num_per_round=m, grad_norm=0.5, comm_round=3, synthetic_train=600)
    sim = Simulator(cfg)
    dp = sim.pipeline.aggregation
    z_delta = adaptive_clip_noise_multiplier(z, m / 20)  # Andrew et al. 2021, Theorem 1
    assert dp.update_noise_multiplier == pytest.approx(z_delta) and z_delta > z
    U = torch.zeros(3, sim.spec.dim)
    draws = []
    for r in range(1, 30):
        dp.clip = 0.5  # each call adapts the clip; measure at S = 0.5
        draws.append(dp.apply(sim.context(r, []), U)[0])
    noise = torch.cat(draws)  # pure noise, std z_delta S / m
    target = z_delta * 0.5 / m
    assert abs(float(noise.std()) / target - 1) < 5 / math.sqrt(2 * noise.numel())
    dp.clip = 0.5
    for _ in range(3):
        sim.step()
    acc = sim.stage("privacy")
    assert acc.sigma == z  # the accountant charges z, the multiplier of both releases together
    eps = acc.evaluate(sim.context(3, []), sim.model, sim.global_params)[1]["epsilon"]
    assert eps == pytest.approx(compute_epsilon(m / 60, z, 3, acc.delta), rel=1e-9)
    assert eps > compute_epsilon(m / 60, z_delta, 3, acc.delta)  # charging z_delta alone would under-report


# ---- 5. attackers beyond f ------------------------------------------------------------------------
def test_fixed_mode_f_is_the_hypergeometric_quantile():
    from scipy.stats import hypergeom

    cfg = Config(by_attack="gaussian", by_frac=0.2, by_defense="trimmed_mean", client_num_in_total=100, client_num_per_round=20)
    q = int(hypergeom(100, 20, 20).ppf(0.99))  # attackers in a cohort of 20 drawn from 100 with 20 malicious
    assert assumed_f(cfg) == q > 4
    # clamped to what the rule admits: Bulyan needs n >= 4f+3
    assert assumed_f(cfg.replace(by_defense="bulyan")) == 4
    assert assumed_f(cfg.replace(by_f=3)) == 3


def test_assumed_f_is_logged(tmp_path):
    cfg = small_config(by_attack="gaussian", by_frac=0.25, by_defense="median", client_num_in_total=8, client_num_per_round=8,
                       comm_round=1, out=str(tmp_path / "f"))
    run(cfg)
    byz = json.loads((tmp_path / "f" / "config.json").read_text())["byzantine"]
    assert byz["f"] == assumed_f(cfg) and "quantile" in byz["f_rule"]


# ---- 6. divergence is reported ----------------------------------------------------------------------
def test_divergence_stops_the_run_and_is_counted(tmp_path, capsys):
    d = tmp_path / "div"
    assert main(["run", *DIGITS, "--lr", "1e38", "--comm_round", "20", "--max_rejected_rounds", "3", "--out", str(d)]) == 1
    out = capsys.readouterr().out
    assert "warning: round 1 was rejected" in out and "diverged: 3 consecutive rounds" in out
    s = json.loads((d / "summary.json").read_text())
    assert s["rejected_rounds"] == 3 and s["diverged"] and s["rounds"] == 3

    def no_constants(c):
        raise AssertionError(f"bare {c} in metrics.jsonl")

    for line in (d / "metrics.jsonl").read_text().splitlines():  # strict JSON: null, never NaN
        json.loads(line, parse_constant=no_constants)


# ---- 7. one-line errors for damaged inputs ----------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_damaged_checkpoint_is_one_line(tmp_path, capsys, damage):
    d = tmp_path / "r"
    assert main(["run", *DIGITS, "--comm_round", "1", "--checkpoint_every", "1", "--out", str(d)]) == 0
    ck = d / "checkpoint.pt"
    data = ck.read_bytes()
    ck.write_bytes({"empty": b"", "garbage": b"not a checkpoint at all", "truncated": data[: len(data) // 2]}[damage])
    assert "is damaged" in one_line_error(capsys, ["run", "--resume", str(d), "--comm_round", "2"])


def test_bad_hyperparameter_value_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "x"
    err = one_line_error(capsys, ["run", *DIGITS, "--by_attack", "gaussian", "--by_workers", "2", "--by_defense", "trimmed_mean",
                                  "--by_defense_params", "beta=abc", "--out", str(out)])
    assert "beta" in err and not out.exists()


# ---- 8. the Python API keeps the README's promises ------------------------------------------------
def test_config_types_are_checked():
    with pytest.raises(ConfigError, match="lr must be a float"):
        Config(lr="0.1")
    with pytest.raises(ConfigError, match="comm_round must be an int"):
        Config(comm_round=2.5)


def test_flag_prefixes_are_not_guessed(capsys):
    assert "unrecognized arguments: --epoch" in one_line_error(capsys, ["run", *DIGITS, "--epoch", "2"])


# ---- 10. the toolkit's launcher flags ----------------------------------------------------------------
def test_save_path_saves_the_final_model(tmp_path, capsys):
    path = tmp_path / "models" / "final.pt"
    assert main(["run", *DIGITS, "--comm_round", "1", "--out", str(tmp_path / "r"), "--save_path", str(path), "--wandb-off"]) == 0
    state = torch.load(path, weights_only=True)
    sim = Simulator(Config(dataset="digits", model="lr", client_num_in_total=10, client_num_per_round=5))
    assert set(state) == set(sim.global_params) and all(state[k].shape == v.shape for k, v in sim.global_params.items())
    assert not torch.equal(torch.cat([v.flatten() for v in state.values()]), sim.w)  # trained, not the initial model


def test_toolkit_flags_without_meaning_are_named(tmp_path, capsys):
    assert main(["run", *DIGITS, "--comm_round", "1", "--out", str(tmp_path / "r"), "--backend", "MPI", "--ci", "0",
                 "--gpu_mapping_key", "k", "--num_worker", "3", "--is_mobile", "0", "--no_save_to_localfile"]) == 0
    out = capsys.readouterr().out
    for flag in ("--backend", "--ci", "--gpu_mapping_key", "--num_worker 3", "--is_mobile", "--no_save_to_localfile"):
        assert f"note: {flag}" in out
