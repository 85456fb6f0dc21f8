"""Privacy accounting for DP-SGD and DP-FedAvg: epsilon from a history of noisy steps.

Every step we account for is one application of the *Poisson-subsampled Gaussian mechanism*:
each record (an example for DP-SGD, a client for DP-FedAvg) is included with probability
``sample_rate`` q, the clipped contributions are summed, and Gaussian noise of standard deviation
``noise_multiplier * clip`` is added (Abadi et al. 2016; McMahan et al. 2018). A run is described
by its history: a list of ``(noise_multiplier, sample_rate, num_steps)`` entries.

The maths is not re-derived here; it is delegated to Opacus (imported lazily, since
``import opacus`` takes about a second):

- ``"rdp"``: Renyi DP of the subsampled Gaussian (Mironov 2017; Mironov, Talwar & Zhang 2019),
  composed additively over steps and converted to (epsilon, delta)-DP at the best order.
- ``"prv"``: numerical composition of privacy loss random variables by FFT (Gopi, Lee &
  Wutschitz 2021). Tighter than RDP (usually 5-40% smaller epsilon), slower (about 0.05-0.5 s
  per distinct history), and it returns an upper bound within ``eps_error=0.01``.

State (who took which steps) lives in :class:`PrivacyAccountant` and :class:`ClientAccountants`;
the maths lives in pure, cached functions registered in :data:`ACCOUNTANTS`.

Caveat: both accountants assume Poisson subsampling. Shuffled fixed-size batches (one epoch =
``ceil(n/B)`` steps without replacement) are commonly accounted this way, but the guarantee is
then an approximation, as in most DP-SGD code.

Example:
    >>> acc = PrivacyAccountant("rdp")
    >>> acc.step(noise_multiplier=1.5, sample_rate=0.04, num_steps=2250)
    >>> round(acc.get_epsilon(delta=1e-5), 6)
    7.329111
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, SpflError
from ..registry import Registry

HistoryEntry = tuple[float, float, int]
"""One run of identical steps: ``(noise_multiplier, sample_rate, num_steps)``."""

EpsilonFn = Callable[[tuple[HistoryEntry, ...], float], float]

ACCOUNTANTS: Registry[EpsilonFn] = Registry("accountant")
"""Maps a mechanism name to a pure function ``(history, delta) -> epsilon``."""

# Calibration never searches above this noise multiplier (Opacus uses the same cap).
_MAX_NOISE_MULTIPLIER = 1e6


class BudgetExceeded(SpflError):
    """The next steps would take epsilon above the target privacy budget."""


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _as_float(name: str, value: Any) -> float:
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    return value


def _check_sample_rate(sample_rate: Any) -> float:
    q = _as_float("sample_rate", sample_rate)
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {q:g}")
    return q


def _check_noise_multiplier(noise_multiplier: Any) -> float:
    sigma = _as_float("noise_multiplier", noise_multiplier)
    if not (sigma > 0.0 and math.isfinite(sigma)):
        raise ConfigError(f"noise_multiplier must be a positive finite number, got {sigma:g}")
    return sigma


def _check_steps(num_steps: Any, name: str = "steps") -> int:
    if getattr(num_steps, "ndim", None) == 0 and hasattr(num_steps, "item"):
        num_steps = num_steps.item()
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Real):
        raise ConfigError(f"{name} must be a non-negative integer, got {num_steps!r}")
    if not (math.isfinite(float(num_steps)) and float(num_steps) == int(num_steps)):
        raise ConfigError(f"{name} must be a non-negative integer, got {num_steps!r}")
    steps = int(num_steps)
    if steps < 0:
        raise ConfigError(f"{name} must be a non-negative integer, got {steps}")
    return steps


def _check_delta(delta: Any) -> float:
    d = _as_float("delta", delta)
    if not 0.0 < d < 1.0:
        raise ConfigError(f"delta must be in (0, 1), got {d:g}")
    return d


def _entry(noise_multiplier: Any, sample_rate: Any, num_steps: Any) -> HistoryEntry:
    """A validated history entry."""
    return (
        _check_noise_multiplier(noise_multiplier),
        _check_sample_rate(sample_rate),
        _check_steps(num_steps, "num_steps"),
    )


def _check_mechanism(mechanism: Any) -> str:
    if not isinstance(mechanism, str):
        raise ConfigError(f"accountant must be a string, got {mechanism!r}")
    ACCOUNTANTS.get(mechanism)  # raises ConfigError listing the known names
    return mechanism


def default_delta(n: int) -> float:
    """The default delta for a dataset of ``n`` records: ``1 / n``.

    Args:
        n: Number of protected records (examples for DP-SGD, clients for DP-FedAvg).

    Returns:
        ``1 / n``.

    Note:
        ``delta = 1/n`` is the loosest value commonly reported. A delta this large permits a
        mechanism that publishes one record in the clear, so prefer a smaller delta (``1/n**1.1``
        or ``1e-5`` with ``n < 1e5``) for claims you publish.
    """
    n = _check_steps(n, "n")
    if n < 1:
        raise ConfigError(f"n must be a positive integer, got {n}")
    return 1.0 / n


def check_delta(delta: float, n: int) -> float:
    """Validate a user-given delta for a dataset of ``n`` records.

    Args:
        delta: The delta of the (epsilon, delta)-DP guarantee, in (0, 1).
        n: Number of protected records (examples for DP-SGD, clients for DP-FedAvg).

    Returns:
        ``delta`` as a float.

    Raises:
        ConfigError: ``delta`` is not in (0, 1) or ``n`` is not a positive integer.

    Warns:
        UserWarning: ``delta >= 1/n``, a guarantee that allows leaking one record in full.
    """
    d = _check_delta(delta)
    bound = default_delta(n)
    if d >= bound:
        warnings.warn(
            f"delta={d:g} is >= 1/n = {bound:g} for n={n} records; such a guarantee allows "
            f"publishing a whole record. Use delta well below 1/n (e.g. 1/n**1.1).",
            UserWarning,
            stacklevel=2,
        )
    return d


# --------------------------------------------------------------------------------------------
# Pure maths (Opacus), registered per mechanism
# --------------------------------------------------------------------------------------------


@ACCOUNTANTS.register("rdp")
def rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Epsilon of a history by Renyi DP accounting.

    The RDP of the Poisson-subsampled Gaussian at each order (Mironov, Talwar & Zhang 2019) is
    summed over steps and converted to (epsilon, delta)-DP (Mironov 2017), via Opacus's
    ``RDPAccountant`` with its default orders.

    Args:
        history: Entries ``(noise_multiplier, sample_rate, num_steps)`` with ``num_steps >= 1``.
        delta: Target delta in (0, 1).

    Returns:
        Epsilon; 0.0 for an empty history.
    """
    if not history:
        return 0.0
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@ACCOUNTANTS.register("prv")
def prv_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """Epsilon of a history by PRV accounting (Gopi, Lee & Wutschitz 2021).

    Discretizes each step's privacy loss random variable and composes them by FFT, via Opacus's
    ``PRVAccountant``. Returns the upper bound of the estimate (``eps_error=0.01``,
    ``delta_error=delta/1000``), so the guarantee holds.

    Args:
        history: Entries ``(noise_multiplier, sample_rate, num_steps)`` with ``num_steps >= 1``.
        delta: Target delta in (0, 1).

    Returns:
        Epsilon; 0.0 for an empty history.
    """
    if not history:
        return 0.0
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    # log(0) at q=1 and overflow in far tails are expected inside the discretization
    with np.errstate(all="ignore"):
        return float(acc.get_epsilon(delta=delta))


def _canonical(history: Iterable[HistoryEntry]) -> tuple[HistoryEntry, ...]:
    """Merge entries with equal (sigma, q) and sort them: composition is commutative, so the
    canonical form has the same epsilon and lets equivalent histories share one cache entry."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        if n > 0:
            key = (float(sigma), float(q))
            steps[key] = steps.get(key, 0) + int(n)
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


@functools.lru_cache(maxsize=8192)
def _epsilon_cached(mechanism: str, history: tuple[HistoryEntry, ...], delta: float) -> float:
    return ACCOUNTANTS.get(mechanism)(history, delta)


def epsilon_from_history(
    history: Iterable[HistoryEntry], delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon spent by a history of steps. Results are cached per canonical history.

    Args:
        history: Entries ``(noise_multiplier, sample_rate, num_steps)``.
        delta: Target delta in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        Epsilon of the composition of all entries.

    Raises:
        ConfigError: an invalid entry, delta or accountant name.
    """
    mechanism = _check_mechanism(accountant)
    d = _check_delta(delta)
    entries = [
        (_check_noise_multiplier(s), _check_sample_rate(q), _check_steps(n)) for s, q, n in history
    ]
    return _epsilon_cached(mechanism, _canonical(entries), d)


def compute_epsilon(
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (Abadi et al. 2016).

    Args:
        sample_rate: Inclusion probability q of each record per step, in (0, 1].
        noise_multiplier: Noise std divided by the clip norm, > 0.
        steps: Number of steps, >= 0.
        delta: Target delta in (0, 1).
        accountant: ``"rdp"`` (Mironov 2017) or ``"prv"`` (Gopi et al. 2021).

    Returns:
        Epsilon; 0.0 for zero steps.

    Raises:
        ConfigError: an argument outside its range.
    """
    return epsilon_from_history([(noise_multiplier, sample_rate, steps)], delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (up to the tolerance) that keeps epsilon within a budget.

    Bisects on sigma, using that epsilon decreases as sigma grows. The result satisfies
    ``(1 - epsilon_tolerance) * target_epsilon <= epsilon(sigma) <= target_epsilon``. For
    ``"prv"`` the bracket starts from the RDP answer, an upper bound since PRV is tighter, so the
    slow PRV is never evaluated at tiny sigmas.

    Args:
        target_epsilon: The privacy budget's epsilon, > 0.
        sample_rate: Inclusion probability q per step, in (0, 1].
        steps: Number of steps the run will take, >= 1.
        delta: Target delta in (0, 1).
        accountant: ``"rdp"`` or ``"prv"``.
        epsilon_tolerance: Relative tolerance below the target, in (0, 1).

    Returns:
        The noise multiplier sigma.

    Raises:
        ConfigError: an argument out of range, or a budget so small that sigma would exceed 1e6.
    """
    mechanism = _check_mechanism(accountant)
    target = _as_float("target_epsilon", target_epsilon)
    if not (target > 0.0 and math.isfinite(target)):
        raise ConfigError(f"target_epsilon must be a positive finite number, got {target:g}")
    q = _check_sample_rate(sample_rate)
    n = _check_steps(steps)
    if n < 1:
        raise ConfigError("steps must be >= 1 to calibrate a noise multiplier")
    d = _check_delta(delta)
    tol = _as_float("epsilon_tolerance", epsilon_tolerance)
    if not 0.0 < tol < 1.0:
        raise ConfigError(f"epsilon_tolerance must be in (0, 1), got {tol:g}")

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():
            # Opacus warns when the best RDP order is at the edge of its grid, which is expected
            # at the extreme sigmas a bisection visits.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return _epsilon_cached(mechanism, ((sigma, q, n),), d)

    if mechanism == "prv":
        hi = calibrate_noise_multiplier(target, q, n, d, "rdp", tol)
    else:
        hi = 1.0
    # hi: epsilon(hi) <= target; lo: epsilon(lo) > target
    while eps(hi) > target:
        hi *= 2.0
        if hi > _MAX_NOISE_MULTIPLIER:
            raise ConfigError(
                f"target_epsilon={target:g} is too small: it needs a noise multiplier above "
                f"{_MAX_NOISE_MULTIPLIER:g} at sample_rate={q:g}, steps={n}, delta={d:g}"
            )
    lo = hi
    shrink = 0.9 if mechanism == "prv" else 0.5
    while eps(lo) <= target:
        if target - eps(lo) <= tol * target:
            return lo
        hi = lo
        lo *= shrink
        if lo < 1e-6:  # the budget is met by (almost) no noise at all
            return hi
    for _ in range(200):
        if target - eps(hi) <= tol * target or hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# --------------------------------------------------------------------------------------------
# State: one history
# --------------------------------------------------------------------------------------------


def _append(history: tuple[HistoryEntry, ...], entry: HistoryEntry) -> tuple[HistoryEntry, ...]:
    """Append ``entry``, merging it into the last entry when (sigma, q) are equal."""
    if entry[2] == 0:
        return history
    if history and history[-1][:2] == entry[:2]:
        last = history[-1]
        return history[:-1] + ((last[0], last[1], last[2] + entry[2]),)
    return history + (entry,)


def _history_from_plain(data: Any) -> tuple[HistoryEntry, ...]:
    if not isinstance(data, Sequence) or isinstance(data, str):
        raise ConfigError(f"a privacy history must be a list of [sigma, q, steps], got {data!r}")
    history: tuple[HistoryEntry, ...] = ()
    for item in data:
        if not isinstance(item, Sequence) or len(item) != 3:
            raise ConfigError(f"a history entry must be [sigma, q, steps], got {item!r}")
        history = _append(history, _entry(*item))
    return history


class PrivacyAccountant:
    """Tracks the steps of one protected dataset and reports the epsilon spent.

    The history is compressed: consecutive steps with the same (noise_multiplier, sample_rate)
    share one entry, so 10k identical steps cost one entry and one epsilon evaluation.

    Args:
        mechanism: ``"rdp"`` (Mironov 2017; Mironov, Talwar & Zhang 2019) or ``"prv"``
            (Gopi et al. 2021).

    Example:
        >>> acc = PrivacyAccountant("rdp")
        >>> for _ in range(3):
        ...     acc.step(noise_multiplier=1.0, sample_rate=0.01)
        >>> acc.history
        [(1.0, 0.01, 3)]
    """

    def __init__(self, mechanism: str = "rdp") -> None:
        self.mechanism = _check_mechanism(mechanism)
        self._history: tuple[HistoryEntry, ...] = ()

    @property
    def history(self) -> list[HistoryEntry]:
        """Compressed history, a list of ``(noise_multiplier, sample_rate, num_steps)``."""
        return list(self._history)

    @property
    def total_steps(self) -> int:
        """Number of steps recorded."""
        return sum(n for _, _, n in self._history)

    def __len__(self) -> int:
        return len(self._history)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: Noise std divided by the clip norm, > 0.
            sample_rate: Inclusion probability q of each record per step, in (0, 1].
            num_steps: Number of identical steps, >= 0 (0 records nothing).

        Raises:
            ConfigError: an argument out of range.
        """
        entry = _entry(noise_multiplier, sample_rate, num_steps)
        self._history = _append(self._history, entry)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at the given delta (cached per distinct history).

        Args:
            delta: Target delta in (0, 1).

        Returns:
            Epsilon; 0.0 before the first step.
        """
        return _epsilon_cached(self.mechanism, _canonical(self._history), _check_delta(delta))

    def epsilon_after(
        self, noise_multiplier: float, sample_rate: float, num_steps: int, delta: float
    ) -> float:
        """Epsilon the accountant would report after ``num_steps`` more steps; records nothing.

        Args:
            noise_multiplier: Noise multiplier of the planned steps, > 0.
            sample_rate: Sample rate of the planned steps, in (0, 1].
            num_steps: Number of planned steps, >= 0.
            delta: Target delta in (0, 1).

        Returns:
            The projected epsilon.
        """
        entry = _entry(noise_multiplier, sample_rate, num_steps)
        planned = _append(self._history, entry)
        return _epsilon_cached(self.mechanism, _canonical(planned), _check_delta(delta))

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints (JSON-serializable).

        Returns:
            ``{"mechanism": str, "history": [[sigma, q, steps], ...]}``.
        """
        return {"mechanism": self.mechanism, "history": [list(e) for e in self._history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`.

        Args:
            state: A mapping with keys ``mechanism`` and ``history``.

        Raises:
            ConfigError: malformed state.
        """
        try:
            mechanism, history = state["mechanism"], state["history"]
        except (KeyError, TypeError):
            raise ConfigError(
                "accountant state must have keys 'mechanism' and 'history'"
            ) from None
        self.mechanism = _check_mechanism(mechanism)
        self._history = _history_from_plain(history)

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant({self.mechanism!r}, steps={self.total_steps}, entries={len(self)})"
        )


def would_exceed(
    accountant: PrivacyAccountant,
    noise_multiplier: float,
    sample_rate: float,
    num_steps: int,
    *,
    target_epsilon: float,
    delta: float,
) -> bool:
    """Whether ``num_steps`` more steps would take the accountant above ``target_epsilon``.

    Args:
        accountant: The run's accountant; it is not modified.
        noise_multiplier: Noise multiplier of the planned steps.
        sample_rate: Sample rate of the planned steps.
        num_steps: Number of planned steps (e.g. one round's worth).
        target_epsilon: The privacy budget's epsilon.
        delta: The privacy budget's delta.

    Returns:
        True when the projected epsilon is above ``target_epsilon``.
    """
    target = _as_float("target_epsilon", target_epsilon)
    return accountant.epsilon_after(noise_multiplier, sample_rate, num_steps, delta) > target


def check_budget(
    accountant: PrivacyAccountant,
    noise_multiplier: float,
    sample_rate: float,
    num_steps: int,
    *,
    target_epsilon: float,
    delta: float,
) -> float:
    """Budget guard: call before a step (or round) and stop the run if it raises.

    Args:
        accountant: The run's accountant; it is not modified.
        noise_multiplier: Noise multiplier of the planned steps.
        sample_rate: Sample rate of the planned steps.
        num_steps: Number of planned steps.
        target_epsilon: The privacy budget's epsilon.
        delta: The privacy budget's delta.

    Returns:
        The projected epsilon after the planned steps, when it is within budget.

    Raises:
        BudgetExceeded: the planned steps would take epsilon above ``target_epsilon``.
    """
    target = _as_float("target_epsilon", target_epsilon)
    after = accountant.epsilon_after(noise_multiplier, sample_rate, num_steps, delta)
    if after > target:
        now = accountant.get_epsilon(delta)
        raise BudgetExceeded(
            f"privacy budget exhausted: {int(num_steps)} more step(s) at "
            f"noise_multiplier={float(noise_multiplier):g}, sample_rate={float(sample_rate):g} "
            f"would raise epsilon from {now:.4g} to {after:.4g}, above target_epsilon={target:g} "
            f"(delta={float(delta):g}, {accountant.mechanism} accountant, "
            f"{accountant.total_steps} steps so far)"
        )
    return after


# --------------------------------------------------------------------------------------------
# State: one history per client (example-level DP inside each client)
# --------------------------------------------------------------------------------------------


def _as_list(x: Any, name: str) -> list[Any]:
    """A Python list from a list, numpy array or torch tensor (any device)."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    raise ConfigError(f"{name} must be a sequence, array or tensor, got {type(x).__name__}")


def _broadcast(x: Any, n: int, name: str) -> list[Any]:
    if isinstance(x, numbers.Real) or (hasattr(x, "ndim") and x.ndim == 0):
        return [x.item() if hasattr(x, "item") else x] * n
    values = _as_list(x, name)
    if len(values) != n:
        raise ConfigError(f"{name} has {len(values)} values for {n} clients")
    return values


class ClientAccountants:
    """One privacy history per client, for example-level DP inside each client (DP-SGD).

    Client k samples each local batch with its own rate ``q_k = B / n_k`` and takes its own number
    of steps, so each client has its own epsilon. Histories are interned: clients with the same
    history point to one shared tuple, and epsilons are cached per distinct history, so 10k
    clients with a handful of distinct dataset sizes cost a handful of accountant evaluations.

    Args:
        mechanism: ``"rdp"`` or ``"prv"``.

    Example:
        >>> accs = ClientAccountants("rdp")
        >>> accs.step([0, 1, 2], sample_rates=[0.1, 0.1, 0.2], noise_multiplier=1.0, num_steps=10)
        >>> sorted(accs.epsilons(delta=1e-5))
        [0, 1, 2]
    """

    def __init__(self, mechanism: str = "rdp") -> None:
        self.mechanism = _check_mechanism(mechanism)
        self._histories: list[tuple[HistoryEntry, ...]] = [()]  # id -> history; 0 is empty
        self._history_ids: dict[tuple[HistoryEntry, ...], int] = {(): 0}
        self._transitions: dict[tuple[int, HistoryEntry], int] = {}
        self._client_history: dict[int, int] = {}  # client id -> history id

    def _intern(self, history: tuple[HistoryEntry, ...]) -> int:
        hid = self._history_ids.get(history)
        if hid is None:
            hid = len(self._histories)
            self._histories.append(history)
            self._history_ids[history] = hid
        return hid

    def __len__(self) -> int:
        return len(self._client_history)

    def __contains__(self, client_id: object) -> bool:
        return client_id in self._client_history

    @property
    def client_ids(self) -> list[int]:
        """Ids of the clients that have been stepped, sorted."""
        return sorted(self._client_history)

    def history(self, client_id: int) -> list[HistoryEntry]:
        """Compressed history of one client (empty if it never took a step)."""
        return list(self._histories[self._client_history.get(int(client_id), 0)])

    def step(
        self,
        client_ids: Any,
        sample_rates: Any,
        noise_multiplier: Any,
        num_steps: Any = 1,
    ) -> None:
        """Record local DP-SGD steps for a cohort of clients.

        Args:
            client_ids: Client ids, shape ``[N]`` (list, numpy array or tensor).
            sample_rates: ``q_k = B / n_k`` per client, shape ``[N]``, or one float for all.
                Use Python floats or float64: float32 rounds q (by ~1e-8, harmless) but makes
                those histories differ from float64 ones, so they no longer share a cache entry.
            noise_multiplier: Noise multiplier, one float or shape ``[N]``.
            num_steps: Local steps each client took, one int or shape ``[N]``.

        Raises:
            ConfigError: mismatched lengths, duplicate ids, or values out of range.
        """
        ids = [int(c) for c in _as_list(client_ids, "client_ids")]
        if len(set(ids)) != len(ids):
            raise ConfigError("client_ids contains duplicates")
        n = len(ids)
        qs = _broadcast(sample_rates, n, "sample_rates")
        sigmas = _broadcast(noise_multiplier, n, "noise_multiplier")
        steps = _broadcast(num_steps, n, "num_steps")
        # validate everything before changing any state
        entries = [_entry(s, q, t) for s, q, t in zip(sigmas, qs, steps)]
        for cid, entry in zip(ids, entries):
            old = self._client_history.get(cid, 0)
            key = (old, entry)
            new = self._transitions.get(key)
            if new is None:
                new = self._intern(_append(self._histories[old], entry))
                self._transitions[key] = new
            self._client_history[cid] = new

    def _epsilon_of(self, hid: int, delta: float) -> float:
        return _epsilon_cached(self.mechanism, _canonical(self._histories[hid]), delta)

    def epsilon(self, client_id: int, delta: float) -> float:
        """Epsilon spent by one client (0.0 if it never took a step)."""
        return self._epsilon_of(self._client_history.get(int(client_id), 0), _check_delta(delta))

    def epsilons(self, delta: float, client_ids: Any = None) -> dict[int, float]:
        """Per-client epsilon, computed once per distinct history.

        Args:
            delta: Target delta in (0, 1), usually ``1 / n_k`` or smaller for every client.
            client_ids: Clients to report; default all clients that have taken a step.

        Returns:
            ``{client_id: epsilon}``.
        """
        d = _check_delta(delta)
        if client_ids is None:
            ids = self.client_ids
        else:
            ids = [int(c) for c in _as_list(client_ids, "client_ids")]
        per_history: dict[int, float] = {}
        out: dict[int, float] = {}
        for cid in ids:
            hid = self._client_history.get(cid, 0)
            if hid not in per_history:
                per_history[hid] = self._epsilon_of(hid, d)
            out[cid] = per_history[hid]
        return out

    def summary(self, delta: float) -> dict[str, float]:
        """Min, median and max epsilon over the clients that have taken a step.

        Args:
            delta: Target delta in (0, 1).

        Returns:
            ``{"eps_min", "eps_median", "eps_max"}`` (all 0.0 before any step), ready to merge
            into a round's metrics.
        """
        values = list(self.epsilons(delta).values())
        if not values:
            return {"eps_min": 0.0, "eps_median": 0.0, "eps_max": 0.0}
        return {
            "eps_min": float(min(values)),
            "eps_median": float(np.median(values)),
            "eps_max": float(max(values)),
        }

    def would_exceed(
        self,
        client_ids: Any,
        sample_rates: Any,
        noise_multiplier: Any,
        num_steps: Any,
        *,
        target_epsilon: float,
        delta: float,
    ) -> list[int]:
        """Clients whose planned steps would take them above ``target_epsilon``; records nothing.

        The engine can drop these clients from the round, or stop the run when any appears.

        Args:
            client_ids: Planned cohort, shape ``[N]``.
            sample_rates: ``q_k`` per client, shape ``[N]``, or one float.
            noise_multiplier: One float or shape ``[N]``.
            num_steps: One int or shape ``[N]``.
            target_epsilon: The per-client budget.
            delta: Target delta in (0, 1).

        Returns:
            Ids of the clients that would exceed the budget, in input order.
        """
        target = _as_float("target_epsilon", target_epsilon)
        d = _check_delta(delta)
        ids = [int(c) for c in _as_list(client_ids, "client_ids")]
        n = len(ids)
        qs = _broadcast(sample_rates, n, "sample_rates")
        sigmas = _broadcast(noise_multiplier, n, "noise_multiplier")
        steps = _broadcast(num_steps, n, "num_steps")
        over = []
        for cid, s, q, t in zip(ids, sigmas, qs, steps):
            planned = _append(self._histories[self._client_history.get(cid, 0)], _entry(s, q, t))
            if _epsilon_cached(self.mechanism, _canonical(planned), d) > target:
                over.append(cid)
        return over

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints (JSON-serializable, distinct histories stored once).

        Returns:
            ``{"mechanism", "histories": [[[sigma, q, steps], ...], ...],
            "client_ids": [...], "history_index": [...]}``.
        """
        used = sorted(set(self._client_history.values()))
        remap = {hid: i for i, hid in enumerate(used)}
        ids = self.client_ids
        return {
            "mechanism": self.mechanism,
            "histories": [[list(e) for e in self._histories[hid]] for hid in used],
            "client_ids": ids,
            "history_index": [remap[self._client_history[c]] for c in ids],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict`.

        Raises:
            ConfigError: malformed state.
        """
        try:
            mechanism = state["mechanism"]
            histories = state["histories"]
            ids = state["client_ids"]
            index = state["history_index"]
        except (KeyError, TypeError):
            raise ConfigError(
                "client accountant state must have keys 'mechanism', 'histories', "
                "'client_ids' and 'history_index'"
            ) from None
        if len(ids) != len(index):
            raise ConfigError(
                "client accountant state: client_ids and history_index differ in length"
            )
        fresh = ClientAccountants(mechanism)
        hids = [fresh._intern(_history_from_plain(h)) for h in histories]
        for cid, i in zip(ids, index):
            if not 0 <= int(i) < len(hids):
                raise ConfigError(f"client accountant state: history_index {i} out of range")
            fresh._client_history[int(cid)] = hids[int(i)]
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        return (
            f"ClientAccountants({self.mechanism!r}, clients={len(self)}, "
            f"distinct_histories={len(set(self._client_history.values()))})"
        )
