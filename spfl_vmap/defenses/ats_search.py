"""ATS policy search: score candidate transformation policies for privacy and trainability (the pure layer).

Gao, Guo, Liu, Tang, Wu & Zhang, "Privacy-preserving Collaborative Learning with Automatic
Transformation Search", CVPR 2021 (code: gaow0007/ATSPrivacy, ``benchmark/search_transform_attack.py``,
``searchalg/batch_generate.py`` and ``searchalg/search_best.py``). Two scores per policy:

* **S_pri** (``reconstruct``), on a briefly trained model: for an image ``x`` transformed by the
  policy, with its label, take the gradient ``g*`` of the loss, then walk in 20 bins from
  uniform noise ``n`` (in pixel space, normalized) to the image, ``x_i = (i/20) x + (1 - i/20) n``,
  ``i = 0..20``; at each point the similarity is the mean over parameter tensors of the cosine
  between the gradient at ``x_i`` and ``g*``. S_pri is the trapezoidal area under that curve
  divided by its largest possible value (``area_ratio``): ATS multiplies and divides by the
  mean absolute distance ``|n - x| / 20``, which cancels, so S_pri is the mean of the curve over
  ``t`` in ``[0, 1]`` (1 at most). A smooth, aligned gradient landscape (high S_pri) is one that
  gradient inversion descends easily: lower is more private. ATS averages it over 5 test images
  per class.
* **S_acc** (``accuracy_metric``), on the untrained model: the Jacobian-correlation score of
  Mellor et al., "Neural Architecture Search without Training" (2021). For a batch of
  transformed images (in a window of 100 test images, the first of each class), ``J`` holds each
  image's gradient of its summed logits with respect to the input; with ``lambda`` the eigenvalues
  of ``np.corrcoef(J)``, the score is ``-sum(log(lambda + 1e-5) + 1 / (lambda + 1e-5))``. Images
  whose input gradients are correlated (the transformation erases what tells them apart) score
  low. ATS averages 10 windows (test images ``200 + 100 run ...``).
* **Search**: candidates are random policies of up to 3 sub-policies (each slot draws an id in
  ``-1..50`` and ``-1`` is dropped; ``50`` is out of range of the 50-entry list, a bug we do not
  copy: our slots draw ``-1..49``); ``search_best.py`` sorts by mean S_pri, ascending, and keeps
  those with mean S_acc ``>= -85``.

What is batched: the transformed images of all candidates come from one
:func:`~spfl_vmap.defenses.ats.apply_policy` call (candidate ``p``'s rows are forced to policy
``p`` of a "hybrid" of all candidates), and every model evaluation runs over the stacked
``[candidates x images x 21 points]`` (S_pri: ``vmap(grad)`` of per-sample losses, with shared
parameters) or ``[candidates x images]`` (S_acc: one backward of the summed logits gives every
image's input gradient), in memory-bounded chunks. Only S_acc's windows are a Python loop (10
runs; a window's image count depends on which classes it holds), and inside each the
correlation matrices and their eigenvalues of all candidates are one batched ``eigvalsh``.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from ..errors import ConfigError
from .ats import SUB_POLICIES, Policy, apply_policy, parse_policy, policy_name

BINS = 20  # search_transform_attack.py: bin_num
EIG_EPS = 1e-5  # eval_score: k
ATS_THRESHOLD = -85.0  # search_best.py: result[2] >= -85
ACC_WINDOW, ACC_START = 100, 200  # accuracy_metric: indices 200 + run * 100 + i, i < 100

Params = dict[str, torch.Tensor]


# ---- candidates -------------------------------------------------------------------------------------
def random_policies(n: int, max_len: int, generator: torch.Generator, exclude: Sequence[Policy] = ()) -> list[Policy]:
    """``n`` distinct random policies as ATS's ``batch_generate.py`` draws them.

    Each of ``max_len`` slots draws uniformly from ``-1`` (empty) and the sub-policy ids
    ``0..49``; empty slots are dropped. An all-empty draw (the identity) and repeats are drawn again.

    Raises:
        ConfigError: ``n`` exceeds the number of distinct policies of at most ``max_len`` ops.
    """
    S = len(SUB_POLICIES)
    space = sum(S**k for k in range(1, max_len + 1))
    if n > space:
        raise ConfigError(f"--num_candidates {n}: there are only {space} distinct policies of at most {max_len} sub-policies")
    seen = set(exclude)
    out: list[Policy] = []
    while len(out) < n:
        draw = torch.randint(-1, S, (max_len,), generator=generator).tolist()
        p = tuple(i for i in draw if i >= 0)
        if p and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def sign_uniforms(P: int, lead: Sequence[int], max_len: int, generator: torch.Generator) -> torch.Tensor:
    """``(P, *lead, max_len)`` uniforms: candidate ``p``'s sign draw for op slot ``l`` of each image."""
    return torch.rand(P, *lead, max_len, generator=generator, dtype=torch.float64)


def transform_candidates(pixels: torch.Tensor, policies: Sequence[Policy], signs: torch.Tensor) -> torch.Tensor:
    """Every candidate's transformation of the same images, in one :func:`apply_policy` call.

    Args:
        pixels: ``(*lead, C, H, W)`` images in ``[0, 1]``.
        policies: The ``P`` candidates.
        signs: ``(P, *lead, L)`` sign uniforms (:func:`sign_uniforms`), ``L >= max(len(p))``;
            op ``l`` of candidate ``p`` gets sign ``+1`` where ``signs[p, ..., l] < 0.5``.

    Returns:
        ``(P, *lead, C, H, W)``. Row ``p`` equals ``apply_policy(pixels, [policies[p]], u)`` with
        ``u = [0, signs[p, ..., :len(p)]]``: all candidates are passed as one hybrid whose
        choice draw is fixed to ``p`` on row ``p``.
    """
    P = len(policies)
    L = max(len(p) for p in policies)
    lead = pixels.shape[:-3]
    x = pixels.expand(P, *pixels.shape)
    choice = ((torch.arange(P, dtype=torch.float64) + 0.5) / P).view(P, *([1] * len(lead)), 1).expand(P, *lead, 1)
    u = torch.cat([choice, signs[..., :L], torch.zeros(P, *lead, L, dtype=torch.float64)], dim=-1)  # no prob gates
    return apply_policy(x, list(policies), u)


# ---- S_pri ------------------------------------------------------------------------------------------
def interpolation_curve(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, bins: int = BINS,
    chunk: Optional[int] = None, max_bytes: int = 512 << 20,
) -> torch.Tensor:
    """ATS's gradient-similarity curve from noise to each image.

    Args:
        model: The model (used with ``functional_call``).
        params: Its trained parameters ``{name: (*shape)}``.
        x: ``(M, C, H, W)`` normalized (transformed) images.
        y: ``(M,)`` their labels.
        noise: ``(M, C, H, W)`` normalized noise, the start of each path.
        bins: Intervals of the path (ATS: 20).
        chunk: Images whose ``bins + 1`` gradients are held at once (default: from ``max_bytes``).

    Returns:
        ``(M, bins + 1)``: at point ``i``, the mean over parameter tensors of the cosine between
        the loss gradient at ``(i / bins) x + (1 - i / bins) noise`` and the one at ``x`` (the
        last point, so the curve ends at 1).
    """
    names = list(params)
    D = sum(p.numel() for p in params.values())
    if chunk is None:
        chunk = max(1, max_bytes // (4 * 3 * D * (bins + 1)))
    t = torch.arange(bins + 1, dtype=x.dtype, device=x.device) / bins  # (T,)

    def loss(p: Params, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    curves = []
    for lo in range(0, x.shape[0], chunk):
        xb, nb, yb = x[lo : lo + chunk], noise[lo : lo + chunk], y[lo : lo + chunk]
        m = xb.shape[0]
        # ATS: (1/bins * i) * gt + (1/bins * (bins - i)) * noise
        path = t.view(1, -1, 1, 1, 1) * xb[:, None] + (1.0 - t).view(1, -1, 1, 1, 1) * nb[:, None]  # (m, T, C, H, W)
        g = per_sample(params, path.flatten(0, 1), yb.repeat_interleave(bins + 1))  # {name: (m*T, *shape)}
        cos = torch.zeros(m, bins + 1, dtype=x.dtype, device=x.device)
        for k in names:
            gk = g[k].reshape(m, bins + 1, -1)  # (m, T, n_k)
            cos += cosine(gk, gk[:, -1:].expand_as(gk))
        curves.append((cos / len(names)).detach())
    return torch.cat(curves)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity over the last dimension, ``F.cosine_similarity``'s formula
    (``a.b / (max(|a|, eps) max(|b|, eps))``)."""
    return (a * b).sum(-1) / (a.norm(dim=-1).clamp(min=eps) * b.norm(dim=-1).clamp(min=eps))


def area_ratio(curve: torch.Tensor) -> torch.Tensor:
    """``(..., T) -> (...)``: ATS's ``area_ratio``, the trapezoidal area under a curve sampled at
    ``T`` equally spaced points of ``[0, 1]`` (its interval length cancels)."""
    return ((curve[..., 1:] + curve[..., :-1]) / 2).mean(dim=-1)


# ---- S_acc ------------------------------------------------------------------------------------------
def input_jacobians(model: nn.Module, params: Params, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``(M, C, H, W) -> (M, C*H*W)``: each image's gradient of its summed logits with respect
    to the input (ATS's ``get_batch_jacobian``: ``y.backward(ones_like(y))``; the samples are
    independent, so one backward over the batch gives every image's own gradient)."""

    def total(xb: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (xb,)).sum()

    out = [grad(total)(x[lo : lo + chunk]).reshape(min(chunk, x.shape[0] - lo), -1).detach() for lo in range(0, x.shape[0], chunk)]
    return torch.cat(out)


def jacobian_score(J: torch.Tensor) -> torch.Tensor:
    """``(..., K, n) -> (...)``: Mellor et al.'s score as ATS's ``eval_score`` computes it.

    ``-sum(log(lambda + 1e-5) + 1 / (lambda + 1e-5))`` over the eigenvalues ``lambda`` of the
    ``K x K`` correlation matrix of the rows (``np.corrcoef``), in float64.
    """
    Z = J.to(torch.float64)
    Z = Z - Z.mean(dim=-1, keepdim=True)
    Z = Z / Z.norm(dim=-1, keepdim=True)
    corr = Z @ Z.transpose(-1, -2)  # (..., K, K)
    lam = torch.linalg.eigvalsh(corr)
    return -(torch.log(lam + EIG_EPS) + 1.0 / (lam + EIG_EPS)).sum(dim=-1)


def acc_windows(y_test: torch.Tensor, runs: int, start: int = ACC_START, window: int = ACC_WINDOW) -> list[torch.Tensor]:
    """ATS's S_acc image sets: for run ``r``, the first test image of each class among test
    images ``start + window r .. start + window (r + 1) - 1``. A test set too short for that
    starts at 0 instead, with windows of ``len // runs`` images.

    Raises:
        ConfigError: Fewer than 2 images per window.
    """
    n = len(y_test)
    if start + window * runs > n:
        start, window = 0, min(window, n // max(runs, 1))
    if window < 2:
        raise ConfigError(f"--acc_runs {runs}: the test set ({n} images) is too small for {runs} windows")
    out = []
    for r in range(runs):
        lo = start + window * r
        idx, seen = [], set()
        for i in range(lo, lo + window):
            c = int(y_test[i])
            if c not in seen:
                seen.add(c)
                idx.append(i)
        out.append(torch.tensor(idx, dtype=torch.long))
    return out


def pri_images(y_test: torch.Tensor, num_classes: int, per_class: int) -> torch.Tensor:
    """ATS's S_pri images: the first ``per_class`` test images of each class, class by class."""
    idx = []
    for c in range(num_classes):
        where = (y_test == c).nonzero().flatten()[:per_class]
        idx.extend(where.tolist())
    if not idx:
        raise ConfigError("the test set holds no images for the S_pri score")
    return torch.tensor(idx, dtype=torch.long)


# ---- both scores of many candidates -----------------------------------------------------------------
@dataclass
class SearchData:
    """What the scores are computed on (pixel space ``[0, 1]``; ``mean``/``std`` normalize)."""

    pri_x: torch.Tensor  # (I, C, H, W) pixels of the S_pri images
    pri_y: torch.Tensor  # (I,)
    pri_noise: torch.Tensor  # (I, C, H, W) uniform noise pixels, shared by every candidate
    acc_x: list[torch.Tensor]  # per run (K_r, C, H, W) pixels of the S_acc images
    mean: torch.Tensor  # (C, 1, 1)
    std: torch.Tensor  # (C, 1, 1)


@dataclass
class Scores:
    """Scores of ``P`` candidates (``(P,)`` each); ``curve`` is the mean S_pri curve ``(P, BINS + 1)``."""

    s_pri: torch.Tensor
    s_acc: torch.Tensor
    s_pri_images: torch.Tensor  # (P, I)
    s_acc_runs: torch.Tensor  # (P, R)
    curve: torch.Tensor


def score_policies(
    model: nn.Module, trained: Params, untrained: Params, policies: Sequence[Policy], data: SearchData,
    pri_signs: torch.Tensor, acc_signs: Sequence[torch.Tensor], bins: int = BINS,
    log: Callable[[str], None] = lambda s: None,
) -> Scores:
    """S_pri and S_acc of ``P`` candidate policies, batched over candidates.

    Args:
        model: The architecture (used functionally).
        trained: Parameters of the briefly trained model (S_pri).
        untrained: Parameters at initialization (S_acc).
        policies: The candidates; an empty policy ``()`` is the identity (the baseline).
        data: The images, the noise and the normalization.
        pri_signs: ``(P, I, L)`` sign uniforms of the S_pri images' transformations.
        acc_signs: Per run ``(P, K_r, L)`` sign uniforms of the S_acc images'.
        bins: S_pri's path intervals.

    Returns:
        :class:`Scores`. A candidate whose images give a NaN score keeps NaN (never kept).
    """
    P = len(policies)
    mean, std = data.mean, data.std

    def transformed(pixels: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:  # (P, *lead, C, H, W), normalized
        active = [i for i, p in enumerate(policies) if p]
        out = pixels.expand(P, *pixels.shape).clone()
        if active:
            out[active] = transform_candidates(pixels, [policies[i] for i in active], signs[active])
        return (out - mean) / std

    xp = transformed(data.pri_x, pri_signs)  # (P, I, C, H, W)
    I = data.pri_x.shape[0]
    noise = ((data.pri_noise - mean) / std).expand(P, *data.pri_noise.shape)  # ATS: (rand - dm) / ds
    log(f"S_pri: {P} candidates x {I} images x {bins + 1} points")
    curve = interpolation_curve(model, trained, xp.flatten(0, 1), data.pri_y.repeat(P), noise.flatten(0, 1), bins)
    curve = curve.view(P, I, bins + 1)
    pri_img = area_ratio(curve)  # (P, I)
    runs = []
    log(f"S_acc: {P} candidates x {len(data.acc_x)} windows")
    for xr, sr in zip(data.acc_x, acc_signs):
        K = xr.shape[0]
        xa = transformed(xr, sr)  # (P, K, C, H, W)
        J = input_jacobians(model, untrained, xa.flatten(0, 1)).view(P, K, -1)
        runs.append(jacobian_score(J))  # (P,)
    acc = torch.stack(runs, dim=1)  # (P, R)
    return Scores(pri_img.mean(dim=1), acc.mean(dim=1), pri_img, acc, curve.mean(dim=1))


# ---- the ranked CSV ---------------------------------------------------------------------------------
CSV_FIELDS = ("rank", "policy", "S_pri", "S_acc", "kept", "ops")


def rank_rows(policies: Sequence[Policy], s_pri: Sequence[float], s_acc: Sequence[float], threshold: float,
              describe: Callable[[Policy], str] = lambda p: "") -> list[dict[str, object]]:
    """The CSV rows, best first: kept policies (``S_acc >= threshold``) by ascending S_pri (as
    ``search_best.py``), then the others by ascending S_pri; ``rank`` numbers the kept ones."""
    rows = []
    for p, sp, sa in zip(policies, s_pri, s_acc):
        kept = math.isfinite(sa) and math.isfinite(sp) and sa >= threshold
        rows.append({"policy": policy_name(p), "S_pri": float(sp), "S_acc": float(sa), "kept": kept, "ops": describe(p)})
    key = lambda r: (not r["kept"], r["S_pri"] if math.isfinite(r["S_pri"]) else math.inf)  # noqa: E731
    rows.sort(key=key)
    k = 0
    for r in rows:
        k += bool(r["kept"])
        r["rank"] = k if r["kept"] else ""
    return rows


def write_policy_csv(path: str | Path, rows: Sequence[dict[str, object]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({**r, "S_pri": f"{r['S_pri']:.6g}", "S_acc": f"{r['S_acc']:.6g}", "kept": str(r["kept"]).lower()})


TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no", ""}


def read_policy_csv(path: str | Path) -> tuple[str, ...]:
    """The kept policies of a ranked CSV, in file order (best first as written).

    Accepts ``spfl ats-search``'s ``ats_search.csv`` (columns ``policy`` and ``kept``), a CSV
    with a ``policy`` column and no ``kept`` column (every row counts), or a file of one policy
    per line without a header (the toolkit's ``policy_list_*.csv``).

    Raises:
        ConfigError: A missing or unreadable file, a bad policy id, a bad ``kept`` value, or
            no kept policy; each in one line naming the file.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--ats_policy_file {path}: cannot read it ({e.strerror or e})") from None
    rows = [r for r in csv.reader(text.splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"--ats_policy_file {path}: the file is empty")
    head = [c.strip() for c in rows[0]]
    out: list[str] = []
    if "policy" in head:
        ip, ik = head.index("policy"), head.index("kept") if "kept" in head else None
        for n, r in enumerate(rows[1:], start=2):
            cell = r[ip].strip() if ip < len(r) else ""
            kept = r[ik].strip().lower() if ik is not None and ik < len(r) else "true"
            if kept not in TRUE | FALSE:
                raise ConfigError(f"--ats_policy_file {path}: line {n}: kept must be true or false, got {kept!r}")
            if kept in TRUE:
                out.append(cell)
    else:
        out = [r[0].strip() for r in rows]
    for s in out:
        try:
            parse_policy(s)
        except ConfigError as e:
            raise ConfigError(f"--ats_policy_file {path}: {e}") from None
    if not out:
        raise ConfigError(f"--ats_policy_file {path}: no kept policy (every row has kept=false)")
    return tuple(out)


__all__ = [
    "ATS_THRESHOLD", "BINS", "CSV_FIELDS", "Scores", "SearchData", "acc_windows", "area_ratio", "cosine",
    "input_jacobians", "interpolation_curve", "jacobian_score", "pri_images", "random_policies", "rank_rows",
    "read_policy_csv", "score_policies", "sign_uniforms", "transform_candidates", "write_policy_csv",
]
