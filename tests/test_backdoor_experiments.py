"""Backdoor experiments: ``spfl matrix`` with ``bd:`` attacks and defenses, ``spfl backdoor-curve``,
and the ASR lines of a run's accuracy plot."""

from __future__ import annotations

import csv
import json
from dataclasses import fields
from pathlib import Path

import matplotlib.figure
import pytest

from spfl_vmap import Config, ConfigError, run
from spfl_vmap.aggregators import AGGREGATORS
from spfl_vmap.cli import main
from spfl_vmap.experiments.backdoor_curve import curve_configs, write_curve
from spfl_vmap.engine.simulator import History
from spfl_vmap.experiments.matrix import ATTACK_ONLY, asr_columns, attack_off, check_axes
from spfl_vmap.runner import plot_accuracy

# tiny runs: 6 clients of 50 synthetic samples, 2 of them malicious, evaluated every round
RUN_FLAGS = ["--dataset", "synthetic", "--synthetic_train", "300", "--synthetic_test", "100", "--model", "lr",
             "--client_num_in_total", "6", "--client_num_per_round", "6", "--comm_round", "3", "--by_workers", "2",
             "--partition_method", "homo", "--frequency_of_the_test", "1", "--batch_size", "10"]


pytestmark = pytest.mark.usefixtures("one_thread")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def run_files(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    """``(config, summary, metrics rows)`` of a run directory."""
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, summary, rows


# ---- spfl matrix ------------------------------------------------------------------------------
def test_backdoor_matrix_rows_equal_the_run_summaries(tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["matrix", "--attacks", "none,bd:badnets", "--defenses", "mean,bd:norm_bound", *RUN_FLAGS,
               "--bd_boost", "5", "--bd_clip", "0.5", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = read_csv(out / "matrix.csv")
    assert [(r["attack"], r["defense"]) for r in rows] == [
        ("none", "mean"), ("none", "bd:norm_bound"), ("bd:badnets", "mean"), ("bd:badnets", "bd:norm_bound")]
    for r in rows:
        assert r["error"] == ""
        cfg, summary, metrics = run_files(out / "runs" / f"{r['attack']}__{r['defense']}".replace(":", "-"))
        assert float(r["final_test_acc"]) == summary["final_test_acc"]
        assert cfg["by_defense"] == "mean" and cfg["by_attack"] == "none"
        assert cfg["bd_defense"] == ("norm_bound" if r["defense"] == "bd:norm_bound" else "none")
        assert cfg["bd_clip"] == 0.5
        if r["attack"] == "none":  # the baseline runs without the attack and its --bd_boost
            assert cfg["bd_attack"] == "none" and cfg["bd_boost"] is None
            assert r["final_asr"] == r["final_asr_all"] == r["max_asr"] == "" and "asr" not in summary
        else:
            assert cfg["bd_attack"] == "badnets" and cfg["bd_boost"] == 5.0
            assert float(r["final_asr"]) == summary["asr"] == metrics[-1]["asr"]
            assert float(r["final_asr_all"]) == summary["asr_all"]
            assert len(metrics) == 3 and float(r["max_asr"]) == max(m["asr"] for m in metrics)
    md = (out / "matrix.md").read_text()
    bd = {r["defense"]: r for r in rows if r["attack"] == "bd:badnets"}
    cells = " | ".join(f"{float(bd[d]['final_test_acc']):.3f} / {float(bd[d]['final_asr']):.3f}" for d in ("mean", "bd:norm_bound"))
    assert f"| bd:badnets | {cells} |" in md and "attack success rate" in md
    assert (out / "matrix.png").is_file()


def test_asr_columns_take_the_highest_finite_asr():
    rows = [{"round": 1, "asr": 0.2}, {"round": 2, "asr": 0.9}, {"round": 3, "asr": float("nan")}, {"round": 4, "asr": 0.4}]
    hist = History(rows=rows, summary={"asr": 0.4, "asr_all": 0.45})
    assert asr_columns(hist) == {"final_asr": 0.4, "final_asr_all": 0.45, "max_asr": 0.9}


def test_byzantine_matrix_keeps_its_columns(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["matrix", "--attacks", "none", "--defenses", "mean", *RUN_FLAGS, "--comm_round", "1", "--out", str(out)]) == 0
    header = (out / "matrix.csv").read_text().splitlines()[0]
    # the columns the matrix wrote before backdoor rows existed (spfl_vmap/experiments/matrix.py at f5418ba)
    assert header == "attack,defense,final_test_acc,best_test_acc,final_test_loss,mean_malicious_selected,error,seconds"
    assert (out / "matrix.md").read_text().startswith("Final test accuracy: ")


@pytest.mark.parametrize("argv,needle", [
    (["matrix", "--attacks", "bd:trojan", "--defenses", "mean"], "bd:badnets"),
    (["matrix", "--attacks", "none", "--defenses", "bd:bogus"], "bd:norm_bound"),
    (["matrix", "--attacks", "none", "--defenses", "krumm"], "multi_krum"),
    (["matrix", "--attacks", "bd:badnets,bd:badnets", "--defenses", "mean"], "twice"),
    (["matrix", "--attacks", "bd:badnets", "--defenses", "mean", "--by_workers", "0"], "malicious clients"),
    (["matrix", "--attacks", "bd:badnets", "--defenses", "mean", "--bd_attack", "dba"], "--bd_attack per row"),
    (["matrix", "--attacks", "bd:badnets", "--defenses", "mean", "--bd_defense", "norm_bound"], "--bd_defense per column"),
    (["matrix", "--attacks", "bd:badnets", "--defenses", "mean", "--by_attack_params", "sigma=1"], "no Byzantine attack"),
    (["backdoor-curve", "--bounds", "1"], "--bd_attack"),
    (["backdoor-curve", "--bounds", "0,1", "--bd_attack", "badnets"], "--bounds"),
    (["backdoor-curve", "--bounds", "one", "--bd_attack", "badnets"], "numbers"),
    (["backdoor-curve", "--bounds", "1", "--noises", "-0.1", "--bd_attack", "badnets"], "--noises"),
    (["backdoor-curve", "--bounds", "1", "--bd_attack", "badnets", "--bd_clip", "2"], "drop it"),
    (["backdoor-curve", "--bounds", "1", "--bd_attack", "badnets", "--backdoor_defense"], "--bd_defense"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    out = tmp_path / "o"
    flags = ["--dataset", "synthetic", "--model", "lr", "--client_num_in_total", "6", "--client_num_per_round", "6",
             "--by_workers", "2", "--out", str(out)]
    assert main([argv[0], *flags, *argv[1:]]) == 2  # argv's flags come last and win
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # refused before any run directory is made


def test_attack_only_flags_are_config_fields():
    """A renamed backdoor attack flag must be renamed in the matrix's reset list too."""
    assert set(ATTACK_ONLY) <= {f.name for f in fields(Config)}
    assert attack_off()["bd_attack"] == "none" and Config(**attack_off()).bd_attack == "none"


def test_matrix_names_come_from_the_registries(monkeypatch):
    """A newly registered aggregator is a valid column; bd: names only the backdoor defense stages."""
    monkeypatch.setattr(AGGREGATORS, "_items", {**AGGREGATORS._items, "my_rule": lambda U, weights=None: (U.mean(0), {})})
    check_axes(["none", "bd:dba"], ["my_rule", "bd:toolkit_clip_noise"])
    with pytest.raises(ConfigError, match="my_rule"):
        check_axes(["none"], ["bd:my_rule"])


# ---- spfl backdoor-curve ----------------------------------------------------------------------
def test_backdoor_curve_writes_one_row_per_bound(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(["backdoor-curve", "--bounds", "2,0.5", *RUN_FLAGS, "--comm_round", "2", "--bd_attack", "badnets",
               "--bd_boost", "5", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = read_csv(out / "curve.csv")
    assert [(r["bound"], r["noise"]) for r in rows] == [("inf", "0.0"), ("0.5", "0.0"), ("2.0", "0.0")]
    for r, name in zip(rows, ("no_defense", "bound_0.5__noise_0", "bound_2__noise_0")):
        cfg, summary, metrics = run_files(out / "runs" / name)
        assert cfg["bd_attack"] == "badnets"
        if r["bound"] == "inf":
            assert cfg["bd_defense"] == "none"
        else:
            assert (cfg["bd_defense"], cfg["bd_clip"], cfg["bd_noise"]) == ("norm_bound", float(r["bound"]), 0.0)
        assert float(r["final_test_acc"]) == summary["final_test_acc"]
        assert float(r["final_asr"]) == summary["asr"] and float(r["final_asr_all"]) == summary["asr_all"]
        assert float(r["max_asr"]) == max(m["asr"] for m in metrics)
    assert (out / "curve.png").is_file() and "| 0.5 | " in (out / "curve.md").read_text()


def test_curve_points_cover_bounds_times_noises(tmp_path):
    base = Config(dataset="synthetic", model="lr", client_num_in_total=6, client_num_per_round=6, by_workers=2,
                  bd_attack="dba", progress=False)
    points = curve_configs(base, [2.0, 0.5, 2.0], [0.01, 0.0], tmp_path)
    assert [(b, s) for b, s, _ in points] == [("inf", 0.0), (0.5, 0.0), (0.5, 0.01), (2.0, 0.0), (2.0, 0.01)]
    for b, s, cfg in points[1:]:
        assert (cfg.bd_defense, cfg.bd_clip, cfg.bd_noise, cfg.bd_attack) == ("norm_bound", b, s, "dba")
    assert points[0][2].bd_defense == "none" and len({cfg.out for _, _, cfg in points}) == 5


def test_curve_outputs_with_several_noise_levels(tmp_path):
    """The Markdown cells are the rows' values; the two-panel plot (bound and noise) is drawn."""
    rows = [{"bound": "inf", "noise": 0.0, "final_test_acc": 0.9, "final_asr": 0.95}]
    rows += [{"bound": b, "noise": s, "final_test_acc": 0.8 + 0.01 * b - s, "final_asr": 0.1 * b + s}
             for b in (0.5, 1.0, 4.0) for s in (0.0, 0.01, 0.1)]
    write_curve(rows, tmp_path, "t")
    md = (tmp_path / "curve.md").read_text()
    r = rows[5]  # bound 1, noise 0.1
    assert f"{r['final_test_acc']:.3f} / {r['final_asr']:.3f}" in md and "No defense: 0.900 / 0.950" in md
    assert (tmp_path / "curve.png").is_file() and len((tmp_path / "curve.csv").read_text().splitlines()) == 1 + 10


# ---- the run's accuracy plot ------------------------------------------------------------------
@pytest.fixture
def figures(monkeypatch):
    """Every figure saved while the test runs."""
    saved = []
    original = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return saved


def test_backdoor_run_plots_asr_with_accuracy(tmp_path, figures):
    cfg = Config(dataset="synthetic", synthetic_train=300, synthetic_test=100, model="lr", client_num_in_total=6,
                 client_num_per_round=6, comm_round=3, by_workers=2, bd_attack="badnets", frequency_of_the_test=1,
                 progress=False, out=str(tmp_path / "r"))
    hist = run(cfg)
    assert (tmp_path / "r" / "accuracy.png").is_file()
    ax = figures[-1].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines) == ["test accuracy", "attack success rate (asr)", "asr_all (every triggered image)"]
    assert list(lines["attack success rate (asr)"].get_ydata()) == hist.column("asr")
    assert list(lines["asr_all (every triggered image)"].get_ydata()) == hist.column("asr_all")
    assert lines["asr_all (every triggered image)"].get_linestyle() == "--" and ax.get_legend() is not None


def test_plot_without_asr_is_accuracy_only(tmp_path, figures):
    plot_accuracy([{"round": 1, "test_acc": 0.5}, {"round": 2, "test_acc": 0.6}], tmp_path / "a.png", "title")
    ax = figures[-1].axes[0]
    assert len(ax.get_lines()) == 1 and ax.get_legend() is None
    assert ax.get_ylabel() == "test accuracy" and ax.get_title() == "title"


def test_help_documents_the_backdoor_names(capsys):
    assert main(["matrix", "--help"]) == 0
    text = capsys.readouterr().out
    assert "bd:badnets" in text and "bd:norm_bound" in text and "krum" in text
    assert main(["backdoor-curve", "--help"]) == 0
    assert "--bounds" in capsys.readouterr().out
