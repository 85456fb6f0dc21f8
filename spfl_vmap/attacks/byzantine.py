"""Byzantine model-poisoning attacks: rewrite the malicious rows of the update matrix ``U``.

Each attack is a pure function::

    fn(U: Tensor[N, D], malicious: BoolTensor[N], *, weights: Tensor[N] | None = None,
       generator: torch.Generator | None = None, knowledge: str = "omniscient", f: int = 0,
       aggregator: str = "mean", **own_hyperparameters) -> (Tensor[N, D], dict)

returning a new ``U`` (benign rows unchanged, input never modified) and metrics. Statistics such
as the benign mean and standard deviation are plain (unweighted) over the rows the attacker knows
(see :func:`~spfl_vmap.attacks._base.known_rows`); ``weights`` is accepted for a uniform API.
``f`` is the Byzantine count the attacker plans for (ALIE's ``z``, Fang's Krum check); ``0``
means the number of malicious rows.

Each public function validates its inputs and runs its core (``_alie``, ``_gamma_attack``, ...)
on a :class:`~spfl_vmap.attacks._base.Cohort` of all ``N`` rows. The core is also the function's
``on_cohort`` attribute, which :func:`~spfl_vmap.attacks.attack_cohort` runs under torchrun on a
process's own rows, the statistics of the known rows (:class:`~spfl_vmap.attacks._base.Rows`)
then coming through collectives: one implementation for both.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Callable

import torch

from ..aggregators import krum_scores
from ..errors import ConfigError
from ._base import ATTACKS, Cohort, Rows, default_generator

KRUM_LIKE = ("krum", "multi_krum", "bulyan")


def _randn(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=g.device).to(device)


def _rand(shape: tuple[int, ...], g: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=g.device).to(device)


@ATTACKS.register("none")
def none(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """No attack: returns a copy of ``U``."""
    return Cohort.local(U, malicious, knowledge).unchanged()


def _unchanged(c: Cohort, **_engine: object) -> tuple[torch.Tensor, dict]:
    return c.unchanged()


none.on_cohort = _unchanged  # type: ignore[attr-defined]


@ATTACKS.register("gaussian")
def gaussian(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    sigma: float = 200.0,
) -> tuple[torch.Tensor, dict]:
    """Gaussian Byzantine rows ``~ N(0, sigma^2 I)`` (Blanchard et al. 2017, Section 5).

    Gaussian, not the uniform ``[0, 1)`` noise of the original toolkit. The default ``sigma=200``
    is Blanchard et al.'s setting: it is orders of magnitude above typical per-coordinate updates
    (1e-3..1e-1), so even one attacker in 50 shifts every coordinate of a plain mean by about
    ``200/50 = 4`` and the mean collapses within a round, while robust rules should ignore it.

    Args:
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        weights: unused.
        generator: noise source; ``None`` means a fixed seed 0.
        knowledge: unused (the noise needs none).
        f: unused.
        aggregator: unused.
        sigma: standard deviation of each coordinate.

    Returns:
        ``([N, D] attacked U, {})``.
    """
    return _gaussian(Cohort.local(U, malicious, knowledge), generator=generator, sigma=sigma)


def _gaussian(c: Cohort, *, generator: torch.Generator | None = None, sigma: float = 200.0) -> tuple[torch.Tensor, dict]:
    # every rank draws the cohort's n_mal rows in cohort order and keeps its own
    rows = sigma * _randn((c.n_mal, c.dim), default_generator(generator), c.U.device)  # (n_mal, D)
    return c.write(c.mine(rows)), {}


gaussian.on_cohort = _gaussian  # type: ignore[attr-defined]


@ATTACKS.register("sign_flip")
def sign_flip(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    scale: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Sign flipping: each malicious client sends ``-scale`` times its own honest update
    (e.g. Damaskinos et al. 2018; Allen-Zhu et al. 2021). Needs no knowledge of others.

    Returns:
        ``([N, D] attacked U, {})``.
    """
    return _sign_flip(Cohort.local(U, malicious, knowledge), scale=scale)


def _sign_flip(c: Cohort, *, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    return c.write(-scale * c.U[c.mal].float()), {}


sign_flip.on_cohort = _sign_flip  # type: ignore[attr-defined]


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Label flipping ``y -> num_classes - 1 - y`` (e.g. Fang et al. 2020; Tolpegin et al. 2020).

    Args:
        y: int64 labels of any shape, values in ``[0, num_classes)``.
        num_classes: number of classes.

    Returns:
        A new tensor of flipped labels (padding labels outside the range are left alone).
    """
    valid = (y >= 0) & (y < num_classes)
    return torch.where(valid, num_classes - 1 - y, y)


@ATTACKS.register("label_flip")
def label_flip(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Label flipping is data poisoning: the update matrix is left unchanged here.

    The engine reads the function attribute ``label_flip.data_poison`` (= :func:`flip_labels`)
    and applies it to malicious clients' labels before local training (round step 4).

    Returns:
        ``([N, D] copy of U, {})``.
    """
    return Cohort.local(U, malicious, knowledge).unchanged()


label_flip.data_poison = flip_labels  # type: ignore[attr-defined]
label_flip.on_cohort = _unchanged  # type: ignore[attr-defined]


def alie_z(n: int, f: int) -> float:
    """``z_max`` of "A Little Is Enough" (Baruch et al. 2019, Algorithm 1).

    ``s = floor(n/2 + 1) - f`` benign clients must be "won over"; ``z = Phi^{-1}((n - s) / n)``.
    The probability is clamped to ``[1e-6, 1 - 1e-6]`` so that degenerate ``(n, f)`` still give
    a finite ``z``.
    """
    s = math.floor(n / 2 + 1) - f
    p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(p)


@ATTACKS.register("alie")
def alie(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    z: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019).

    Every malicious row is ``mean - z * std`` (coordinate-wise over the known rows), with
    ``z`` from :func:`alie_z` with ``n = N`` and the planned Byzantine count, unless ``z`` is
    given. Small per-coordinate shifts stay inside the benign spread, so median/Krum-type rules
    accept them.

    Args:
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        weights: unused.
        generator: unused.
        knowledge: ``omniscient`` (benign rows) or ``partial`` (malicious clients' own rows).
        f: planned Byzantine count; ``0`` means ``malicious.sum()``.
        aggregator: unused.
        z: override of ``z_max``.

    Returns:
        ``([N, D] attacked U, {"z": float})``.
    """
    return _alie(Cohort.local(U, malicious, knowledge), knowledge=knowledge, f=f, z=z)


def _alie(c: Cohort, *, knowledge: str = "omniscient", f: int = 0, z: float | None = None) -> tuple[torch.Tensor, dict]:
    X = c.known(knowledge)  # n_known rows
    if X.n == 0:
        return c.unchanged()
    zz = alie_z(c.N, c.planned(f)) if z is None else float(z)
    return c.write(X.mean() - zz * X.std()), {"z": zz}


alie.on_cohort = _alie  # type: ignore[attr-defined]


@ATTACKS.register("ipm")
def ipm(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    epsilon: float = 0.1,
) -> tuple[torch.Tensor, dict]:
    """Inner-product manipulation (Xie, Koyejo & Gupta, UAI 2020, "Fall of Empires").

    Every malicious row is ``-epsilon * mean(known rows)``, making the aggregate's inner product
    with the true mean negative. The paper studies a small ``epsilon`` (which stays close to the
    benign rows and so passes Krum-type rules) and a large one (against coordinate-wise rules);
    the default is the small setting.

    Returns:
        ``([N, D] attacked U, {})``.
    """
    return _ipm(Cohort.local(U, malicious, knowledge), knowledge=knowledge, epsilon=epsilon)


def _ipm(c: Cohort, *, knowledge: str = "omniscient", epsilon: float = 0.1) -> tuple[torch.Tensor, dict]:
    X = c.known(knowledge)
    if X.n == 0:
        return c.unchanged()
    return c.write(-epsilon * X.mean()), {}


ipm.on_cohort = _ipm  # type: ignore[attr-defined]


def _perturbation(X: Rows, kind: str) -> torch.Tensor:
    """The ``(D,)`` direction ``p`` of Shejwalkar & Houmansadr's attacks, from the known rows."""
    mu = X.mean()
    if kind == "unit_vec":
        return -mu / mu.norm().clamp_min(1e-12)
    if kind == "std":
        return -X.std()
    if kind == "sign":
        return -torch.sign(mu)
    raise ConfigError(f"perturbation must be one of unit_vec, std, sign; got {kind!r}")


def max_feasible(ok: Callable[[torch.Tensor], torch.Tensor], tol: float, rounds: int = 40) -> float:
    """Largest ``g >= 0`` with ``ok(g)``, for a predicate true on an interval containing 0.

    Vectorized over candidates: all powers of two ``2^-30 .. 2^40`` are tested at once to bracket
    the boundary, then the bracket ``[lo, hi)`` (``lo`` feasible, ``hi`` not) is refined with 15
    interior candidates per round until ``hi <= lo * (1 + tol)``.

    Args:
        ok: maps float64 candidates ``[K]`` to a bool ``[K]`` mask.
        tol: relative tolerance; the result ``g`` satisfies ``ok(g)`` and ``not ok(g * (1+tol))``
            (unless the predicate holds on the whole grid, then ``2^40`` is returned).
        rounds: cap on refinement rounds.

    Returns:
        The feasible ``g``.
    """
    grid = 2.0 ** torch.arange(-30, 41, dtype=torch.float64)  # (71,)
    feas = ok(grid).cpu()
    if bool(feas.all()):
        return float(grid[-1])
    first_bad = int((~feas).nonzero()[0])
    lo = 0.0 if first_bad == 0 else float(grid[first_bad - 1])
    hi = float(grid[first_bad])
    for _ in range(rounds):
        if hi <= lo * (1.0 + tol):
            break
        cand = torch.linspace(lo, hi, 17, dtype=torch.float64)[1:-1]  # (15,)
        feas = ok(cand).cpu()
        if bool(feas.any()):
            lo = float(cand[feas.nonzero()[-1]])
        bad = cand[(~feas) & (cand > lo)]
        if bad.numel():
            hi = float(bad.min())
    return lo


def _gamma_attack(c: Cohort, knowledge: str, perturbation: str, tol: float, kind: str) -> tuple[torch.Tensor, dict]:
    X = c.known(knowledge)  # n known rows
    if X.n == 0 or c.n_mal == 0:
        return c.unchanged()
    p = _perturbation(X, perturbation).double()  # (D,)
    Xd = X.X.double()  # (n_r, D) the known rows held here
    mu = X.mean(torch.float64)
    # |mu + g p - x_i|^2 = A_i + 2 g B_i + g^2 C: exact for every candidate g without a [K, n, D] tensor.
    A = X.per_row(((mu - Xd) ** 2).sum(dim=1))  # (n,)
    B = X.per_row((mu - Xd) @ p)  # (n,)
    C = p @ p
    P = X.sqdist().double()  # (n, n)
    if kind == "min_max":
        thr = P.max()

        def ok(g: torch.Tensor) -> torch.Tensor:
            g = g.to(A.device)[:, None]
            return (A + 2 * g * B + g * g * C).max(dim=1).values <= thr
    else:
        thr = P.sum(dim=1).max()

        def ok(g: torch.Tensor) -> torch.Tensor:
            g = g.to(A.device)[:, None]
            return (A + 2 * g * B + g * g * C).sum(dim=1) <= thr

    gamma = max_feasible(ok, tol)
    return c.write(mu + gamma * p), {"gamma": gamma}


@ATTACKS.register("min_max")
def min_max(
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
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine", aggregator-
    agnostic attack).

    Every malicious row is ``m = mean + gamma * p`` with the largest ``gamma`` such that
    ``max_i |m - x_i| <= max_{i,j} |x_i - x_j|`` over the known rows ``x``: the malicious update
    is no farther from any benign update than the benign updates are from each other. The
    distance is convex in ``gamma`` and ``gamma = 0`` is feasible, so the feasible set is an
    interval and :func:`max_feasible` finds its end.

    Args:
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        weights: unused.
        generator: unused.
        knowledge: ``omniscient`` or ``partial``.
        f: unused.
        aggregator: unused.
        perturbation: ``unit_vec`` (``-mean/|mean|``, the default of the authors' code,
            NDSS21-Model-Poisoning), ``std`` (``-std``) or ``sign`` (``-sign(mean)``). On
            FashionMNIST ``lr`` (20 clients/round, 4 attackers) ``std`` hurt Krum and trimmed
            mean no more than a Gaussian attack; ``unit_vec`` and ``sign`` did.
        tol: relative tolerance of ``gamma``.

    Returns:
        ``([N, D] attacked U, {"gamma": float})``.
    """
    return _min_max(Cohort.local(U, malicious, knowledge), knowledge=knowledge, perturbation=perturbation, tol=tol)


def _min_max(c: Cohort, *, knowledge: str = "omniscient", perturbation: str = "unit_vec", tol: float = 1e-4) -> tuple[torch.Tensor, dict]:
    return _gamma_attack(c, knowledge, perturbation, tol, "min_max")


min_max.on_cohort = _min_max  # type: ignore[attr-defined]


@ATTACKS.register("min_sum")
def min_sum(
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
    """Min-Sum (Shejwalkar & Houmansadr, NDSS 2021).

    Like :func:`min_max`, with the constraint ``sum_i |m - x_i|^2 <= max_i sum_j |x_i - x_j|^2``:
    the malicious update's total squared distance to the known rows is no larger than that of any
    known row.

    Returns:
        ``([N, D] attacked U, {"gamma": float})``.
    """
    return _min_sum(Cohort.local(U, malicious, knowledge), knowledge=knowledge, perturbation=perturbation, tol=tol)


def _min_sum(c: Cohort, *, knowledge: str = "omniscient", perturbation: str = "unit_vec", tol: float = 1e-4) -> tuple[torch.Tensor, dict]:
    return _gamma_attack(c, knowledge, perturbation, tol, "min_sum")


min_sum.on_cohort = _min_sum  # type: ignore[attr-defined]


def _fang_trimmed(X: Rows, c: int, knowledge: str, b: float, g: torch.Generator) -> torch.Tensor:
    mu = X.mean()  # (D,)
    up = mu <= 0  # push a coordinate up where the benign direction s_j is not positive
    if knowledge == "omniscient":
        w_max, w_min = X.max(), X.min()
        # Values beyond the benign extremes, by up to a factor b (Fang et al. 2020, Section 4.2).
        up_lo = torch.where(w_max > 0, w_max, w_max / b)
        up_hi = torch.where(w_max > 0, b * w_max, w_max)
        dn_lo = torch.where(w_min > 0, w_min / b, b * w_min)
        dn_hi = torch.where(w_min > 0, w_min, w_min)
    else:
        # Partial knowledge: the paper estimates the benign spread from the attacker's own honest
        # updates and samples in [mu + 3 sigma, mu + 4 sigma] (or the mirror interval).
        sd = X.std()
        up_lo, up_hi = mu + 3 * sd, mu + 4 * sd
        dn_lo, dn_hi = mu - 4 * sd, mu - 3 * sd
    lo = torch.where(up, up_lo, dn_lo)  # (D,)
    hi = torch.where(up, up_hi, dn_hi)
    return lo + (hi - lo) * _rand((c, X.dim), g, X.X.device)  # (c, D)


def _fang_krum(
    X: Rows, n_total: int, c: int, f: int, lambda_tol: float
) -> tuple[torch.Tensor, float, float, bool]:
    """``-lambda * s`` with the largest ``lambda`` (halving from Fang's upper bound) for which
    Krum selects a crafted row among ``[X; c crafted copies]``."""
    n_b, d = X.n, X.dim
    dev = X.X.device
    s = torch.sign(X.mean())  # (D,) benign direction of change
    Dbb = X.sqdist().double()  # (n_b, n_b)
    # Fang et al. 2020, Eq. for the upper bound of lambda (Euclidean, not squared, distances).
    k = min(max(n_total - c - 2, 1), n_b - 1)
    if k >= 1:
        dist = Dbb.sqrt() + torch.diag(torch.full((n_b,), float("inf"), dtype=torch.float64, device=dev))
        term1 = torch.topk(dist, k, dim=1, largest=False).values.sum(dim=1).min() / (max(n_total - 2 * c - 1, 1) * math.sqrt(d))
    else:
        term1 = torch.zeros((), dtype=torch.float64, device=dev)
    Xd = X.X.double()  # (n_r, D) the known rows held here
    term2 = X.per_row(Xd.norm(dim=1)).max() / math.sqrt(d)
    lam0 = float(term1 + term2)
    if lam0 <= lambda_tol:
        return -lam0 * s, lam0, lam0, False
    K = int(math.floor(math.log2(lam0 / lambda_tol))) + 1
    lams = lam0 * 0.5 ** torch.arange(K, dtype=torch.float64, device=dev)  # (K,)
    # All halvings at once: |-lam s - x_i|^2 = lam^2 |s|^2 + 2 lam s.x_i + |x_i|^2.
    xs, xx = X.per_row(Xd @ s.double()), X.per_row((Xd * Xd).sum(1))  # (n_b,) each
    Dcb = lams[:, None] ** 2 * (s.double() @ s.double()) + 2 * lams[:, None] * xs[None] + xx[None]  # (K, n_b)
    n = n_b + c
    Dall = torch.zeros((K, n, n), dtype=torch.float64, device=dev)
    Dall[:, :n_b, :n_b] = Dbb
    Dall[:, n_b:, :n_b] = Dcb[:, None, :]
    Dall[:, :n_b, n_b:] = Dcb[:, :, None]
    hit = torch.argmin(krum_scores(Dall, f), dim=1) >= n_b  # (K,) Krum picks a crafted row
    if bool(hit.any()):
        lam = float(lams[int(hit.nonzero()[0])])
        return -lam * s, lam, lam0, True
    lam = float(lams[-1])
    return -lam * s, lam, lam0, False


@ATTACKS.register("fang")
def fang(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
    b: float = 2.0,
    variant: str | None = None,
    lambda_tol: float = 1e-5,
) -> tuple[torch.Tensor, dict]:
    """Local model poisoning (Fang, Cao, Jia & Gong, USENIX Security 2020, "Local Model Poisoning
    Attacks to Byzantine-Robust Federated Learning"), in update space (``U`` = model - global).

    ``s_j = sign(mean of known rows)_j`` is the direction the global model would move. Variants,
    chosen by ``variant`` or else by ``aggregator`` (``krum``/``multi_krum``/``bulyan`` -> Krum):

    - ``trimmed_mean`` (attack on trimmed mean / median): per coordinate, values drawn uniformly
      (with ``generator``) beyond the benign extreme opposite to ``s_j``: in ``[w_max, b*w_max]``
      (``w_max > 0``) or ``[w_max/b, w_max]`` where ``s_j <= 0``, and ``[w_min/b, w_min]``
      (``w_min > 0``) or ``[b*w_min, w_min]`` where ``s_j > 0``; ``b = 2`` as in the paper. With
      partial knowledge, ``[mu + 3 sigma, mu + 4 sigma]`` or ``[mu - 4 sigma, mu - 3 sigma]``
      from the attacker's own rows.
    - ``krum``: all malicious rows are ``-lambda * s`` (identical copies, which support each
      other's Krum scores), ``lambda`` halved from the paper's upper bound until Krum (with ``f``)
      selects a crafted row, stopping at ``lambda_tol``. All halvings are scored at once.
      With partial knowledge the attacker simulates Krum on its own honest rows plus the copies.

    Args:
        U: ``[N, D]`` updates.
        malicious: ``[N]`` bool mask.
        weights: unused.
        generator: sampling source of the trimmed-mean variant; ``None`` means a fixed seed 0.
        knowledge: ``omniscient`` or ``partial``.
        f: Byzantine count for the Krum check; ``0`` means ``malicious.sum()``.
        aggregator: the defended aggregator's registry name (picks the variant).
        b: interval factor of the trimmed-mean variant.
        variant: ``krum`` or ``trimmed_mean`` to override the choice.
        lambda_tol: smallest ``lambda`` tried.

    Returns:
        ``([N, D] attacked U, metrics)``: ``{"variant": "trimmed_mean"}`` or
        ``{"variant": "krum", "lambda": float, "lambda_max": float (the upper bound),
        "krum_success": bool}``.
    """
    return _fang(Cohort.local(U, malicious, knowledge), generator=generator, knowledge=knowledge, f=f,
                 aggregator=aggregator, b=b, variant=variant, lambda_tol=lambda_tol)


def _fang(c: Cohort, *, generator: torch.Generator | None = None, knowledge: str = "omniscient", f: int = 0,
          aggregator: str = "mean", b: float = 2.0, variant: str | None = None, lambda_tol: float = 1e-5) -> tuple[torch.Tensor, dict]:
    v = variant if variant is not None else ("krum" if aggregator in KRUM_LIKE else "trimmed_mean")
    if v not in ("krum", "trimmed_mean"):
        raise ConfigError(f"fang variant must be krum or trimmed_mean, got {v!r}")
    if b < 1:
        raise ConfigError(f"fang: b must be >= 1, got {b}")
    X = c.known(knowledge)
    if c.n_mal == 0 or X.n == 0:
        return c.unchanged()
    if v == "trimmed_mean":
        rows = _fang_trimmed(X, c.n_mal, knowledge, b, default_generator(generator))  # (n_mal, D), drawn on every rank
        return c.write(c.mine(rows)), {"variant": v}
    row, lam, lam0, success = _fang_krum(X, c.N, c.n_mal, c.planned(f), lambda_tol)
    return c.write(row), {"variant": v, "lambda": lam, "lambda_max": lam0, "krum_success": success}


fang.on_cohort = _fang  # type: ignore[attr-defined]


@ATTACKS.register("nan")
def nan(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Malformed updates: malicious rows full of NaN (tests the non-finite policy)."""
    return _nan(Cohort.local(U, malicious, knowledge))


def _nan(c: Cohort) -> tuple[torch.Tensor, dict]:
    return c.write(torch.tensor(float("nan"))), {}


nan.on_cohort = _nan  # type: ignore[attr-defined]


@ATTACKS.register("inf")
def inf(
    U: torch.Tensor,
    malicious: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    knowledge: str = "omniscient",
    f: int = 0,
    aggregator: str = "mean",
) -> tuple[torch.Tensor, dict]:
    """Malformed updates: malicious rows full of ``+inf``."""
    return _inf(Cohort.local(U, malicious, knowledge))


def _inf(c: Cohort) -> tuple[torch.Tensor, dict]:
    return c.write(torch.tensor(float("inf"))), {}


inf.on_cohort = _inf  # type: ignore[attr-defined]
