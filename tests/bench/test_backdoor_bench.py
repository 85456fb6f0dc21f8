"""``spfl bench backdoor``: the rows it reports and its bad input (timings themselves are not tested)."""

from __future__ import annotations

import pytest

from helpers import small_config
from spfl_vmap.cli import main
from spfl_vmap.errors import ConfigError
from spfl_vmap.experiments.backdoor_bench import VARIANTS, bench_backdoor


def test_every_variant_is_timed_against_the_clean_run():
    cfg = small_config(dataset="digits", client_num_in_total=8, client_num_per_round=4, by_frac=0.25)
    res = bench_backdoor(cfg, list(VARIANTS), repeats=1, log=lambda s: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["clean", *VARIANTS]
    assert rows["clean"]["round_ratio"] == 1.0 and rows["clean"]["run_ratio"] == 1.0
    for r in res["rows"]:
        assert r["round_s"] > 0 and r["eval_s"] > 0
        assert r["round_ratio"] == pytest.approx(r["round_s"] / rows["clean"]["round_s"])
    assert res["config"]["eval_every"] == cfg.frequency_of_the_test


def test_bad_input():
    cfg = small_config(dataset="digits")
    with pytest.raises(ConfigError, match="unknown backdoor variant"):
        bench_backdoor(cfg, ["badnet"], repeats=1)
    with pytest.raises(ConfigError, match="repeats"):
        bench_backdoor(cfg, ["badnets"], repeats=0)
    with pytest.raises(ConfigError, match="clean run"):
        bench_backdoor(cfg.replace(bd_attack="badnets", by_frac=0.25), ["badnets"], repeats=1)


def test_cli_one_line_error(capsys):
    assert main(["bench", "backdoor", "--dataset", "digits", "--variants", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown backdoor variant" in err[0]
