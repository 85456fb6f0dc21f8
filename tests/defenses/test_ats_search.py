"""ATS policy search: the batched S_pri and S_acc against a per-policy loop written as ATS's
``search_transform_attack.py`` computes them (nn.Module autograd, numpy corrcoef/eig); candidate
draws; the ranked CSV, reading it back and using it as the ATS list; one-line errors."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spfl_vmap import Config, ConfigError
from spfl_vmap.cli import main
from spfl_vmap.defenses.ats import SUB_POLICIES, apply_policy, parse_policies, parse_policy
from spfl_vmap.defenses.ats_search import (
    SearchData,
    area_ratio,
    random_policies,
    rank_rows,
    read_policy_csv,
    score_policies,
    transform_candidates,
    write_policy_csv,
)
from spfl_vmap.modules.inference import resolve_policies

C, H, W, K = 1, 7, 6, 4  # not powers of two


def tiny_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(C, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * H * W, 8), nn.ReLU(),
                             nn.Linear(8, K))


POLICIES = [parse_policy(s) for s in ("3-1-7", "43-18", "12", "0-21-24")]  # translate, contrast, colour, invert...


def make_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    I = 3
    pri_x = torch.rand(I, C, H, W, generator=g)
    pri_y = torch.tensor([0, 2, 3])
    noise = torch.rand(I, C, H, W, generator=g)
    acc_x = [torch.rand(4, C, H, W, generator=g), torch.rand(3, C, H, W, generator=g)]  # windows of different sizes
    mean, std = torch.full((C, 1, 1), 0.4), torch.full((C, 1, 1), 0.3)
    P, L = len(POLICIES), 3
    pri_signs = torch.rand(P, I, L, generator=g, dtype=torch.float64)
    acc_signs = [torch.rand(P, len(x), L, generator=g, dtype=torch.float64) for x in acc_x]
    return SearchData(pri_x, pri_y, noise, acc_x, mean, std), pri_signs, acc_signs


def one_policy(pixels: torch.Tensor, policy, signs: torch.Tensor) -> torch.Tensor:
    """ATS's transform of each image by one policy: apply_policy with that policy alone."""
    u = torch.cat([torch.zeros(*signs.shape[:-1], 1, dtype=torch.float64), signs[..., : len(policy)],
                   torch.zeros(*signs.shape[:-1], len(policy), dtype=torch.float64)], -1)
    return apply_policy(pixels, [policy], u)


def ats_reconstruct(model: nn.Module, gt: torch.Tensor, label: torch.Tensor, noise_input: torch.Tensor, bin_num: int = 20) -> float:
    """search_transform_attack.py's ``reconstruct`` for one image (normalized ``gt (1, C, H, W)``)."""
    target_loss = F.cross_entropy(model(gt), label)
    input_gradient = torch.autograd.grad(target_loss, model.parameters())
    dw_list = []
    for dis_iter in range(bin_num + 1):
        fake = (1.0 / bin_num * dis_iter * gt + 1.0 / bin_num * (bin_num - dis_iter) * noise_input).detach()
        fake_dw = torch.autograd.grad(F.cross_entropy(model(fake), label), model.parameters())
        cos = [F.cosine_similarity(a.flatten()[None], b.flatten()[None]).item() for a, b in zip(fake_dw, input_gradient)]
        dw_list.append(sum(cos) / len(input_gradient))
    inter = torch.mean(torch.abs(noise_input - gt)).item() / bin_num
    area = sum((dw_list[i - 1] + dw_list[i]) * inter / 2 for i in range(1, len(dw_list)))
    return area / (inter * bin_num)


def ats_eval_score(model: nn.Module, x: torch.Tensor) -> float:
    """``get_batch_jacobian`` + ``eval_score`` of search_transform_attack.py."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(torch.ones_like(y))
    jacob = x.grad.detach().reshape(x.shape[0], -1).double().numpy()
    v, _ = np.linalg.eig(np.corrcoef(jacob))
    k = 1e-5
    return float(np.real(-np.sum(np.log(v + k) + 1.0 / (v + k))))


def test_scores_equal_a_per_policy_loop_of_ats_code():
    model = tiny_model()
    data, pri_signs, acc_signs = make_data()
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(5)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}  # a different "trained" model
    got = score_policies(model, trained, params, POLICIES, data, pri_signs, acc_signs)
    mean, std = data.mean, data.std
    noise = (data.pri_noise - mean) / std
    trained_model = tiny_model()
    with torch.no_grad():
        for (k, p) in trained_model.named_parameters():
            p.copy_(trained[k])
    for i, pol in enumerate(POLICIES):
        xp = (one_policy(data.pri_x, pol, pri_signs[i]) - mean) / std
        per_image = [ats_reconstruct(trained_model, xp[j : j + 1], data.pri_y[j : j + 1], noise[j : j + 1]) for j in range(len(xp))]
        assert got.s_pri_images[i].tolist() == pytest.approx(per_image, rel=1e-5, abs=1e-6)
        assert float(got.s_pri[i]) == pytest.approx(float(np.mean(per_image)), rel=1e-5)
        runs = [ats_eval_score(model, (one_policy(x, pol, s[i]) - mean) / std) for x, s in zip(data.acc_x, acc_signs)]
        assert got.s_acc_runs[i].tolist() == pytest.approx(runs, rel=1e-4)
        assert float(got.s_acc[i]) == pytest.approx(float(np.mean(runs)), rel=1e-4)
    # the identity scores as the untransformed images; the curve ends at 1 (the image itself)
    base = score_policies(model, trained, params, [()], data, pri_signs[:1], [s[:1] for s in acc_signs])
    ref = [ats_reconstruct(trained_model, ((data.pri_x[j : j + 1] - mean) / std), data.pri_y[j : j + 1], noise[j : j + 1])
           for j in range(3)]
    assert float(base.s_pri[0]) == pytest.approx(float(np.mean(ref)), rel=1e-5)
    assert float(base.curve[0, -1]) == pytest.approx(1.0, abs=1e-5)


def test_candidates_are_transformed_as_one_policy_each():
    data, signs, _ = make_data(2)
    got = transform_candidates(data.pri_x, POLICIES, signs)  # (P, I, C, H, W)
    for i, pol in enumerate(POLICIES):
        torch.testing.assert_close(got[i], one_policy(data.pri_x, pol, signs[i]), atol=1e-6, rtol=0)
    assert not torch.allclose(got[0], data.pri_x)


def test_area_ratio_is_the_trapezoid_mean():
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    assert float(area_ratio(t**2)) == pytest.approx(1 / 3 + 1 / (6 * 20**2))  # trapezoid error of x^2: h^2 / 6
    assert float(area_ratio(torch.ones(21))) == 1.0


def test_random_policies_follow_ats_draws():
    pols = random_policies(300, 3, torch.Generator().manual_seed(0))
    assert len(set(pols)) == 300 and all(1 <= len(p) <= 3 for p in pols)
    assert all(0 <= i < len(SUB_POLICIES) for p in pols for i in p)
    # each slot is empty with probability 1/51: lengths 3, 2, 1 in proportion ~ 50^3 : 3 * 50^2 : 3 * 50
    assert sum(len(p) == 3 for p in pols) > 0.9 * 300
    assert pols == random_policies(300, 3, torch.Generator().manual_seed(0))
    assert pols[:10] != random_policies(10, 3, torch.Generator().manual_seed(1))
    assert random_policies(50, 1, torch.Generator().manual_seed(0)) != []  # the whole space of single ops
    with pytest.raises(ConfigError, match="only 50 distinct"):
        random_policies(51, 1, torch.Generator().manual_seed(0))


# ---- the ranked CSV -------------------------------------------------------------------------------
def test_rows_are_ranked_by_s_pri_among_kept(tmp_path):
    pols = [parse_policy(s) for s in ("1", "2-3", "4", "5", "6")]
    rows = rank_rows(pols, [0.5, 0.2, 0.3, float("nan"), 0.1], [-10, -20, -90, -5, -84.9], -85.0)
    assert [r["policy"] for r in rows] == ["6", "2-3", "1", "4", "5"]  # kept by S_pri, then the rest (NaN last)
    assert [r["rank"] for r in rows] == [1, 2, 3, "", ""]
    assert [r["kept"] for r in rows] == [True, True, True, False, False]
    path = tmp_path / "ats_search.csv"
    write_policy_csv(path, rows)
    with open(path) as fh:
        back = list(csv.DictReader(fh))
    assert [r["policy"] for r in back] == ["6", "2-3", "1", "4", "5"] and back[0]["kept"] == "true"
    assert float(back[1]["S_pri"]) == pytest.approx(0.2) and float(back[0]["S_acc"]) == pytest.approx(-84.9)
    assert read_policy_csv(path) == ("6", "2-3", "1")


def test_policy_file_drives_the_ats_defense(tmp_path):
    path = tmp_path / "found.csv"
    write_policy_csv(path, rank_rows([parse_policy(s) for s in ("3-1-7", "43-18-18", "12")], [0.2, 0.1, 0.3],
                                     [-10, -10, -100], -85.0))
    base = dict(dataset="digits", model="lr", data_recovery_protection=True, ats_policy_file=str(path), progress=False)
    assert resolve_policies(Config(**base)) == (f"{path}[:2]", parse_policies("43-18-18+3-1-7"))  # --topn 2 by default
    assert resolve_policies(Config(**base, augid=1)) == (f"{path}[1]", parse_policies("3-1-7"))
    assert resolve_policies(Config(**base, topn=1))[1] == parse_policies("43-18-18")
    with pytest.raises(ConfigError, match="--topn 3: the ATS list .* has 2 policies"):
        Config(**base, topn=3)  # the rejected 12 is not in the list
    # a header-less list (the toolkit's policy_list_*.csv) and a CSV without a kept column
    (tmp_path / "plain.csv").write_text("41-11-31\n34-11-36\n")
    assert read_policy_csv(tmp_path / "plain.csv") == ("41-11-31", "34-11-36")
    (tmp_path / "nokept.csv").write_text("policy,S_pri\n3-1-7,0.2\n0,0.3\n")
    assert read_policy_csv(tmp_path / "nokept.csv") == ("3-1-7", "0")


@pytest.mark.parametrize("content,words", [
    (None, "cannot read it"),
    ("", "the file is empty"),
    ("policy,kept\n3-1-77,true\n", "unknown sub-policy id 77"),
    ("policy,kept\n3-1-7,maybe\n", "line 2: kept must be true or false"),
    ("policy,kept\n3-1-7,false\n", "no kept policy"),
])
def test_bad_policy_files_are_one_line_errors(tmp_path, content, words):
    path = tmp_path / "p.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        read_policy_csv(path)
    assert words in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("argv,words", [
    (["run", "--dataset", "digits", "--ats_policy_file", "x.csv"], "add --data_recovery_protection"),
    (["run", "--dataset", "digits", "--data_recovery_protection", "--ats_policy_file", "nope/x.csv"], "cannot read it"),
    (["run", "--dataset", "digits", "--data_recovery_protection", "--ats_policy_file", "x.csv", "--ats_policy", "3"],
     "not both"),
    (["ats-search", "--dataset", "digits", "--num_candidates", "0"], "--num_candidates must be >= 1"),
    (["ats-search", "--dataset", "digits", "--max_len", "1", "--num_candidates", "60"], "only 50 distinct"),
    (["ats-search", "--dataset", "digits", "--policies", "3-1-77"], "unknown sub-policy id 77"),
    (["ats-search", "--dataset", "nope"], "nope"),
    (["ats-search", "--dataset", "digits", "--model", "convnet"], "convnet"),
    (["ats-search", "--dataset", "digits", "--acc_runs", "400"], "too small"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    assert main(argv + (["--out", str(tmp_path / "o")] if argv[0] == "ats-search" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_ats_search_command_writes_a_csv_that_drives_a_run(tmp_path, capsys):
    out = tmp_path / "search"
    argv = ["ats-search", "--dataset", "digits", "--model", "cnn", "--num_candidates", "3", "--train_steps", "3",
            "--acc_runs", "2", "--threshold", "-1000000000", "--seed", "3", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "ats_search.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["kept"] == "true" for r in rows)
    s_pri = [float(r["S_pri"]) for r in rows]
    assert s_pri == sorted(s_pri) and all(0 < v <= 1 for v in s_pri) and all(math.isfinite(float(r["S_acc"])) for r in rows)
    assert "--ats_policy_file" in capsys.readouterr().out
    cfg = Config(dataset="digits", model="lr", data_recovery_protection=True, ats_policy_file=str(out / "ats_search.csv"),
                 augid=0, progress=False)
    assert resolve_policies(cfg)[1] == (parse_policy(rows[0]["policy"]),)
    # a policy's scores do not depend on the other candidates scored with it
    again = tmp_path / "again"
    assert main(argv[:-2] + ["--policies", rows[1]["policy"], "--out", str(again)]) == 0
    with open(again / "ats_search.csv") as fh:
        alone = list(csv.DictReader(fh))
    assert float(alone[0]["S_pri"]) == pytest.approx(float(rows[1]["S_pri"]), rel=1e-5)
    assert float(alone[0]["S_acc"]) == pytest.approx(float(rows[1]["S_acc"]), rel=1e-5)
