"""Differential privacy as round stages: example level (DP-SGD), user level (DP-FedAvg), local DP.

* ``example``: every client runs DP-SGD (Abadi et al. 2016) with Poisson batches
  (:class:`~spfl_vmap.modules.dpsgd.DPSGDTrainer`); one accountant per client with its own
  ``q_k = B / n_k`` and step count.
* ``user``: DP-FedAvg (McMahan et al. 2018): Poisson client sampling with ``q = per_round /
  total`` (:class:`PoissonSampler`), each update clipped to S, the sum noised with ``z S`` and
  divided by the expected cohort ``q * total`` (:class:`DPFedAvg`); one global accountant.
* ``local``: each client clips its update to S and adds ``N(0, z^2 S^2)`` itself
  (:class:`LocalDP`); one accountant per client (a Gaussian mechanism per participation, no
  amplification).

:class:`PrivacyAccounting` is the guard (budget stop), the accounting after each round and the
evaluation hook that reports epsilon; it writes ``privacy.jsonl`` and, with
``--dp_epsilon_json``, ``epsilons.json``.

``--target_epsilon`` without ``--dp_sigma`` calibrates the noise multiplier before training for
the worst case: at example level, the smallest client (largest ``q_k``) participating in every
round; at local level, a client participating in every round. With both given, sigma is used as
is and the run stops before a round that would take any accountant past ``--target_epsilon``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch

from ..config import SECTIONS, Config, need
from ..distributed import Sharding
from ..errors import ConfigError
from ..privacy import (
    ClientAccountants,
    PrivacyAccountant,
    adaptive_clip_noise_multiplier,
    adaptive_clip_update,
    calibrate_noise_multiplier,
    check_delta,
)
from ..privacy.dpsgd import sample_rates, steps_per_client
from ..rng import generator
from ..stages import Aggregation, BuildEnv, ClientSampler, EvalHook, Guard, Metrics, RoundContext, Stage, UpdateStage
from spfl_kernels import clip_rows, clip_scale_noise_reduce

DP_MODES = ("none", "example", "user", "local")
ADAPTIVE_COUNT_NOISE_DIVISOR = 20.0  # Andrew et al. 2021: sigma_b = expected cohort / 20


# ---- the config section -----------------------------------------------------------------------
def dp_mode(cfg: Config) -> str:
    """The DP level in force: ``--dp_mode``, or ``example`` for the toolkit's ``--differential_privacy``."""
    if cfg.dp_mode == "none" and cfg.differential_privacy:
        return "example"
    return cfg.dp_mode


@SECTIONS.register("privacy")
def validate(cfg: Config) -> None:
    need(cfg.dp_mode in DP_MODES, f"--dp_mode must be one of {DP_MODES}, got {cfg.dp_mode!r}")
    need(cfg.accountant in ("rdp", "prv"), f"--accountant must be rdp or prv, got {cfg.accountant!r}")
    mode = dp_mode(cfg)
    if mode == "none":
        given = [flag for flag, on in (
            ("--dp_sigma", cfg.dp_sigma is not None), ("--target_epsilon", cfg.target_epsilon is not None),
            ("--dp_delta", cfg.dp_delta is not None), ("--dp_adaptive_clip", cfg.dp_adaptive_clip),
            ("--dp_epsilon_json", cfg.dp_epsilon_json), ("--grad_norm", cfg.grad_norm != 1.0),
        ) if on]
        need(not given, f"{', '.join(given)} given without a DP mode, so nothing would be private: add --dp_mode "
                        f"example|user|local (the toolkit's --differential_privacy means example), or drop {given[0] if given else ''}")
        return
    if cfg.dp_sigma is not None:
        need(math.isfinite(cfg.dp_sigma) and cfg.dp_sigma > 0, f"--dp_sigma must be > 0 (sigma 0 gives epsilon = inf), got {cfg.dp_sigma}")
    need(cfg.grad_norm > 0, f"--grad_norm must be > 0, got {cfg.grad_norm}")
    if cfg.dp_delta is not None:
        need(0 < cfg.dp_delta < 1, f"--dp_delta must be in (0, 1), got {cfg.dp_delta}")
    if cfg.target_epsilon is not None:
        need(math.isfinite(cfg.target_epsilon) and cfg.target_epsilon > 0, "--target_epsilon must be > 0")
    need(0 < cfg.dp_clip_quantile < 1 and cfg.dp_clip_lr > 0, "--dp_clip_quantile must be in (0, 1) and --dp_clip_lr > 0")
    need(not (cfg.dp_adaptive_clip and mode != "user"), "--dp_adaptive_clip applies to --dp_mode user only")
    need(not cfg.use_gradient or mode != "example", "--dp_mode example trains with DP-SGD; it cannot be combined with --use_gradient")
    need(cfg.engine == "vmap" or mode != "example", "--dp_mode example needs --engine vmap (DP-SGD is vectorized)")
    if cfg.dp_adaptive_clip and (cfg.dp_sigma is not None or cfg.target_epsilon is None):
        check_adaptive_clip_budget(cfg.dp_sigma if cfg.dp_sigma is not None else 1.0, cfg.client_num_per_round)


def check_adaptive_clip_budget(noise_multiplier: float, per_round: int) -> None:
    """Adaptive clipping releases the unclipped count with ``sigma_b = per_round / 20``; by Andrew
    et al. 2021, Theorem 1, the updates keep a budget only if ``sigma_b > z / 2``."""
    sigma_b = per_round / ADAPTIVE_COUNT_NOISE_DIVISOR
    if sigma_b <= noise_multiplier / 2:
        least = math.floor(ADAPTIVE_COUNT_NOISE_DIVISOR * noise_multiplier / 2) + 1
        raise ConfigError(
            f"--dp_adaptive_clip with {per_round} clients per round: the count noise sigma_b = {per_round}/20 = {sigma_b:g} "
            f"must exceed z/2 = {noise_multiplier / 2:g} (Andrew et al. 2021), else no budget is left for the updates; "
            f"use at least {least} clients per round or a smaller noise multiplier")


# ---- stages -------------------------------------------------------------------------------------
class PoissonSampler(ClientSampler):
    """DP-FedAvg's client sampling: each client joins independently with ``q = per_round / total``
    (McMahan et al. 2018), so the cohort size varies; seeded by ``(seed, "sample", round)``."""

    def __init__(self, total: int, per_round: int, seed: int) -> None:
        self.total, self.per_round, self.seed = total, per_round, seed

    def sample(self, round_idx: int) -> list[int]:
        keep = torch.rand(self.total, generator=generator(self.seed, "sample", round_idx)) < self.per_round / self.total
        return torch.nonzero(keep).flatten().tolist()


class PrivacyAccounting(Guard, EvalHook):
    """Accountants, sigma calibration, the budget guard and the epsilon log of every DP level."""

    name = "privacy"
    log_file = "privacy.jsonl"

    def __init__(self, cfg: Config, counts: list[int], n_train: int) -> None:
        self.cfg = cfg
        self.mode = dp_mode(cfg)
        self.counts = counts
        self.sigma = cfg.dp_sigma if cfg.dp_sigma is not None else 1.0  # the accounted multiplier z
        self.rows: list[dict[str, Any]] = []
        n = cfg.client_num_in_total if self.mode == "user" else n_train
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.delta = check_delta(cfg.dp_delta, n) if cfg.dp_delta is not None else 1.0 / n
        self.delta_warning = str(caught[0].message) if caught else None
        self.accountant: Any = PrivacyAccountant(cfg.accountant) if self.mode == "user" else ClientAccountants(cfg.accountant)
        if cfg.target_epsilon is not None and cfg.dp_sigma is None:
            q, steps = self.worst_case()
            self.sigma = calibrate_noise_multiplier(cfg.target_epsilon, q, steps, self.delta, accountant=cfg.accountant)

    def worst_case(self) -> tuple[float, int]:
        """(sample rate, steps) of the accountant that spends most over the whole run."""
        c = self.cfg
        if self.mode == "user":
            return c.client_num_per_round / c.client_num_in_total, c.comm_round
        if self.mode == "local":
            return 1.0, c.comm_round
        n_min = min(self.counts)
        return sample_rates([n_min], c.batch_size)[0], c.comm_round * steps_per_client([n_min], c.batch_size, c.epochs)[0]

    def _client_steps(self, counts: list[int]) -> tuple[list[float], list[int] | int]:
        if self.mode == "local":
            return [1.0] * len(counts), 1
        return sample_rates(counts, self.cfg.batch_size), steps_per_client(counts, self.cfg.batch_size, self.cfg.epochs)

    def before_round(self, ctx: RoundContext) -> tuple[Optional[str], Metrics]:
        """Budget guard: a reason to stop when this round would exceed ``--target_epsilon``."""
        target = self.cfg.target_epsilon
        if target is None:
            return None, {}
        if self.mode == "user":
            q = self.cfg.client_num_per_round / self.cfg.client_num_in_total
            over = self.accountant.epsilon_after(self.sigma, q, 1, self.delta) > target * (1 + 1e-9)
        else:
            if not ctx.client_ids:
                return None, {}
            rates, steps = self._client_steps(ctx.counts)
            over = bool(self.accountant.would_exceed(ctx.client_ids, rates, self.sigma, steps, target_epsilon=target * (1 + 1e-9), delta=self.delta))
        if over:
            return f"privacy budget: the next round would exceed target epsilon {target} (delta {self.delta:g})", {}
        return None, {}

    def after_round(self, ctx: RoundContext) -> tuple[None, Metrics]:
        """Record what the round released."""
        if self.mode == "user":
            self.accountant.step(self.sigma, self.cfg.client_num_per_round / self.cfg.client_num_in_total, 1)
        elif ctx.client_ids:
            rates, steps = self._client_steps(ctx.counts)
            self.accountant.step(ctx.client_ids, rates, self.sigma, steps)
        return None, {}

    def evaluate(self, ctx: RoundContext, model: Any, params: Any) -> tuple[None, Metrics]:
        """Epsilon now (one accountant query per evaluated round)."""
        if self.mode == "user":
            eps = self.accountant.get_epsilon(self.delta)
            self.rows.append({"round": ctx.round, "delta": self.delta, "epsilon": eps})
            return None, {"epsilon": eps}
        eps = self.accountant.epsilons(self.delta)
        vals = sorted(eps.values())
        summary = {"eps_min": vals[0], "eps_median": vals[len(vals) // 2], "eps_max": vals[-1]} if vals else {"eps_max": 0.0}
        self.rows.append({"round": ctx.round, "delta": self.delta, **summary, "epsilons": {str(k): v for k, v in eps.items()}})
        return None, summary

    def log_row(self) -> Optional[dict[str, Any]]:
        return self.rows[-1] if self.rows else None

    def load_log(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def final_files(self) -> dict[str, Any]:
        if self.cfg.dp_epsilon_json and self.rows and "epsilons" in self.rows[-1]:
            return {"epsilons.json": self.rows[-1]["epsilons"]}
        return {}

    def describe(self) -> dict[str, Any]:
        d = {"mode": self.mode, "noise_multiplier": self.sigma, "clip": self.cfg.grad_norm, "delta": self.delta,
             "accountant": self.cfg.accountant, "target_epsilon": self.cfg.target_epsilon}
        if self.delta_warning:
            d["warning"] = self.delta_warning
        return {"privacy": d}

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self.accountant.state_dict(), "sigma": self.sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.sigma = float(state["sigma"])


class LocalDP(UpdateStage):
    """Round step 7, local DP: clip each row to S, add ``N(0, (z S)^2)`` per coordinate."""

    name = "local_dp"

    def __init__(self, cfg: Config, accounting: PrivacyAccounting) -> None:
        self.clip, self.accounting = cfg.grad_norm, accounting

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if U.shape[0] == 0:
            return U, {}
        clipped, norms = clip_rows(U, self.clip)
        noise = torch.randn(U.shape, generator=ctx.generator("local-dp", device=U.device), device=U.device, dtype=U.dtype)
        return clipped + self.accounting.sigma * self.clip * noise, {"dp_clipped_frac": float((norms > self.clip).float().mean())}


class DPFedAvg(Aggregation):
    """Round step 8 at user level: ``(sum_k clip_S(U_k) + N(0, z_D^2 S^2)) / (q K)`` (McMahan et al. 2018).

    Rows with NaN/Inf are excluded before the fused clip, noise and sum (a NaN norm would make
    the clip factor NaN). With adaptive clipping (Andrew et al. 2021, Algorithm 1 and Theorem 1)
    the server also releases the unclipped count noised with ``sigma_b = qK / 20``; the updates
    are then noised at ``z_D = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` so that both releases together
    cost what the accountant charges for ``z``. Without it ``z_D = z``.

    Under torchrun, with :attr:`sharding` set by the builder, ``apply`` gets this rank's rows and
    reduces per-rank clipped sums (:meth:`sharded_apply`); the noise is added once, after.
    """

    name = "dp_fedavg"
    sums_rows = True  # a clipped sum: ranks reduce partial sums instead of gathering U
    sharded_path = "all_reduce of per-process clipped sums, the noise added once"
    sharding: Optional[Sharding] = None

    def __init__(self, cfg: Config, accounting: PrivacyAccounting) -> None:
        self.cfg, self.accounting = cfg, accounting
        self.clip = cfg.grad_norm
        self.expected = float(cfg.client_num_per_round)  # q * K
        self.count_noise_std = self.expected / ADAPTIVE_COUNT_NOISE_DIVISOR if cfg.dp_adaptive_clip else None
        if cfg.dp_adaptive_clip:  # sigma may have been calibrated to --target_epsilon after validation
            check_adaptive_clip_budget(accounting.sigma, cfg.client_num_per_round)

    @property
    def update_noise_multiplier(self) -> float:
        z = self.accounting.sigma
        if self.count_noise_std is None:
            return z
        return adaptive_clip_noise_multiplier(z, self.count_noise_std)

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        if self.sharding is not None:
            return self.sharded_apply(ctx, U)
        finite = torch.isfinite(U).all(dim=1)  # (N,) a NaN/Inf row would poison the clipped sum
        excluded = int((~finite).sum())
        if excluded:
            U = U[finite]
        N = U.shape[0]
        noise_std = self.update_noise_multiplier * self.clip / self.expected
        seed = ctx.seed_for("dp-fedavg")
        if N == 0:  # nobody sampled: the release is noise alone
            g = generator(seed, device=U.device)
            return noise_std * torch.randn(U.shape[1], generator=g, device=U.device), {"dp_cohort": 0, "nonfinite_excluded": excluded}
        weights = torch.full((N,), 1.0 / self.expected, device=U.device)
        agg, norms = clip_scale_noise_reduce(U, self.clip, weights, noise_std, seed)
        m: Metrics = {"dp_cohort": N, "dp_clip": self.clip, "dp_clipped_frac": float((norms > self.clip).float().mean())}
        if excluded:
            m["nonfinite_excluded"] = excluded
        if self.count_noise_std is not None:
            self._adapt_clip(ctx, norms)
        return agg, m

    def sharded_apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """:meth:`apply` from this rank's rows ``U (n_r, D)`` of the cohort.

        Each rank clips and sums its own finite rows (the fused kernel with no noise), one
        ``all_reduce`` adds the ``(D,)`` partial sums, and the noise ``z_D S / (q K) N(0, I)``,
        seeded by ``(seed, "dp-fedavg", round)``, is added once to the total: the kernel called on
        a single zero row draws exactly the noise term of the one-process call. The row norms
        (``(N,)``, for the metrics and adaptive clipping) and the finite flags are gathered.
        Equal to the one-process release up to the order of the additions.
        """
        sh, N, D = self.sharding, ctx.num_clients, ctx.spec.dim
        rows = sh.rows(ctx.client_ids)
        mine_finite = torch.isfinite(U).all(dim=1)  # (n_r,)
        finite = sh.gather_rows(mine_finite.to(torch.uint8), rows).bool() if N else mine_finite  # (N,)
        n_kept = int(finite.sum())
        excluded = N - n_kept
        noise_std = self.update_noise_multiplier * self.clip / self.expected
        seed = ctx.seed_for("dp-fedavg")
        if n_kept == 0:  # nobody sampled: the release is noise alone
            g = generator(seed, device=U.device)
            return noise_std * torch.randn(D, generator=g, device=U.device), {"dp_cohort": 0, "nonfinite_excluded": excluded}
        Uk = U if bool(mine_finite.all()) else U[mine_finite]  # (n_kept_r, D), no copy when all are finite
        partial = torch.zeros(D, device=U.device)
        mine_norms = torch.full((U.shape[0],), math.nan, device=U.device)  # (n_r,)
        if Uk.shape[0]:
            weights = torch.full((Uk.shape[0],), 1.0 / self.expected, device=U.device)
            partial, mine_norms[mine_finite] = clip_scale_noise_reduce(Uk, self.clip, weights, 0.0, seed)
        noise, _ = clip_scale_noise_reduce(torch.zeros(1, D, device=U.device), math.inf, torch.zeros(1, device=U.device), noise_std, seed)
        agg = sh.sum(partial) + noise  # (D,)
        norms = sh.gather_rows(mine_norms, rows)[finite]  # (n_kept,) in cohort order
        m: Metrics = {"dp_cohort": n_kept, "dp_clip": self.clip, "dp_clipped_frac": float((norms > self.clip).float().mean())}
        if excluded:
            m["nonfinite_excluded"] = excluded
        if self.count_noise_std is not None:
            self._adapt_clip(ctx, norms)
        return agg, m

    def _adapt_clip(self, ctx: RoundContext, norms: torch.Tensor) -> None:
        """``C <- C exp(-eta (b~ - gamma))``, ``b~`` the noised fraction of unclipped updates."""
        g = ctx.generator("adaptive-clip")
        noisy = (float((norms <= self.clip).sum()) + self.count_noise_std * float(torch.randn((), generator=g))) / self.expected
        self.clip = float(adaptive_clip_update(self.clip, noisy, self.cfg.dp_clip_quantile, self.cfg.dp_clip_lr))

    def describe(self) -> dict[str, Any]:
        if self.count_noise_std is None:
            return {}
        return {"adaptive_clip": {"count_noise_std": self.count_noise_std, "update_noise_multiplier": self.update_noise_multiplier,
                                  "accounted_noise_multiplier": self.accounting.sigma}}

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state["clip"])


def stages(cfg: Config, env: BuildEnv) -> list[Stage]:
    """The module's stages for ``cfg`` (none when DP is off). Example level also replaces the
    trainer: see :func:`spfl_vmap.builder.build`."""
    mode = dp_mode(cfg)
    if mode == "none":
        return []
    acc = PrivacyAccounting(cfg, env.counts, env.n_train)
    if mode == "user":
        return [acc, PoissonSampler(cfg.client_num_in_total, cfg.client_num_per_round, cfg.seed), DPFedAvg(cfg, acc)]
    if mode == "local":
        return [acc, LocalDP(cfg, acc)]
    return [acc]
