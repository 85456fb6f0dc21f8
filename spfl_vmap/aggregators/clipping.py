"""Clipping rules: norm clipping (Sun et al. 2019) and centered clipping (Karimireddy et al. 2021)."""

from __future__ import annotations

import torch

from spfl_kernels import clip_rows, clip_scale_noise_reduce

from ..errors import ConfigError
from ._base import AGGREGATORS, Rows, check_args, normalise_weights

CC_STATE_KEY = "centered_clipping.center"


@AGGREGATORS.register("norm_clip")
def norm_clip(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    max_norm: float | None = None,
    weighted: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Clip each whole update to L2 norm ``max_norm``, then take the weighted mean.

    Sun et al. 2019, "Can You Really Backdoor Federated Learning?": the norm bound is on the whole
    update (not per layer, a bug of the original toolkit). Their weak-DP noise is a separate
    server-side stage, not part of this aggregator.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` non-negative weights (sample counts).
        f: unused.
        state: unused.
        generator: unused.
        max_norm: clipping threshold; ``None`` uses the median row norm of this round, which
            adapts to the model and learning rate (a fixed default would be scale-dependent).
        weighted: weight the mean by ``weights`` (FedAvg); ``False`` gives the plain mean.

    Returns:
        ``([D] aggregate, {"clip_norm": float, "clipped_frac": float})``.
    """
    check_args(U, weights, f, "norm_clip")
    return _norm_clip(Rows(U), weights, max_norm=max_norm, weighted=weighted)


def _norm_clip(R: Rows, weights: torch.Tensor | None, *, max_norm: float | None = None, weighted: bool = True) -> tuple[torch.Tensor, dict]:
    """:func:`norm_clip` on rows that may be sharded over processes (see :class:`Rows`)."""
    norms = R.per_row(R.X.float().norm(dim=1))  # (N,)
    thr = float(norms.quantile(0.5)) if max_norm is None else float(max_norm)
    if thr < 0:
        raise ConfigError(f"norm_clip: max_norm must be >= 0, got {thr}")
    w = normalise_weights(weights if weighted else None, R.n, R.X.device)  # (N,)
    out, _ = clip_scale_noise_reduce(R.X, thr, R.local(w), 0.0, 0)
    return R.total(out).to(R.X.dtype), {"clip_norm": thr, "clipped_frac": float((norms > thr).float().mean())}


norm_clip.on_rows = _norm_clip  # type: ignore[attr-defined]


@AGGREGATORS.register("centered_clipping")
def centered_clipping(
    U: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    f: int = 0,
    state: dict | None = None,
    generator: torch.Generator | None = None,
    tau: float = 10.0,
    n_iter: int = 1,
    weighted: bool = False,
) -> tuple[torch.Tensor, dict]:
    """Centered clipping (Karimireddy, He & Jaggi 2021, "Learning from History for Byzantine
    Robust Optimization").

    ``v <- v + (1/N) sum_i clip_tau(U_i - v)``, repeated ``n_iter`` times, where
    ``clip_tau(x) = x * min(1, tau / |x|)``. The centre ``v`` starts at the previous round's
    aggregate, kept in ``state[CC_STATE_KEY]`` (zero in the first round, or when ``state`` is
    ``None``); the paper's argument is that with such a good starting point one iteration
    suffices, hence ``n_iter=1``. The new ``v`` is written back to ``state`` (a ``[D]`` tensor,
    checkpointable). ``tau`` is scale-dependent: set it relative to typical update norms.

    Called directly, a NaN/Inf row poisons ``v``; use ``aggregate()``.

    Args:
        U: ``[N, D]`` client updates.
        weights: ``[N]`` weights, used only when ``weighted``.
        f: unused.
        state: mutable dict kept by the engine across rounds.
        generator: unused.
        tau: clipping radius.
        n_iter: number of centred-clipping iterations ``L``.
        weighted: replace the paper's ``1/N`` by normalised ``weights``.

    Returns:
        ``([D] aggregate, {"clipped_frac": float})`` with the fraction of rows clipped in the last
        iteration.
    """
    check_args(U, weights, f, "centered_clipping")
    return _centered_clipping(Rows(U), weights, state=state, tau=tau, n_iter=n_iter, weighted=weighted)


def _centered_clipping(R: Rows, weights: torch.Tensor | None, *, state: dict | None = None, tau: float = 10.0,
                       n_iter: int = 1, weighted: bool = False) -> tuple[torch.Tensor, dict]:
    """:func:`centered_clipping` on rows that may be sharded over processes (see :class:`Rows`):
    each iteration sums the rows held here, and one ``all_reduce`` adds the sums."""
    if tau <= 0 or n_iter < 1:
        raise ConfigError(f"centered_clipping: needs tau > 0 and n_iter >= 1, got {tau}, {n_iter}")
    X, dev = R.X.float(), R.X.device  # (n_r, D)
    prev = None if state is None else state.get(CC_STATE_KEY)
    v = torch.zeros(R.dim, device=dev) if prev is None else prev.to(device=dev, dtype=torch.float32)
    w = R.local(normalise_weights(weights if weighted else None, R.n, dev))  # (n_r,)
    norms = torch.zeros(X.shape[0], device=dev)
    for _ in range(n_iter):
        clipped, norms = clip_rows(X - v, tau)  # (n_r, D), (n_r,)
        v = v + R.total(w @ clipped.float())  # (D,)
    if state is not None:
        state[CC_STATE_KEY] = v.detach().clone()
    return v.to(R.X.dtype), {"clipped_frac": float((R.per_row(norms) > tau).float().mean())}


centered_clipping.on_rows = _centered_clipping  # type: ignore[attr-defined]
