"""The inversion audit during training (``--audit_inversion``, ``spfl_vmap.modules.inference.InversionAudit``):
read-only, reported on the audited rounds, one-line errors for bad flags."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spfl_vmap import Config
from spfl_vmap.builder import Simulator
from spfl_vmap.cli import main

AUDIT_KEYS = {"audit_psnr", "audit_ssim", "audit_label_acc", "audit_clients", "audit_round", "audit_s"}
TIMING_KEYS = {"round_s", "clients_per_s", "wall_s"}
BASE = dict(dataset="digits", model="lr", client_num_in_total=6, client_num_per_round=4, comm_round=4,
            frequency_of_the_test=1, progress=False)
AUDIT = dict(audit_inversion="ig", audit_every=2, audit_clients=2, audit_iterations=20)


def run_rows(**kw) -> tuple[list[dict], torch.Tensor]:
    sim = Simulator(Config(**BASE, **kw))
    while not sim.done:
        sim.step()
    return sim.history.rows, sim.w


@pytest.mark.parametrize("extra", [{}, {"grad_prune": 0.5, "use_gradient": True, "lr": 0.5}], ids=["fedavg", "fedsgd_pruned"])
def test_audit_is_read_only_and_reports_on_audited_rounds(extra):
    plain_rows, plain_w = run_rows(**extra)
    rows, w = run_rows(**extra, **AUDIT)
    assert torch.equal(w, plain_w)  # bit-identical final model
    assert len(rows) == len(plain_rows) == 4
    for a, b in zip(rows, plain_rows):
        keep = lambda r: {k: v for k, v in r.items() if k not in AUDIT_KEYS | TIMING_KEYS}
        assert keep(a) == keep(b)
        assert not (set(b) & AUDIT_KEYS)
        audited = a["round"] % 2 == 0
        assert (set(a) >= AUDIT_KEYS) == audited and (bool(set(a) & AUDIT_KEYS)) == audited
        if audited:
            assert a["audit_round"] == a["round"] and a["audit_clients"] == 2
            assert all(math.isfinite(a[k]) for k in ("audit_psnr", "audit_ssim", "audit_label_acc"))
            assert 0.0 <= a["audit_label_acc"] <= 1.0 and -1.0 <= a["audit_ssim"] <= 1.0


def test_audit_of_an_unevaluated_round_reaches_the_next_evaluated_row(tmp_path, capsys):
    out = tmp_path / "r"
    rc = main(["run", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "6", "--client_num_per_round", "4",
               "--comm_round", "4", "--frequency_of_the_test", "3", "--audit_inversion", "idlg", "--audit_every", "2",
               "--audit_clients", "1", "--audit_iterations", "5", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [3, 4]  # evaluated rounds: every 3rd, and the last
    assert [r["audit_round"] for r in rows] == [2, 4]  # round 2's audit is carried into round 3's row
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("audit_psnr", "audit_ssim", "audit_label_acc"))


BAD = [
    (["--audit_inversion", "ig", "--audit_every", "0"], "--audit_every must be >= 1"),
    (["--audit_inversion", "ig", "--audit_clients", "0"], "--audit_clients must be >= 1"),
    (["--audit_inversion", "xyz"], "unknown --audit_inversion"),
    (["--audit_every", "2"], "add --audit_inversion"),
]


@pytest.mark.parametrize("argv,needle", BAD)
def test_bad_audit_flags_are_one_line_errors(argv, needle, capsys, tmp_path):
    assert main(["run", "--dataset", "digits", "--comm_round", "1", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
