"""``spfl ats-search``: ATS's search for transformation policies (Gao et al., CVPR 2021).

For a dataset and model:

1. build the model at its seeded initialization (the S_acc model) and train a copy briefly,
   ``train_steps`` SGD steps (momentum 0.9) on random training batches without transforms (the
   S_pri model; ATS trains on 10% of the training set for 100 epochs);
2. draw ``num_candidates`` distinct random policies of at most ``max_len`` sub-policies
   (:func:`spfl_vmap.defenses.ats_search.random_policies`), or take the given ones;
3. score them together with the identity (the baseline, no transform): S_pri on the first
   ``pri_per_class`` test images of each class (ATS: 5), S_acc over ``acc_runs`` windows of the
   test set (ATS: 10); see :mod:`spfl_vmap.defenses.ats_search`. Each candidate's random signs
   come from a generator seeded by ``(seed, purpose, policy)``, and the noise images are shared,
   so a policy's scores do not depend on which other candidates are scored with it;
4. write ``ats_search.csv`` (rank, policy, S_pri, S_acc, kept, ops; kept policies first by
   ascending S_pri) and ``ats_search.json`` (settings, the baseline, the trained model's test
   accuracy, every score, timings). ``--data_recovery_protection --ats_policy_file
   ats_search.csv --topn K`` trains with the top ``K`` kept policies.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

from ..config import Config
from ..data import load_dataset
from ..defenses.ats import Policy, describe_policy, parse_policy, policy_name
from ..defenses.ats_search import (
    ATS_THRESHOLD,
    SearchData,
    acc_windows,
    pri_images,
    random_policies,
    rank_rows,
    score_policies,
    sign_uniforms,
    write_policy_csv,
)
from ..engine.params import init_model
from ..engine.simulator import resolve_device
from ..errors import ConfigError
from ..modules.inference import pixel_stats
from ..rng import generator
from ..runner import write_json_atomic

Params = dict[str, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """What ``spfl ats-search`` scores, and how. Defaults are sized for a 2-core CPU."""

    num_candidates: int = 32  # ATS: 1,600
    max_len: int = 3  # ATS: 3
    threshold: float = ATS_THRESHOLD  # keep S_acc >= this (ATS: -85)
    train_steps: int = 100  # SGD steps of the S_pri model
    train_lr: float = 0.01
    train_batch: int = 64
    pri_per_class: int = 1  # S_pri images per class (ATS: 5)
    acc_runs: int = 10  # S_acc windows (ATS: 10)
    policies: Optional[tuple[str, ...]] = None  # score these instead of random candidates


def check_spec(spec: SearchSpec) -> None:
    """One-line errors for settings the search cannot run with."""
    for flag, v, lo in (("--num_candidates", spec.num_candidates, 1), ("--max_len", spec.max_len, 1),
                        ("--train_steps", spec.train_steps, 0), ("--train_batch", spec.train_batch, 1),
                        ("--pri_per_class", spec.pri_per_class, 1), ("--acc_runs", spec.acc_runs, 1)):
        if v < lo:
            raise ConfigError(f"{flag} must be >= {lo}, got {v}")
    if not spec.train_lr > 0:
        raise ConfigError(f"--train_lr must be > 0, got {spec.train_lr}")
    if spec.threshold != spec.threshold:
        raise ConfigError("--threshold must be a number, got nan")


def candidates(spec: SearchSpec, seed: int) -> list[Policy]:
    """The given policies (parsed, duplicates dropped), or ``num_candidates`` random ones."""
    if spec.policies:
        out: list[Policy] = []
        for s in spec.policies:
            p = parse_policy(s)
            if p not in out:
                out.append(p)
        return out
    return random_policies(spec.num_candidates, spec.max_len, generator(seed, "ats-search-candidates"))


def train_briefly(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float,
                  g: torch.Generator) -> Params:
    """``steps`` SGD steps (momentum 0.9) on random batches of ``(x, y)`` drawn with ``g``."""
    p = {k: v.detach().clone() for k, v in params.items()}
    buf = {k: torch.zeros_like(v) for k, v in p.items()}

    def loss(q: Params, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, q, (xb,)), yb)

    step = grad(loss)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (min(batch, len(y)),), generator=g).to(x.device)
        gr = step(p, x[idx], y[idx])
        for k in p:
            buf[k] = 0.9 * buf[k] + gr[k]
            p[k] = p[k] - lr * buf[k]
    return p


@torch.no_grad()
def accuracy(model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    correct = sum(int((functional_call(model, params, (x[i : i + batch],)).argmax(1) == y[i : i + batch]).sum())
                  for i in range(0, len(y), batch))
    return correct / max(len(y), 1)


def policy_signs(seed: int, purpose: str, policy: Policy, lead: tuple[int, ...], max_len: int) -> torch.Tensor:
    """``(*lead, max_len)`` sign uniforms of one policy, seeded by ``(seed, purpose, policy)``."""
    return sign_uniforms(1, lead, max_len, generator(seed, purpose, policy_name(policy) or "identity"))[0]


def run_ats_search(cfg: Config, spec: SearchSpec, out: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Score the candidates of ``spec`` for ``cfg``'s dataset and model; write the CSV and JSON to ``out``.

    Returns:
        The contents of ``ats_search.json``.
    """
    check_spec(spec)
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download, synthetic_train=cfg.synthetic_train,
                      synthetic_test=cfg.synthetic_test)
    model = init_model(cfg.model, ds.input_shape, ds.num_classes, cfg.model_width, cfg.seed).to(device)
    untrained = {k: v.detach() for k, v in model.named_parameters()}
    x_train, y_train = ds.x_train.to(device), ds.y_train.to(device)
    x_test, y_test = ds.x_test.to(device), ds.y_test.to(device)
    log(f"spfl ats-search: {cfg.dataset} {cfg.model}, training the S_pri model for {spec.train_steps} steps")
    trained = train_briefly(model, untrained, x_train, y_train, spec.train_steps, spec.train_batch, spec.train_lr,
                            generator(cfg.seed, "ats-search-train"))
    acc_trained = accuracy(model, trained, x_test, y_test)
    mean, std = (t.to(device) for t in pixel_stats(cfg.dataset, ds.x_train))

    def to_pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * std + mean).clamp(0.0, 1.0)

    pri_idx = pri_images(ds.y_test, ds.num_classes, spec.pri_per_class)
    windows = acc_windows(ds.y_test, spec.acc_runs)
    pri_x = to_pixels(x_test[pri_idx.to(device)])
    noise = torch.rand(pri_x.shape, generator=generator(cfg.seed, "ats-search-noise"), dtype=pri_x.dtype).to(device)
    data = SearchData(pri_x, y_test[pri_idx.to(device)], noise, [to_pixels(x_test[w.to(device)]) for w in windows], mean, std)

    cands = candidates(spec, cfg.seed)
    policies: list[Policy] = [()] + cands  # the identity first: the baseline
    L = max(len(p) for p in policies)
    I = len(pri_idx)
    pri_signs = torch.stack([policy_signs(cfg.seed, "ats-search-pri", p, (I,), L) for p in policies])  # (P, I, L)
    acc_signs = [torch.stack([policy_signs(cfg.seed, f"ats-search-acc-{r}", p, (len(w),), L) for p in policies])
                 for r, w in enumerate(windows)]  # per run (P, K_r, L)
    log(f"scoring {len(cands)} candidates and the identity: S_pri on {I} images x 21 points, S_acc on "
        f"{len(windows)} windows of {min(len(w) for w in windows)}-{max(len(w) for w in windows)} images")
    t1 = time.perf_counter()
    sc = score_policies(model, trained, untrained, policies, data, pri_signs, acc_signs, log=log)
    score_s = time.perf_counter() - t1
    s_pri, s_acc = sc.s_pri.tolist(), sc.s_acc.tolist()
    rows = rank_rows(cands, s_pri[1:], s_acc[1:], spec.threshold, describe_policy)
    out.mkdir(parents=True, exist_ok=True)
    write_policy_csv(out / "ats_search.csv", rows)
    kept = [r["policy"] for r in rows if r["kept"]]
    report = {
        "dataset": cfg.dataset, "model": cfg.model, "seed": cfg.seed, "settings": dataclasses.asdict(spec),
        "baseline": {"policy": "identity", "S_pri": s_pri[0], "S_acc": s_acc[0]},
        "trained_test_acc": acc_trained, "pri_images": pri_idx.tolist(), "acc_windows": [w.tolist() for w in windows],
        "num_candidates": len(cands), "num_kept": len(kept), "kept": kept,
        "use": f"--data_recovery_protection --ats_policy_file {out / 'ats_search.csv'} --topn {max(1, min(2, len(kept)))}",
        "rows": rows, "score_s": score_s, "total_s": time.perf_counter() - t0, "device": str(device),
    }
    write_json_atomic(out / "ats_search.json", report)
    return report


__all__ = ["SearchSpec", "accuracy", "candidates", "check_spec", "run_ats_search", "train_briefly"]
