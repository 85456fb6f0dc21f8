"""Gradient inversion: reconstruct a client's images from what it uploads.

Three attacks, each run as **one** optimization over a stack of candidates
``[M problems, R restarts, B images, C, H, W]``: the objective is ``vmap``-ed over restarts and
problems (``torch.func``), so a hundred clients with four restarts each cost one batched
program, not 400 Python-level optimizations as in the peers (breaching runs its ``num_trials``
restarts in a Python loop, ``attacks/optimization_based_attack.py``).

=========  ======================================================================================
``dlg``    Zhu, Liu and Han, "Deep Leakage from Gradients", NeurIPS 2019: L-BFGS on the squared
           euclidean distance between the candidate's upload and the observed one, images and
           soft labels (logits, softmax-ed into the cross-entropy target) optimized jointly.
``idlg``   Zhao, Mopuri and Bilen, "iDLG: Improved Deep Leakage from Gradients", 2020: the labels
           are read analytically from the last linear layer's gradient first (:func:`analytic_labels`),
           then DLG runs with the labels fixed.
``ig``     Geiping, Bauermeister, Dröge and Moeller, "Inverting Gradients -- How easy is it to break
           privacy in federated learning?", NeurIPS 2020: cosine distance plus total variation,
           Adam on the *signed* gradient (lr 0.1), a box constraint to valid pixels, step decay
           /10 at 3/8, 5/8 and 7/8 of the iterations, restarts with the best one kept
           (breaching's ``attack/invertinggradients.yaml``; its TV weight 0.2 is replaced by
           :data:`DEFAULT_TV`, see there). Labels as for ``idlg``.
=========  ======================================================================================

What the client uploads (:class:`Upload`):

* ``gradient`` (FedSGD): the gradient of the mean cross-entropy over its ``B`` images;
* ``update`` (FedAvg): ``theta_S - theta_0`` after ``S`` full-batch SGD steps at ``lr`` (with
  ``torch.optim.SGD``'s momentum and weight decay), as breaching's ``local_updates`` user. The
  attacker differentiates through the ``S`` simulated steps.

**Batched L-BFGS.** ``torch.optim.LBFGS`` optimizes one problem. :func:`batched_lbfgs` runs its
algorithm (two-loop recursion, curvature pairs kept when ``y.s > 1e-10``, first step
``min(1, 1/|g|_1) * lr``, then ``lr``, no line search: ``line_search_fn=None``, as the DLG repository
``mit-han-lab/dlg`` uses it) for ``P`` independent problems at once: the history is a ring
buffer ``[P, h, n]`` with a per-problem length, and every dot product is a row-wise sum. Each
problem stops on its own (gradient below ``tol_grad``, or no descent direction) and is then
frozen, so the result equals ``P`` separate runs; ``tests/attacks/test_inversion.py`` checks it
against ``torch.optim.LBFGS`` on random quadratics. One iteration is one evaluation and one step
(DLG's 300 ``optimizer.step`` calls each run up to 20 of these).

**Failures.** A restart whose objective becomes NaN or infinite is marked failed and frozen; it
never raises. Each restart keeps the lowest-objective candidate it has seen, and each problem
keeps its best non-failed restart (breaching keeps the best candidate per trial, then the best
trial).

Images live in the model's normalized input space; ``box = (lo [C], hi [C])`` are the
normalized values of pixel 0 and 1 per channel (``(0 - mean) / std`` and ``(1 - mean) / std``).
Metrics (PSNR, SSIM, label accuracy, batch matching) are in :mod:`.inversion_metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

from ..errors import ConfigError
from ..rng import generator

Params = dict[str, torch.Tensor]

ATTACK_NAMES = ("dlg", "idlg", "ig")
#: Iterations when none are given: DLG's 300 L-BFGS steps (mit-han-lab/dlg main.py), and ATS's
#: evaluation attack of 4,800 signed-Adam steps (gaow0007/ATSPrivacy benchmark/comm.py) for ig.
DEFAULT_ITERATIONS = {"dlg": 300, "idlg": 300, "ig": 4800}
UPLOADS = ("gradient", "update")
#: ig's total-variation weight when none is given. breaching's 0.2 (set for CIFAR at 24,000
#: iterations) outweighs the cosine term on normalized 28x28 images: on an untrained cnn and
#: FashionMNIST test images 0 and 1, 500 iterations reached PSNR 21.6 / 11.7 dB at 0.2, 37.0 /
#: 20.6 dB at 0.01 and 55.0 / 48.8 dB at 1e-4, the weight of ATS's evaluation attack
#: (ATSPrivacy benchmark/comm.py) and of inversefed's command line.
DEFAULT_TV = 1e-4


@dataclass(frozen=True)
class Upload:
    """What a client sends after training on its ``B`` images, as the attacker models it.

    Attributes:
        kind: ``gradient`` (FedSGD) or ``update`` (FedAvg: trained - global).
        steps: local full-batch SGD steps (``update`` only).
        lr: local learning rate (``update`` only).
        momentum: ``torch.optim.SGD`` momentum (``update`` only).
        wd: ``torch.optim.SGD`` weight decay (``update`` only).
    """

    kind: str = "gradient"
    steps: int = 1
    lr: float = 0.1
    momentum: float = 0.0
    wd: float = 0.0


@dataclass
class InversionResult:
    """Reconstructions of ``M`` problems of ``B`` images each.

    Attributes:
        x: ``[M, B, C, H, W]`` the best restart's candidate per problem (normalized space).
        labels: ``[M, B]`` the labels the attack used (recovered, learned or given).
        loss: ``[M, R]`` final objective of each restart's kept candidate; NaN where it failed.
        failed: ``[M, R]`` bool, the restart's objective became NaN/Inf.
        best: ``[M]`` index of the kept restart.
        ok: ``[M]`` bool, at least one restart of the problem did not fail.
        label_method: how the labels were obtained.
        iterations: optimizer iterations run.
    """

    x: torch.Tensor
    labels: torch.Tensor
    loss: torch.Tensor
    failed: torch.Tensor
    best: torch.Tensor
    ok: torch.Tensor
    label_method: str
    iterations: int


def pixel_box(x_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel normalized values of pixel 0 and pixel 1: the training set's minimum and
    maximum per channel ``x_train (n, C, H, W) -> ((C,), (C,))`` (the image datasets all hold
    black and white pixels; ``synthetic`` has no pixel space, and its range stands in for one)."""
    return x_train.amin(dim=(0, 2, 3)), x_train.amax(dim=(0, 2, 3))


# ---- model checks --------------------------------------------------------------------------
def output_classes(model: nn.Module, params: Params, input_shape: tuple[int, ...]) -> int:
    """The model's class count for one image of ``input_shape``; a shape that does not fit the
    model is a one-line :class:`ConfigError`."""
    ref = next(iter(params.values()))
    x = torch.zeros(1, *input_shape, dtype=ref.dtype, device=ref.device)
    try:
        with torch.no_grad():
            out = functional_call(model, params, (x,))
    except (RuntimeError, ValueError, IndexError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ConfigError(f"image shape {tuple(input_shape)} does not fit the model {type(model).__name__} ({first})") from None
    if out.dim() != 2 or out.shape[0] != 1:
        raise ConfigError(f"the model must map [B, C, H, W] images to [B, classes] logits; it returned {tuple(out.shape)}")
    return int(out.shape[1])


def last_linear(model: nn.Module, params: Params, num_classes: int, input_shape: Sequence[int]) -> tuple[str, str | None]:
    """Names of the final ``nn.Linear``'s weight and bias (``None`` without a bias).

    iDLG reads the labels from this layer's gradient, so it must be the layer that produces the
    logits: the model's last ``nn.Linear``, with ``num_classes`` outputs and its parameters last
    in ``params``, whose output is the model's output (checked on a random input, so an
    activation after it is caught).

    Raises:
        ConfigError: the model does not end in such a layer.
    """
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = list(params)
    why = "it has no nn.Linear layer"
    if linears:
        name, mod = linears[-1]
        w = f"{name}.weight" if name else "weight"
        b = (f"{name}.bias" if name else "bias") if mod.bias is not None else None
        tail = [w] + ([b] if b else [])
        if mod.out_features != num_classes:
            why = f"its last nn.Linear ({name}) has {mod.out_features} outputs for {num_classes} classes"
        elif names[-len(tail):] != tail:
            why = f"its last nn.Linear ({name}) is not its last layer (the last parameter is {names[-1]})"
        else:
            ref = params[w]
            x = torch.randn(2, *input_shape, generator=generator(0, "last-linear-probe")).to(ref)
            seen: list[torch.Tensor] = []
            handle = mod.register_forward_hook(lambda _m, _i, o: seen.append(o))
            try:
                with torch.no_grad():
                    out = functional_call(model, params, (x,))
            finally:
                handle.remove()
            if seen and torch.equal(seen[-1], out):
                return w, b
            why = f"its output is not that of its last nn.Linear ({name}): a layer follows it"
    raise ConfigError(f"analytic label recovery (idlg, ig) needs a model whose last layer is an nn.Linear producing the "
                      f"logits; {type(model).__name__}: {why}")


def _slices(params: Params) -> dict[str, slice]:
    out, off = {}, 0
    for k, v in params.items():
        out[k] = slice(off, off + v.numel())
        off += v.numel()
    return out


# ---- labels ----------------------------------------------------------------------------------
def analytic_labels(
    model: nn.Module, params: Params, target: torch.Tensor, num_images: int, num_classes: int, input_shape: Sequence[int],
    kind: str = "gradient",
) -> tuple[torch.Tensor, str]:
    """Labels read from the last linear layer's part of the upload, ``[M, B]`` sorted per problem.

    With softmax cross-entropy, the bias gradient of one image is ``p - onehot(y)``: negative
    only at the label. A local update is minus a sum of such gradients (times ``lr``), so its sign
    is flipped first.

    * ``B = 1`` (iDLG, Zhao et al. 2020): ``argmin`` of the bias gradient; for a layer without
      bias, iDLG's own rule, ``argmin`` over the rows of the weight gradient summed
      (``original_dy_dx[-2]``), which assumes non-negative features (after a ReLU).
    * ``B > 1``: breaching's ``bias-corrected`` strategy (``attacks/base_attack.py``): every class
      with a negative mean bias gradient is a label once; the rest of the ``B`` labels are drawn
      greedily, each time the class with the lowest value, which is then raised by the mean
      impact of one image (the sum of the negative entries over ``B``). Without a bias the weight
      row sums stand in for it.

    Args:
        model, params: the attacked model at the round's global parameters.
        target: ``[M, D]`` uploads.
        num_images: ``B``.
        num_classes: ``K``.
        input_shape: ``(C, H, W)``.
        kind: ``gradient`` or ``update``.

    Returns:
        ``([M, B] long labels, the rule's name)``.
    """
    w_name, b_name = last_linear(model, params, num_classes, input_shape)
    sl = _slices(params)
    g = target if kind == "gradient" else -target  # (M, D), descent direction of the loss
    M, K = g.shape[0], num_classes
    if b_name is not None:
        score = g[:, sl[b_name]]  # (M, K)
        rule = "bias"
    else:
        score = g[:, sl[w_name]].reshape(M, K, -1).sum(-1)  # (M, K) row sums
        rule = "weight-rows"
    if num_images == 1:
        return score.argmin(dim=1, keepdim=True), f"idlg-{rule}"
    B = num_images
    score = score.clone()
    neg = score < 0  # (M, K)
    impact = torch.where(neg, score, torch.zeros_like(score)).sum(1) / B  # (M,) <= 0
    # stage 1: every class with a negative entry, most negative first, at most B of them
    order = torch.where(neg, score, torch.full_like(score, math.inf)).argsort(dim=1)[:, :B]  # (M, B)
    n_first = neg.sum(1).clamp(max=B)  # (M,)
    slot = torch.arange(B, device=g.device)
    labels = torch.where(slot[None] < n_first[:, None], order, torch.zeros_like(order))
    score = score - torch.where(neg, impact[:, None], torch.zeros_like(score))
    # stage 2: fill the remaining slots greedily
    rows = torch.arange(M, device=g.device)
    filled = n_first.clone()
    for _ in range(B):
        need = filled < B  # (M,)
        pick = score.argmin(dim=1)  # (M,)
        col = filled.clamp(max=B - 1)
        labels[rows, col] = torch.where(need, pick, labels[rows, col])
        score[rows, pick] = score[rows, pick] - torch.where(need, impact, torch.zeros_like(impact))
        filled = filled + need.long()
    return labels.sort(dim=1).values, f"bias-corrected-{rule}"


# ---- the attacker's model of the client ------------------------------------------------------
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of ``x [B, C, H, W]``: mean absolute difference of horizontal
    neighbours plus that of vertical ones (inversefed's ``total_variation``), any channel count."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def make_upload_fn(
    model: nn.Module, params: Params, upload: Upload, flat: bool = True
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor | list[torch.Tensor]]:
    """``(x [B, C, H, W], probs [B, K]) -> [D]``: what a client holding ``x`` with label
    distributions ``probs`` would upload, differentiable in both (``torch.func``). With
    ``flat=False`` the upload comes as one flat tensor per parameter (``[D_k]``, in ``params``
    order), which spares the objective a concatenation of ``D`` numbers per evaluation."""
    names = list(params)

    def loss(p: Params, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, p, (x,))  # (B, K)
        return -(probs * F.log_softmax(logits, dim=-1)).sum(-1).mean()  # soft-label cross-entropy

    def out(d: Params) -> torch.Tensor | list[torch.Tensor]:
        parts = [d[k].reshape(-1) for k in names]
        return torch.cat(parts) if flat else parts

    if upload.kind == "gradient":
        return lambda x, probs: out(grad(loss)(params, x, probs))

    def update(x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        p, buf = dict(params), None
        for _ in range(upload.steps):  # torch.optim.SGD without dampening or nesterov
            g = grad(loss)(p, x, probs)
            if upload.wd:
                g = {k: g[k] + upload.wd * p[k] for k in names}
            if upload.momentum:
                buf = g if buf is None else {k: upload.momentum * buf[k] + g[k] for k in names}
                g = buf
            p = {k: p[k] - upload.lr * g[k] for k in names}
        return out({k: p[k] - params[k] for k in names})

    return update


# ---- batched L-BFGS --------------------------------------------------------------------------
def batched_lbfgs(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    z0: torch.Tensor,
    iterations: int,
    *,
    lr: float = 1.0,
    history: int = 100,
    tol_grad: float = 1e-7,
    tol_change: float = 1e-9,
    on_eval: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.optim.LBFGS`` (no line search) on ``P`` independent problems at once.

    Args:
        fn: ``z [P, n] -> (loss [P], grad [P, n])``, row ``p`` depending on ``z[p]`` only.
        z0: ``[P, n]`` starting points.
        iterations: L-BFGS iterations (one evaluation and one step each).
        lr: step length (``torch.optim.LBFGS``'s ``lr``).
        history: curvature pairs kept (``history_size``).
        tol_grad: a problem whose gradient's max-abs is at most this has converged and stops.
        tol_change: a problem stops when its direction is not a descent one (``g.d > -tol_change``).
        on_eval: called with ``(z, loss, live)`` after every evaluation (``live [P]``: not yet
            stopped or failed), e.g. to keep the best iterate.

    Returns:
        ``(z [P, n] final points, failed [P] bool)``: a problem whose loss or gradient became
        non-finite is failed and frozen at that point.
    """
    z = z0.clone()
    P, n = z.shape
    dev, dt = z.device, z.dtype
    rows = torch.arange(P, device=dev)
    S = torch.zeros(P, history, n, device=dev, dtype=dt)  # steps s, ring buffer
    Y = torch.zeros(P, history, n, device=dev, dtype=dt)  # gradient changes y
    rho = torch.zeros(P, history, device=dev, dtype=dt)
    head = torch.zeros(P, dtype=torch.long, device=dev)  # next slot to write
    count = torch.zeros(P, dtype=torch.long, device=dev)
    h_diag = torch.ones(P, device=dev, dtype=dt)
    active = torch.ones(P, dtype=torch.bool, device=dev)
    failed = torch.zeros(P, dtype=torch.bool, device=dev)
    g_prev = step = None
    for k in range(iterations + 1):
        loss, g = fn(z)
        fin = torch.isfinite(loss) & torch.isfinite(g).all(dim=1)
        failed |= active & ~fin
        active &= fin
        if on_eval is not None:
            on_eval(z, loss, active.clone())
        if k == iterations:
            break
        active &= g.abs().amax(dim=1) > tol_grad  # converged problems stop
        if k > 0:
            y = g - g_prev  # (P, n)
            ys = (y * step).sum(1)  # (P,)
            accept = active & (ys > 1e-10)
            slot = head
            S[rows, slot] = torch.where(accept[:, None], step, S[rows, slot])
            Y[rows, slot] = torch.where(accept[:, None], y, Y[rows, slot])
            rho[rows, slot] = torch.where(accept, 1.0 / ys, rho[rows, slot])
            h_diag = torch.where(accept, ys / (y * y).sum(1), h_diag)
            head = torch.where(accept, (head + 1) % history, head)
            count = torch.where(accept, (count + 1).clamp(max=history), count)
        # two-loop recursion, newest pair first, each problem over its own count
        q = -g
        alphas = []
        depth = min(k, history)
        for i in range(depth):
            slot = (head - 1 - i) % history
            valid = i < count
            a = torch.where(valid, rho[rows, slot] * (S[rows, slot] * q).sum(1), torch.zeros_like(h_diag))
            q = q - a[:, None] * Y[rows, slot]
            alphas.append(a)
        d = q * h_diag[:, None]
        for i in reversed(range(depth)):
            slot = (head - 1 - i) % history
            valid = i < count
            b = rho[rows, slot] * (Y[rows, slot] * d).sum(1)
            d = d + torch.where(valid, alphas[i] - b, torch.zeros_like(b))[:, None] * S[rows, slot]
        if k == 0:  # torch's first step: min(1, 1 / |g|_1) * lr
            t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * lr
        else:
            t = torch.full((P,), float(lr), device=dev, dtype=dt)
        gtd = (g * d).sum(1)  # (P,)
        active &= gtd <= -tol_change  # not a descent direction: torch stops
        step = torch.where(active[:, None], d * t[:, None], torch.zeros_like(d))
        z = z + step
        g_prev = g
    return z, failed


# ---- the attacks -----------------------------------------------------------------------------
# On the CPU the per-problem uploads [D] of a whole stack fall out of cache: one inversion
# iteration is a dozen elementwise passes over them. Measured (ig, untrained cnn, one thread,
# medians of 3): 1x8x8 images, 16 problems x 4 restarts: unchunked 6.0 s, 2 problems a chunk
# 3.8 s; 1x28x28, 8 x 2: unchunked 3.6 s, 2 a chunk 2.7 s.
CPU_CHUNK_BYTES = 8 << 20


def problem_chunk(M: int, R: int, D: int, device: torch.device, dtype: torch.dtype) -> int | None:
    """Problems per ``vmap`` chunk: all of them on a GPU; on the CPU about
    :data:`CPU_CHUNK_BYTES` of uploads (at least 4 of them) per chunk. ``None``: one chunk."""
    if device.type != "cpu":
        return None
    itemsize = torch.finfo(dtype).bits // 8
    per_chunk = max(1, max(4, CPU_CHUNK_BYTES // max(1, D * itemsize)) // R)
    return None if per_chunk >= M else per_chunk


def _check(attack: str, target: torch.Tensor, params: Params, num_images: int, restarts: int, iterations: int,
           upload: Upload, input_shape: Sequence[int]) -> None:
    if attack not in ATTACK_NAMES:
        raise ConfigError(f"unknown inversion attack {attack!r}; choose one of: {', '.join(ATTACK_NAMES)}")
    D = sum(v.numel() for v in params.values())
    if not isinstance(target, torch.Tensor) or target.dim() != 2 or target.shape[1] != D:
        shape = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        raise ConfigError(f"the uploads must be a [M, D={D}] tensor (one flattened upload per problem), got {shape}")
    if target.shape[0] < 1:
        raise ConfigError("there is no upload to attack (M = 0)")
    for name, v in (("num_images", num_images), ("restarts", restarts), ("iterations", iterations)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    if len(input_shape) != 3:
        raise ConfigError(f"input_shape must be (C, H, W), got {tuple(input_shape)}")
    if upload.kind not in UPLOADS:
        raise ConfigError(f"upload kind must be one of {UPLOADS}, got {upload.kind!r}")
    if upload.kind == "update" and (upload.steps < 1 or not upload.lr > 0):
        raise ConfigError(f"an update upload needs steps >= 1 and lr > 0, got steps {upload.steps}, lr {upload.lr}")


def invert(
    attack: str,
    model: nn.Module,
    params: Params,
    target: torch.Tensor,
    *,
    num_images: int,
    input_shape: Sequence[int],
    upload: Upload = Upload(),
    restarts: int = 1,
    iterations: int | None = None,
    seed: int = 0,
    problem_ids: Sequence[int] | None = None,
    restart_offset: int = 0,
    box: tuple[torch.Tensor, torch.Tensor] | None = None,
    labels: torch.Tensor | None = None,
    tv: float = DEFAULT_TV,
    step_size: float | None = None,
    history: int = 100,
) -> InversionResult:
    """Reconstruct the images behind ``M`` uploads with attack ``dlg``, ``idlg`` or ``ig``.

    Args:
        attack: ``dlg``, ``idlg`` or ``ig`` (see the module docstring).
        model: the architecture, called as ``functional_call(model, params, (x,))``.
        params: the global parameters the clients started from, ``{name: tensor}`` in the
            order of ``model.named_parameters()`` (the order of the flattened uploads).
        target: ``[M, D]`` the observed uploads.
        num_images: ``B``, images behind each upload.
        input_shape: ``(C, H, W)``.
        upload: what the clients did (:class:`Upload`).
        restarts: ``R`` random starts per problem; the best one is kept.
        iterations: optimizer iterations (default :data:`DEFAULT_ITERATIONS`).
        seed: the starting points of problem ``problem_ids[m]``, restart ``r`` come from a
            generator seeded by ``(seed, "inversion", attack, problem_ids[m], r)``, so a problem
            starts the same whether it is attacked alone or in a batch.
        problem_ids: ``[M]`` ids for the seeds (default ``0..M-1``).
        restart_offset: restart ``r`` is seeded as restart ``restart_offset + r`` (a loop that
            runs one restart per call reproduces a batched run's restarts).
        box: ``(lo [C], hi [C])`` normalized values of pixel 0 and 1; ``ig`` projects onto it
            (default ``[-inf, inf]``: no constraint).
        labels: ``[M, B]`` known labels (skips label recovery; ``dlg`` then keeps them fixed).
        tv: total-variation weight of ``ig`` (:data:`DEFAULT_TV`; breaching uses 0.2).
        step_size: ``ig``'s Adam lr (0.1) or the L-BFGS lr (1.0) of ``dlg`` / ``idlg``.
        history: L-BFGS history size.

    Returns:
        :class:`InversionResult`.

    Raises:
        ConfigError: an unknown attack, uploads of the wrong shape, an image shape that does
            not fit the model, or a model without a final ``nn.Linear`` for analytic labels.
    """
    iterations = DEFAULT_ITERATIONS.get(attack, 1) if iterations is None else iterations
    _check(attack, target, params, num_images, restarts, iterations, upload, input_shape)
    C, H, W = (int(s) for s in input_shape)
    K = output_classes(model, params, (C, H, W))
    M, B, R = target.shape[0], num_images, restarts
    ref = next(iter(params.values()))
    dev, dt = ref.device, ref.dtype
    target = target.detach().to(device=dev, dtype=dt)
    ids = list(range(M)) if problem_ids is None else [int(i) for i in problem_ids]
    if len(ids) != M:
        raise ConfigError(f"problem_ids has {len(ids)} entries for {M} uploads")
    learn_labels = attack == "dlg" and labels is None
    if labels is not None:
        if tuple(labels.shape) != (M, B):
            raise ConfigError(f"labels must be [M, B] = [{M}, {B}], got {tuple(labels.shape)}")
        lab, method = labels.to(dev).long(), "given"
    elif learn_labels:
        lab, method = None, "dlg-joint"
    else:
        lab, method = analytic_labels(model, params, target, B, K, (C, H, W), upload.kind)

    # starting points, one generator per (problem, restart)
    x0 = torch.empty(M, R, B, C, H, W, dtype=dt)
    l0 = torch.empty(M, R, B, K, dtype=dt)
    for m, pid in enumerate(ids):
        for r in range(R):
            g = generator(seed, "inversion", attack, pid, restart_offset + r)
            x0[m, r] = torch.randn(B, C, H, W, generator=g, dtype=dt)
            l0[m, r] = torch.randn(B, K, generator=g, dtype=dt)  # DLG's dummy label logits
    x0, l0 = x0.to(dev), l0.to(dev)

    upload_fn = make_upload_fn(model, params, upload, flat=False)
    euclid = attack in ("dlg", "idlg")
    tv_weight = 0.0 if euclid else float(tv)
    t_parts = tuple(p.contiguous() for p in target.split([v.numel() for v in params.values()], dim=1))  # [M, D_k]
    t_sq = (target * target).sum(1)  # (M,) |t|^2, once

    def objective(x: torch.Tensor, lab_in: torch.Tensor, t: tuple[torch.Tensor, ...], tt: torch.Tensor) -> torch.Tensor:
        """One (problem, restart): x (B, C, H, W), lab_in (B, K) logits or one-hot, t the upload
        per parameter ([D_k] each), tt = |t|^2. Sums over layers, never a [D] concatenation."""
        probs = F.softmax(lab_in, dim=-1) if learn_labels else lab_in
        u = upload_fn(x, probs)  # [D_k] per parameter
        if euclid:  # DLG: squared euclidean distance
            d = sum(((a - b) ** 2).sum() for a, b in zip(u, t))  # (F.mse_loss mis-batches an unbatched target)
        else:  # breaching's CosineSimilarity over all layers at once
            ut = sum((a * b).sum() for a, b in zip(u, t))  # elementwise: a vmapped torch.dot is a slow bmm
            uu = sum((a * a).sum() for a in u)
            d = 1.0 - ut / (uu * tt).sqrt().clamp(min=1e-30)
        return d + tv_weight * total_variation(x) if tv_weight else d

    argnums = (0, 1) if learn_labels else 0
    lab_dim = 0 if learn_labels else None  # learned logits per restart; fixed labels per problem
    chunk = problem_chunk(M, R, target.shape[1], dev, dt)
    vgrad = vmap(vmap(grad_and_value(objective, argnums=argnums), in_dims=(0, lab_dim, None, None)), in_dims=(0, 0, 0, 0),
                 chunk_size=chunk)
    lab_in = l0 if learn_labels else F.one_hot(lab, K).to(dt)  # (M, R, B, K) or (M, B, K)

    best_x = x0.clone()
    best_l = l0.clone()
    best_loss = torch.full((M, R), math.inf, device=dev, dtype=dt)

    def keep_best(x: torch.Tensor, lg: torch.Tensor, loss: torch.Tensor, live: torch.Tensor) -> None:
        nonlocal best_x, best_l, best_loss
        better = live & (loss < best_loss)  # (M, R); NaN compares False
        best_x = torch.where(better[..., None, None, None, None], x, best_x)
        best_l = torch.where(better[..., None, None], lg, best_l)
        best_loss = torch.where(better, loss, best_loss)

    if euclid:
        nx = B * C * H * W
        nz = nx + (B * K if learn_labels else 0)

        def fn(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # z (M*R, nz)
            zz = z.reshape(M, R, nz)
            x = zz[..., :nx].reshape(M, R, B, C, H, W)
            if learn_labels:
                (gx, gl), loss = vgrad(x, zz[..., nx:].reshape(M, R, B, K), t_parts, t_sq)
                g = torch.cat([gx.reshape(M, R, nx), gl.reshape(M, R, -1)], dim=-1)
            else:
                gx, loss = vgrad(x, lab_in, t_parts, t_sq)
                g = gx.reshape(M, R, nx)
            return loss.reshape(M * R), g.reshape(M * R, nz)

        def on_eval(z: torch.Tensor, loss: torch.Tensor, live: torch.Tensor) -> None:
            zz = z.reshape(M, R, nz)
            lg = zz[..., nx:].reshape(M, R, B, K) if learn_labels else best_l
            keep_best(zz[..., :nx].reshape(M, R, B, C, H, W), lg, loss.reshape(M, R), live.reshape(M, R))

        parts = [x0.reshape(M, R, nx)] + ([l0.reshape(M, R, B * K)] if learn_labels else [])
        z0 = torch.cat(parts, dim=-1).reshape(M * R, nz)
        _, failed_flat = batched_lbfgs(fn, z0, iterations, lr=1.0 if step_size is None else step_size,
                                       history=history, on_eval=on_eval)
        failed = failed_flat.reshape(M, R)
    else:
        failed = _signed_adam(lambda x: vgrad(x, lab_in, t_parts, t_sq), x0, iterations, 0.1 if step_size is None else step_size,
                              box, keep_best, best_l)

    loss = torch.where(failed, torch.full_like(best_loss, math.nan), best_loss)
    ok = (~failed).any(dim=1)
    score = torch.where(failed | ~torch.isfinite(best_loss), torch.full_like(best_loss, math.inf), best_loss)
    fallback = torch.where(torch.isfinite(best_loss), best_loss, torch.full_like(best_loss, math.inf)).argmin(dim=1)
    best = torch.where(ok, score.argmin(dim=1), fallback)  # (M,)
    rows = torch.arange(M, device=dev)
    x = best_x[rows, best]  # (M, B, C, H, W)
    out_labels = best_l[rows, best].argmax(dim=-1) if learn_labels else lab
    return InversionResult(x=x, labels=out_labels, loss=loss, failed=failed, best=best, ok=ok,
                           label_method=method, iterations=iterations)


def _signed_adam(vgrad, x0, iterations, lr, box, keep_best, best_l) -> torch.Tensor:
    """Inverting Gradients' optimizer on the whole stack ``x [M, R, B, C, H, W]``: Adam
    (betas 0.9/0.999, eps 1e-8) on the sign of the gradient, lr /10 at 3/8, 5/8 and 7/8 of the
    iterations, then projection onto the box. Adam is elementwise, so one stacked update equals
    one per problem. Returns ``failed [M, R]``."""
    x = x0.clone()
    M, R = x.shape[:2]
    m1, m2 = torch.zeros_like(x), torch.zeros_like(x)
    b1, b2, eps = 0.9, 0.999, 1e-8
    milestones = (iterations * 3 // 8, iterations * 5 // 8, iterations * 7 // 8)
    failed = torch.zeros(M, R, dtype=torch.bool, device=x.device)
    lo = hi = None
    if box is not None:
        lo = box[0].to(x).reshape(-1, 1, 1)  # (C, 1, 1)
        hi = box[1].to(x).reshape(-1, 1, 1)
    mask = (slice(None), slice(None), None, None, None, None)
    for it in range(iterations + 1):
        g, loss = vgrad(x)
        failed |= ~(torch.isfinite(loss) & torch.isfinite(g).flatten(2).all(dim=2))
        keep_best(x, best_l, loss, ~failed)
        if it == iterations:
            break
        step_lr = lr * 0.1 ** sum(it >= s for s in milestones)
        g = torch.where(failed[mask], torch.zeros_like(g), g.sign())  # breaching's hard-signed gradient
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b2 * m2 + (1 - b2) * g * g
        t = it + 1
        upd = (m1 / (1 - b1 ** t)) / ((m2 / (1 - b2 ** t)).sqrt() + eps)
        x = torch.where(failed[mask], x, x - step_lr * upd)
        if lo is not None:
            x = torch.maximum(torch.minimum(x, hi), lo)
    return failed


def dlg(model: nn.Module, params: Params, target: torch.Tensor, **kw) -> InversionResult:
    """Deep Leakage from Gradients (Zhu et al. 2019); see :func:`invert`."""
    return invert("dlg", model, params, target, **kw)


def idlg(model: nn.Module, params: Params, target: torch.Tensor, **kw) -> InversionResult:
    """iDLG (Zhao et al. 2020): analytic labels, then DLG; see :func:`invert`."""
    return invert("idlg", model, params, target, **kw)


def ig(model: nn.Module, params: Params, target: torch.Tensor, **kw) -> InversionResult:
    """Inverting Gradients (Geiping et al. 2020); see :func:`invert`."""
    return invert("ig", model, params, target, **kw)


INVERSIONS: dict[str, Callable[..., InversionResult]] = {"dlg": dlg, "idlg": idlg, "ig": ig}
