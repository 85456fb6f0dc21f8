"""Tests for ``spfl privacy-epsilon`` (spfl_vmap.cli.privacy_epsilon.privacy_epsilon_main)."""

from __future__ import annotations

import pytest

from spfl_vmap.privacy.accountant import compute_epsilon
from spfl_vmap.cli.privacy_epsilon import privacy_epsilon_main

OPACUS_ARGS = ["--noise_multiplier", "1.5", "--steps", "2250", "--delta", "1e-5"]


def _value(line: str, name: str) -> float:
    key, _, value = line.partition(" = ")
    assert key == name
    return float(value)


@pytest.mark.parametrize("rate_flag", ["--sample_rate", "--sample-rate"])
def test_prints_epsilon(capsys, rate_flag):
    # 7.32911117143: pinned in pytorch/opacus opacus/tests/accountants_test.py
    assert privacy_epsilon_main([rate_flag, "0.04", *OPACUS_ARGS]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert _value(out.out.strip(), "epsilon") == pytest.approx(7.32911117143, abs=1e-6)


def test_dashes_with_equals_and_prv(capsys):
    argv = ["--sample-rate=0.02", "--noise-multiplier=1.0", "--steps=100", "--delta=1e-5",
            "--accountant", "prv"]
    assert privacy_epsilon_main(argv) == 0
    eps = _value(capsys.readouterr().out.strip(), "epsilon")
    assert eps == pytest.approx(compute_epsilon(0.02, 1.0, 100, 1e-5, "prv"), abs=1e-6)


def test_target_epsilon_prints_noise_multiplier(capsys):
    argv = ["--sample_rate", "0.04", "--target-epsilon", "2", "--steps", "300", "--delta", "1e-5"]
    assert privacy_epsilon_main(argv) == 0
    sigma_line, eps_line = capsys.readouterr().out.strip().splitlines()
    sigma = _value(sigma_line, "noise_multiplier")
    eps = _value(eps_line, "epsilon")
    assert 0.99 * 2 <= eps <= 2.0
    assert compute_epsilon(0.04, sigma, 300, 1e-5) <= 2.0 + 1e-5  # sigma is printed rounded


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--sample_rate", "1.5", *OPACUS_ARGS], "sample_rate must be in (0, 1]"),
        (["--sample_rate", "0.1", "--noise_multiplier", "-1", "--steps", "5", "--delta", "1e-5"],
         "noise_multiplier"),
        (["--sample_rate", "0.1", "--noise_multiplier", "1", "--steps", "-5", "--delta", "1e-5"],
         "steps"),
        (["--sample_rate", "0.1", "--noise_multiplier", "1", "--steps", "5", "--delta", "1"],
         "delta"),
        (["--sample_rate", "0.1", "--steps", "5", "--delta", "1e-5"], "--noise_multiplier"),
        (["--noise_multiplier", "1", "--steps", "5", "--delta", "1e-5"], "--sample_rate"),
        (["--sample_rate", "x", *OPACUS_ARGS], "invalid float value"),
        (["--sample_rate", "0.1", *OPACUS_ARGS, "--target_epsilon", "3"], "not allowed"),
        (["--sample_rate", "0.1", *OPACUS_ARGS, "--accountant", "moments"], "invalid choice"),
        (["--sample_rate", "0.1", *OPACUS_ARGS, "--bogus"], "unrecognized"),
        (["--sample_rate", "0.1", "--target_epsilon", "1e-9", "--steps", "10", "--delta", "1e-5"],
         "too small"),
    ],
)
def test_bad_input_prints_one_error_line_and_returns_2(capsys, argv, fragment):
    assert privacy_epsilon_main(argv) == 2
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in out.err


def test_help_returns_0(capsys):
    assert privacy_epsilon_main(["--help"]) == 0
    assert "--sample_rate" in capsys.readouterr().out
