"""The console states the backdoor attack, its attackers and the defenses actually applied."""

from __future__ import annotations

from spfl_vmap.cli import main
from spfl_vmap.runner import describe_lines


def test_console_states_attack_and_defenses(tmp_path, capsys):
    argv = ["run", "--dataset", "digits", "--model", "lr", "--client_num_in_total", "8", "--client_num_per_round", "4",
            "--comm_round", "1", "--bd_attack", "badnets", "--by_workers", "2", "--bd_boost", "3",
            "--bd_defense", "toolkit_clip_noise", "--bd_clip", "0.5", "--bd_noise", "0.01", "--bd_noise_on", "aggregate",
            "--crfl", "--crfl_sigma", "0.002", "--by_defense", "fltrust", "--root_samples", "20",
            "--out", str(tmp_path / "r"), "--no-progress"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "backdoor: badnets, square trigger (9 pixels) -> class 7, 0.5 of each malicious batch, boost 3.0" in out
    assert "backdoor defense: toolkit_clip_noise, clip 0.5 (per_layer), noise std 0.01 on the aggregate" in out
    assert "crfl: the global model is clipped to norm 15 and noised with std 0.002 every round" in out
    assert "server root set: 20 class-stratified training samples" in out


def test_no_backdoor_line_without_the_module():
    assert not [line for line in describe_lines({"aggregator": "mean"}) if "backdoor" in line or "crfl" in line]
