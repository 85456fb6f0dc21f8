"""Soteria: prune the gradient of the representation layer (the pure layer).

Sun, Li, Wang, Wang, Jiang & Chen, "Soteria: Provable Defense against Privacy Leakage in
Federated Learning from Representation Perspective", CVPR 2021 (code: jeremy313/Soteria,
``GS_attack/reconstruct_image.py``, ``--defense ours --pruning_rate 60``). A gradient-inversion
attack recovers the input mostly through the representation ``r`` fed into the last fully
connected layer, whose weight gradient is ``dL/dW = (dL/dz) r^T``: column ``f`` of it is
``r_f`` times the logit gradient. Soteria zeroes the columns of the features whose
representation reveals the most about the input per unit of change.

The rule as coded by the authors (their paper states it as ``||r_f|| / ||dr_f/dX||``; the code
computes the inverse and prunes the smallest, with ``+ 0.1`` in the denominator, and we follow
the code):

1. for every sample ``b`` of the client's batch and every feature ``f``:
   ``ratio[b, f] = || d r_f(x_b) / d x_b ||_2 / (r_f(x_b) + 0.1)`` (one backward per feature);
2. ``score[f] = sum_b ratio[b, f]``;
3. ``t = np.percentile(score, pruning_rate)`` (linear interpolation), and the features with
   ``|score[f]| < t`` are pruned: column ``f`` of the last layer's weight gradient is multiplied by 0.

Here all clients' samples go through one batch (:func:`representation_ratios`); the models
have no BatchNorm, so every sample is evaluated on its own, as the authors' model in ``eval()``
mode is.
"""

from __future__ import annotations

import copy
import torch
import torch.nn as nn
from torch.func import functional_call, jvp

from ..errors import ConfigError
from .pruning import row_quantile

SOTERIA_EPS = 0.1  # reconstruct_image.py: ... / (feature_fc1_graph.data[:, f] + 0.1)


def final_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """``(name, module)`` of the model's last ``nn.Linear`` (in registration order).

    Raises:
        ConfigError: The model has no ``nn.Linear``.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ConfigError(f"Soteria prunes the gradient of the last fully connected layer, and model "
                          f"{type(model).__name__} has no nn.Linear")
    return found[-1]


def representation_model(model: nn.Module, input_shape: tuple[int, ...]) -> tuple[nn.Module, str, nn.Linear]:
    """A copy of ``model`` that outputs the representation (the input of its final linear layer).

    The last ``nn.Linear`` is replaced by ``nn.Identity``; a probe checks that it is the model's
    final operation, ``model(x) == linear(rep(x))``. Parameter names of the copy are the model's,
    less the linear layer's.

    Returns:
        ``(rep, linear_name, linear)``.

    Raises:
        ConfigError: No ``nn.Linear``, the last one is not the model's output layer, or it reads
            the input itself (a linear model has no representation to protect: the authors'
            ``+ 0.1`` rule on signed, normalized pixels prunes nothing or noise).
    """
    name, linear = final_linear(model)
    rep = copy.deepcopy(model)
    parent_name, _, child = name.rpartition(".")
    parent = rep.get_submodule(parent_name) if parent_name else rep
    setattr(parent, child, nn.Identity())
    p = next(model.parameters())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *input_shape, generator=g).to(p.device, p.dtype)
    with torch.no_grad():
        out, r = model(x), rep(x)
        ok = r.dim() == 2 and r.shape[1] == linear.in_features and torch.allclose(linear(r), out, rtol=1e-5, atol=1e-6)
    if not ok:
        raise ConfigError(f"Soteria needs a model whose output is its last nn.Linear ({name!r} of "
                          f"{type(model).__name__} is not the final layer)")
    if not any(True for _ in rep.parameters()):
        raise ConfigError(f"Soteria prunes the gradient of a learned representation, and the last layer of "
                          f"{type(model).__name__} reads the input itself (no hidden layer, e.g. the lr model)")
    return rep, name, linear


def representation_ratios(
    rep: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soteria's per-sample ratios ``||d r_f / d x|| / (r_f + 0.1)``, for every client's samples at once.

    The samples are independent (no BatchNorm), so one backward pass of feature ``f`` summed over
    the batch gives ``d r_f / d x_b`` for every sample ``b``, as in the authors' loop over
    features. Here the batch holds all clients' samples: the loop runs over the ``F`` features
    (reverse mode) or, when the input is smaller than the representation, over the input's
    coordinates with forward-mode ``jvp``s, whichever needs fewer passes. Both give the whole
    Jacobian exactly; on the CPU, vmapping ``jacrev``/``jacfwd`` over samples instead was 2-4x
    slower (``cnn``, one thread; vmapped convolutions run as grouped convolutions there).

    Args:
        rep: The representation model (:func:`representation_model`).
        params: Its parameters ``{name: (*shape)}`` (e.g. the global model's, less the last layer).
        x: ``(M, C, H, W)`` samples (any number of clients' samples, flattened).
        chunk: Samples per pass (bounds the memory of the kept forward graph).

    Returns:
        ``(r (M, F), ratio (M, F))``: the representation and the ratio per sample and feature.
    """
    in_dim = x[0].numel() if len(x) else 0

    def rep_of(xb: torch.Tensor) -> torch.Tensor:
        return functional_call(rep, params, (xb,))  # (m, F)

    with torch.no_grad():
        F_dim = rep_of(x[:1]).shape[1]
    rs, ns = [], []
    for lo in range(0, x.shape[0], chunk):
        xb = x[lo : lo + chunk].detach()
        m = xb.shape[0]
        if F_dim <= in_dim:  # reverse mode: one backward per feature
            xb = xb.clone().requires_grad_(True)
            with torch.enable_grad():
                r = rep_of(xb)
                gn = torch.empty(m, F_dim, dtype=x.dtype, device=x.device)
                for f in range(F_dim):
                    (g,) = torch.autograd.grad(r[:, f].sum(), xb, retain_graph=f < F_dim - 1)
                    gn[:, f] = g.reshape(m, -1).norm(dim=1)
            r = r.detach()
        else:  # forward mode: one jvp per input coordinate, J e_i accumulated as squares
            sq = torch.zeros(m, F_dim, dtype=x.dtype, device=x.device)
            for i in range(in_dim):
                t = torch.zeros(m, in_dim, dtype=x.dtype, device=x.device)
                t[:, i] = 1.0
                r, jv = jvp(rep_of, (xb,), (t.view_as(xb),))  # (m, F), (m, F)
                sq += jv.detach() ** 2
            r, gn = r.detach(), sq.sqrt()
        rs.append(r)
        ns.append(gn)
    r = torch.cat(rs) if rs else x.new_zeros(0, F_dim)
    gn = torch.cat(ns) if ns else x.new_zeros(0, F_dim)
    return r, gn / (r + SOTERIA_EPS)


def soteria_keep(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Which features keep their weight-gradient column.

    Args:
        scores: ``(N, F)`` the summed ratios of each client's batch.
        rate: The pruned fraction (Soteria's ``--pruning_rate`` / 100), in ``(0, 1)``.

    Returns:
        ``(N, F)`` bool: ``False`` where ``|score| < t``, ``t`` the ``rate`` quantile (numpy's
        linear ``percentile``) of the client's signed scores, exactly the authors' mask.
    """
    t = row_quantile(scores, rate)  # (N,)
    return ~(scores.abs() < t[:, None])


def prune_columns(U: torch.Tensor, keep: torch.Tensor, offset: int, out_features: int) -> torch.Tensor:
    """Zero the pruned feature columns of the last layer's weight block in each row of ``U``.

    Args:
        U: ``(N, D)`` gradients or updates, parameters flattened in ``ParamSpec`` order.
        keep: ``(N, F)`` bool from :func:`soteria_keep`.
        offset: Where the last layer's weight ``(out_features, F)`` starts in a row (row-major).
        out_features: Rows of that weight (classes).

    Returns:
        ``(N, D)``; the block is multiplied by the 0/1 mask as the authors do (so a NaN stays NaN).
    """
    N, F_dim = keep.shape
    end = offset + out_features * F_dim
    block = U[:, offset:end].reshape(N, out_features, F_dim)
    out = U.clone()
    out[:, offset:end] = (block * keep[:, None, :].to(U.dtype)).reshape(N, -1)
    return out


__all__ = ["SOTERIA_EPS", "final_linear", "prune_columns", "representation_model", "representation_ratios", "soteria_keep"]
