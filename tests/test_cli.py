"""CLI behaviour: bad input gives one line on stderr and exit 2, never a traceback."""

import json
import subprocess
import sys

import pytest

from spfl_vmap.cli import main
from spfl_vmap.config import Config, load_config_file
from spfl_vmap.errors import ConfigError

BAD = [
    (["run", "--client_num_per_round", "20", "--client_num_in_total", "10"], "cannot exceed"),
    (["run", "--lr", "-1"], "--lr"),
    (["run", "--model", "nope"], "unknown model"),
    (["run", "--dataset", "digits", "--model", "convnet"], "at least 9x9"),
    (["run", "--partition_method", "iid"], "--partition_method"),
    (["run", "--epochs", "two"], "expects int"),
    (["run", "--nonsense"], "unrecognized"),
    (["run", "--dataset", "cifar10", "--data_dir", "/nonexistent", "--model", "cnn_cifar"], "--download"),
    (["run", "--config", "/nonexistent.yaml"], "not found"),
    (["frobnicate"], "unknown command"),
    (["run", "--dataset", "digits", "--client_num_in_total", "20", "--client_num_per_round", "6", "--by_attack", "gaussian",
      "--by_workers", "2", "--by_mode", "per_round", "--by_defense", "bulyan"], "n >= 4f+3 clients"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_subprocess_has_no_traceback():
    p = subprocess.run([sys.executable, "-m", "spfl_vmap.cli", "run", "--lr", "nan"], capture_output=True, text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--lr" in p.stderr


def test_run_writes_directory_and_accepts_dashes(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["run", "--dataset", "digits", "--client-num-in-total", "8", "--client_num_per_round", "4",
               "--comm-round", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "final test acc" in text and "partition: samples/client" in text
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["client_num_in_total"] == 8 and cfg["comm_round"] == 2


def test_config_file_with_cli_override(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: digits\nclient_num_in_total: 8\nclient_num_per_round: 2\ncomm_round: 1\nlr: 0.5\n")
    out = tmp_path / "r"
    assert main(["run", "--config", str(f), "--lr", "0.1", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert cfg["lr"] == 0.1 and cfg["client_num_per_round"] == 2
    assert load_config_file(f)["lr"] == 0.5


def test_unknown_config_key_rejected():
    with pytest.raises(ConfigError, match="unknown config key"):
        Config.from_dict({"dataset": "digits", "learning_rate": 0.1})


def test_resume_without_checkpoint_is_clear(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--dataset", "digits", "--client_num_in_total", "4", "--client_num_per_round", "2",
                 "--comm_round", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_matrix_command_writes_table_and_heatmap(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["matrix", "--attacks", "none,gaussian", "--defenses", "mean,median,bulyan", "--dataset", "digits",
               "--client_num_in_total", "10", "--client_num_per_round", "6", "--comm_round", "2", "--by_workers", "2",
               "--partition_method", "homo", "--out", str(out)])
    assert rc == 0
    md = (out / "matrix.md").read_text()
    assert "| gaussian |" in md and "n/a" in md and "4f+3" in md  # bulyan refuses n=6, f=1 < 4f+3=7
    assert (out / "matrix.png").is_file() and len((out / "matrix.csv").read_text().splitlines()) == 1 + 6


def test_matrix_needs_byzantine_clients(capsys):
    assert main(["matrix", "--attacks", "gaussian", "--defenses", "mean", "--dataset", "digits"]) == 2
    assert "--by_frac" in capsys.readouterr().err


def test_privacy_curve_command(tmp_path, capsys):
    out = tmp_path / "p"
    rc = main(["privacy-curve", "--epsilons", "2", "--dataset", "digits", "--client_num_in_total", "10",
               "--client_num_per_round", "5", "--comm_round", "2", "--dp_mode", "user", "--partition_method", "homo", "--out", str(out)])
    assert rc == 0
    rows = (out / "privacy_curve.csv").read_text().splitlines()
    assert len(rows) == 3 and (out / "privacy_curve.png").is_file()
    assert main(["privacy-curve", "--epsilons", "2", "--dataset", "digits"]) == 2  # no --dp_mode


def test_matrix_applies_params_only_where_accepted(tmp_path, capsys):
    """perturbation= belongs to min_max; gaussian in the same matrix must not see it."""
    out = tmp_path / "m"
    rc = main(["matrix", "--attacks", "gaussian,min_max", "--defenses", "mean", "--by_attack_params", "perturbation=sign",
               "--dataset", "digits", "--client_num_in_total", "8", "--client_num_per_round", "6", "--comm_round", "1",
               "--by_workers", "2", "--partition_method", "homo", "--out", str(out)])
    assert rc == 0
    assert json_cfg(out / "runs" / "min_max__mean")["by_attack_params"] == "perturbation=sign"
    assert json_cfg(out / "runs" / "gaussian__mean")["by_attack_params"] == ""
    assert main(["matrix", "--attacks", "gaussian", "--defenses", "mean", "--by_attack_params", "bogus=1",
                 "--dataset", "digits", "--by_workers", "2"]) == 2
    assert "bogus" in capsys.readouterr().err


def json_cfg(run_dir):
    return json.loads((run_dir / "config.json").read_text())["config"]
