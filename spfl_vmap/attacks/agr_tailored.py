"""AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine:
Optimizing Model Poisoning Attacks and Defenses for Federated Learning").

Every malicious row is ``m = mu + gamma * p`` (``mu`` the mean of the rows the attacker knows,
``p`` a perturbation direction as in :func:`~spfl_vmap.attacks.min_max`), with ``gamma`` chosen
against the aggregator in use by simulating the round (benign rows plus copies of ``m``). All
candidate ``gamma`` are scored at once; the only Python loops are over the selection steps of
iterative Krum and over memory-bounded chunks of candidates, never over clients.
"""

from __future__ import annotations

from typing import Callable

import torch

from spfl_kernels import order_stats, pairwise_sqdist

from ..aggregators import AGGREGATORS, krum_scores, krum_select_batch, required_clients
from ..errors import ConfigError
from ._base import ATTACKS, Rows, check_inputs, known_rows, n_byzantine, with_rows
from .byzantine import _perturbation, max_feasible

#: Aggregators AGR-TAL can tailor to: selection rules (the crafted rows must be selected) and
#: rules whose output deviation is maximized.
AGR_TAL_RULES = ("krum", "multi_krum", "bulyan", "median", "trimmed_mean")
SELECTION_RULES = ("krum", "multi_krum")

#: Elements of the ``[rows, candidates * D]`` matrix evaluated at once (bounds memory for big D).
CHUNK_ELEMS = 1 << 26

#: Deviations within this relative distance of the best one count as maximal: beyond the point
#: where the copies saturate, the fp32 aggregate only changes by rounding (~1e-8 relative).
DEVIATION_RTOL = 1e-6


def _sim_f(rule: str, f: int, n_sim: int) -> int:
    """The largest ``f' <= f`` the rule accepts on ``n_sim`` simulated rows (0 at least)."""
    while f > 0 and required_clients(rule, f) > n_sim:
        f -= 1
    return f


class _Simulation:
    """The simulated round: ``n_b`` benign rows plus ``c`` copies of ``mu + gamma * p`` (last).

    The benign rows are the known rows ``X`` repeated in turn to fill ``n_b`` rows: with
    omniscient knowledge they are exactly the benign rows; with partial knowledge the attacker's
    own honest rows stand in for the unknown ones, so the simulated round keeps the real size and
    the real share of malicious rows (the paper's attacker also uses its own honest updates when
    benign ones are unknown). ``mu`` is the mean of the known rows. Distances to a candidate use
    ``|mu + g p - x_i|^2 = A_i + 2 g B_i + g^2 C`` (exact in float64), so ``K`` candidates cost
    ``O(K n)`` after one ``O(n D)`` pass.
    """

    def __init__(self, X: torch.Tensor, p: torch.Tensor, n_b: int, c: int, f: int) -> None:
        idx = torch.arange(n_b, device=X.device) % X.shape[0]
        self.X = X[idx]  # (n_b, D) fp32
        self.c, self.f, self.n_b = c, f, n_b
        self.n = n_b + c
        Xd = self.X.double()
        self.mu = X.double().mean(dim=0)  # (D,)
        self.p = p.double()  # (D,)
        self.A = ((self.mu - Xd) ** 2).sum(dim=1)  # (n_b,)
        self.B = (self.mu - Xd) @ self.p  # (n_b,)
        self.C = self.p @ self.p
        self.Dbb = pairwise_sqdist(self.X).double()  # (n_b, n_b), as the aggregator computes it

    def rows(self, g: torch.Tensor) -> torch.Tensor:
        """``[K, D]`` fp32 candidate rows for ``g [K]``."""
        return (self.mu + g.to(self.mu.device)[:, None] * self.p).float()

    def distances(self, g: torch.Tensor) -> torch.Tensor:
        """``[K, n, n]`` squared distances of the simulated round; the copies come last."""
        g = g.to(self.A.device)[:, None]  # (K, 1)
        Dcb = (self.A + 2 * g * self.B + g * g * self.C).clamp_min(0.0)  # (K, n_b)
        K, nb = g.shape[0], self.n_b
        D = torch.zeros((K, self.n, self.n), dtype=torch.float64, device=self.A.device)
        D[:, :nb, :nb] = self.Dbb
        D[:, nb:, :nb] = Dcb[:, None, :]
        D[:, :nb, nb:] = Dcb[:, :, None]
        return D  # copy-copy distances are 0

    def selected(self, g: torch.Tensor, rule: str) -> torch.Tensor:
        """``[K]`` bool: the rule selects the copies (see :meth:`needed`)."""
        D = self.distances(g)
        if rule == "krum":
            return torch.argmin(krum_scores(D, self.f), dim=1) >= self.n_b
        sel = krum_select_batch(D, self.f, self.n - 2 * self.f)  # (K, m), Multi-Krum's default m
        return (sel >= self.n_b).sum(dim=1) >= self.needed(rule)

    def needed(self, rule: str) -> int:
        """Copies that must be selected: Krum one; Multi-Krum all (at most its ``m = n - 2f``)."""
        return 1 if rule == "krum" else min(self.c, self.n - 2 * self.f)

    def deviation(self, g: torch.Tensor, rule: str) -> torch.Tensor:
        """``[K]`` float64 ``|AGR(benign rows + copies) - mu|``, in chunks of candidates."""
        D = self.X.shape[1]
        step = max(1, CHUNK_ELEMS // (self.n * D))
        out = []
        for g_chunk in g.split(step):  # chunks of candidates (memory), not clients
            cand = self.rows(g_chunk)  # (Kc, D)
            kc = cand.shape[0]
            if rule == "bulyan":
                theta = self.n - 2 * self.f
                sel = krum_select_batch(self.distances(g_chunk), self.f, theta)  # (Kc, theta)
                Y = torch.where((sel < self.n_b)[..., None], self.X[sel.clamp(max=self.n_b - 1)], cand[:, None, :])
                # Coordinate-wise step on all candidates at once: candidates side by side as columns.
                M = Y.permute(1, 0, 2).reshape(theta, kc * D)
                agg = order_stats(M, "bulyan_mean", theta - 2 * self.f)
            else:  # median / trimmed_mean are coordinate-wise: run the rule itself on [n, Kc*D]
                M = torch.cat([self.X.repeat(1, kc), cand.reshape(1, kc * D).expand(self.c, -1)])
                agg, _ = AGGREGATORS.get(rule)(M, None, f=self.f)
            out.append((agg.double().view(kc, D) - self.mu).norm(dim=1))
        return torch.cat(out)


def _argmax_gamma(J: Callable[[torch.Tensor], torch.Tensor], tol: float, rounds: int = 40) -> tuple[float, float]:
    """The smallest maximizer of ``J`` over ``gamma >= 0``: a grid, then zooming in.

    ``J`` is scored on ``0`` and all powers of two ``2^-30 .. 2^40`` at once; then each round
    scores 17 evenly spaced candidates between the best point's neighbours (plus the best point)
    and moves to the new best, until the bracket is narrower than ``tol * gamma``. Values within
    a relative :data:`DEVIATION_RTOL` of the highest seen count as ties, and ties go to the
    smallest ``gamma``: for median / trimmed mean the deviation stops growing once the copies lie
    beyond the benign values (they are then trimmed or pinned at an extreme), and a larger
    ``gamma`` would only make the copies more conspicuous. Zooming on both sides also finds a
    peak between grid points (Bulyan's deviation drops once its Krum step rejects the copies).

    Returns:
        ``(gamma, J(gamma))``.
    """

    def first_best(vals: torch.Tensor, top: float) -> int:
        return int((vals >= top - DEVIATION_RTOL * abs(top)).nonzero()[0])

    pts = torch.cat([torch.zeros(1, dtype=torch.float64), 2.0 ** torch.arange(-30, 41, dtype=torch.float64)])
    vals = J(pts).cpu()
    top = float(vals.max())
    for _ in range(rounds + 1):
        j = first_best(vals, top)
        best, best_val = float(pts[j]), float(vals[j])
        lo, hi = float(pts[max(j - 1, 0)]), float(pts[min(j + 1, pts.numel() - 1)])
        if best == 0.0 or hi - lo <= tol * best:
            break
        zoom = torch.linspace(lo, hi, 17, dtype=torch.float64)
        pts = torch.cat([zoom, torch.tensor([best], dtype=torch.float64)]).unique()  # sorted
        vals = J(pts).cpu()
        top = max(top, float(vals.max()))
    return best, best_val


def _confirm_selected(sim: _Simulation, gamma: float, rule: str, tol: float) -> tuple[float, bool]:
    """Check ``gamma`` with the registered aggregator itself (fp32 distances, as in a round).

    The search decides in float64; at its boundary fp32 rounding can flip the aggregator's choice,
    so ``gamma`` is shrunk by factors ``(1 - tol)^j`` (``j = 0, 1, 4, 16, 64, 256``) until the
    real rule selects the copies (:meth:`_Simulation.needed`).

    Returns:
        ``(gamma, success)``; ``gamma`` unchanged and ``False`` if no shrink succeeds.
    """
    need = sim.needed(rule)
    for j in (0, 1, 4, 16, 64, 256):
        g = gamma * (1.0 - tol) ** j
        Y = torch.cat([sim.X, sim.rows(torch.tensor([g], dtype=torch.float64)).expand(sim.c, -1)])  # (n, D)
        _, m = AGGREGATORS.get(rule)(Y, None, f=sim.f)
        if sum(i >= sim.n_b for i in m["selected"]) >= need:
            return g, True
    return gamma, False


@ATTACKS.register("agr_tal")
def agr_tal(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    perturbation: str = "unit_vec",
    tol: float = 1e-4,
) -> tuple[torch.Tensor, dict]:
    """AGR-tailored attack (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine:
    Optimizing Model Poisoning Attacks and Defenses for Federated Learning").

    Every malicious row is ``m = mu + gamma * p``: ``mu`` the mean of the known rows, ``p`` the
    perturbation (as :func:`~spfl_vmap.attacks.min_max`). The attacker simulates the round:
    ``N - c`` benign rows plus ``c`` identical copies of ``m`` (``c`` = number of malicious rows),
    the benign rows being the known rows (omniscient: the benign rows themselves; partial: the
    attacker's own honest rows, repeated in turn to fill ``N - c`` rows), aggregated with ``f``
    (lowered if ``N`` is too small for it, see
    :func:`~spfl_vmap.aggregators.required_clients`) and the aggregator's default
    hyperparameters:

    - ``krum`` / ``multi_krum``: the largest ``gamma`` for which the aggregator *selects* the
      copies (Krum: it picks a copy; Multi-Krum with its default ``m = n - 2f``, re-scored: all
      ``c`` copies, or ``m`` if fewer, are among the selected), the criterion of the authors'
      code. All candidates are simulated at once and the boundary is found by
      :func:`max_feasible` (a grid of powers of two, then 15 interior candidates per round); if
      selection is not monotone in ``gamma`` this is the end of the first selected interval, as
      for the authors' halving search. The result is confirmed by running the registered
      aggregator on the simulated round (and shrunk slightly if fp32 rounding at the boundary
      disagrees); ``agr_success`` reports whether it selects the copies.
    - ``median`` / ``trimmed_mean`` / ``bulyan``: the ``gamma`` maximizing the deviation
      ``|AGR(benign + copies) - mu|`` (the paper's objective): the smallest ``gamma`` whose
      deviation is maximal (within a relative 1e-6) on a grid of powers of two, refined around the
      best point to ``tol`` (:func:`_argmax_gamma`). The rule is evaluated for all candidates at
      once by laying candidates side by side as extra coordinates (the coordinate-wise step is
      per coordinate); Bulyan's recursive Krum selection is batched over candidates.

    The authors search ``gamma`` by halving from a fixed start (e.g. 5 or 10); the grid covers
    ``2^-30 .. 2^40``, so no start value is needed. Unlike their code, Bulyan is attacked through
    its output deviation rather than Multi-Krum's selection criterion.

    Args:
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        weights: unused.
        generator: unused (the attack is deterministic).
        knowledge: ``omniscient`` (known rows = benign rows) or ``partial`` (the malicious
            clients' own honest rows).
        f: the aggregator's assumed Byzantine count; ``0`` means ``malicious.sum()``.
        aggregator: the defended rule, one of :data:`AGR_TAL_RULES`.
        perturbation: ``unit_vec`` (``-mu/|mu|``, default), ``std`` (``-std``) or ``sign``
            (``-sign(mu)``).
        tol: relative tolerance of ``gamma``.

    Returns:
        ``([N, D] attacked U, metrics)``: ``{"gamma": float, "objective": "selection",
        "agr_success": bool}`` for Krum / Multi-Krum, ``{"gamma": float, "objective":
        "deviation", "deviation": float}`` for the others. With no malicious row, or no benign
        one, ``U`` is returned unchanged with empty metrics.

    Raises:
        ConfigError: an aggregator outside :data:`AGR_TAL_RULES` (use ``min_max`` / ``min_sum``,
            which need no aggregator), an unknown perturbation, or ``tol`` not in ``(0, 1)``.
    """
    mal = check_inputs(U, malicious, knowledge)
    if aggregator not in AGR_TAL_RULES:
        raise ConfigError(
            f"agr_tal is tailored to {', '.join(AGR_TAL_RULES)}; got aggregator {aggregator!r} "
            f"(use min_max or min_sum, which do not depend on the aggregator)"
        )
    if not 0.0 < tol < 1.0:
        raise ConfigError(f"agr_tal: tol must be in (0, 1), got {tol}")
    X = known_rows(U, mal, knowledge)  # (n_known, D) fp32
    c = int(mal.sum())
    if c == 0 or c == U.shape[0] or X.shape[0] == 0:  # no attacker, or no benign row to beat
        return U.clone(), {}
    p = _perturbation(Rows(X), perturbation)  # (D,); validates the name
    n = U.shape[0]
    sim = _Simulation(X, p, n - c, c, _sim_f(aggregator, n_byzantine(mal, f), n))
    moving = float(p.norm()) > 0.0  # a zero direction (e.g. ``std`` of one known row): stay at mu
    if aggregator in SELECTION_RULES:
        gamma = max_feasible(lambda g: sim.selected(g, aggregator), tol) if moving else 0.0
        gamma, success = _confirm_selected(sim, gamma, aggregator, tol)
        metrics: dict = {"gamma": gamma, "objective": "selection", "agr_success": success}
    else:
        if moving:
            gamma, deviation = _argmax_gamma(lambda g: sim.deviation(g, aggregator), tol)
        else:
            gamma, deviation = 0.0, float(sim.deviation(torch.zeros(1, dtype=torch.float64), aggregator)[0])
        metrics = {"gamma": gamma, "objective": "deviation", "deviation": deviation}
    return with_rows(U, mal, sim.rows(torch.tensor([gamma], dtype=torch.float64))[0]), metrics
