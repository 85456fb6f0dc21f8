"""The round's module stages, kept out of the round loop so that it reads as numbered steps.

``ByzantineStage``: which clients are malicious, their attack on ``U``, robust aggregation.
``PrivacyStage``: client sampling rule, local DP, DP-FedAvg's clipped noisy sum, accounting,
the budget guard and the epsilon log.

Every stage returns ``(result, metrics)``; metrics are merged into the round's log line.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable

import torch

from ..config import Config
from ..rng import derive_seed, generator

MAX_LISTED = 100  # index lists longer than this are logged as counts only


class ByzantineStage:
    """Malicious clients, attacks on the update matrix, and robust aggregation (issue 5).

    Malicious clients are a fixed set of client ids drawn from ``(seed, "byzantine")``
    (``--by_mode fixed``), so they are sampled into cohorts like anyone else; or, as in the
    original toolkit, exactly ``--by_workers`` of every cohort (``--by_mode per_round``).
    """

    def __init__(self, cfg: Config, num_classes: int) -> None:
        from ..attacks import data_poison

        self.cfg = cfg
        nb = cfg.num_byzantine
        K = cfg.client_num_in_total
        ids = torch.randperm(K, generator=generator(cfg.seed, "byzantine"))[:nb] if cfg.by_mode == "fixed" else torch.empty(0)
        self.malicious_ids = torch.zeros(K, dtype=torch.bool)
        self.malicious_ids[ids.long()] = True
        poison = data_poison(cfg.by_attack)
        self.label_poison: Callable[[torch.Tensor], torch.Tensor] | None = (
            (lambda y: poison(y, num_classes)) if poison is not None else None
        )
        self.attack_kwargs = cfg.attack_kwargs()
        self.defense_kwargs = cfg.defense_kwargs()
        self.f = cfg.assumed_f

    @property
    def poisons_data(self) -> bool:
        return self.label_poison is not None

    def describe(self) -> dict[str, Any]:
        if not self.cfg.byzantine_on:
            return {}
        return {"byzantine": {"attack": self.cfg.by_attack, "defense": self.cfg.by_defense, "f": self.f,
                              "malicious_clients": int(self.malicious_ids.sum()) if self.cfg.by_mode == "fixed" else self.cfg.num_byzantine,
                              "mode": self.cfg.by_mode, "knowledge": "omniscient" if self.cfg.all_grads else "partial"}}

    def malicious_mask(self, ids: list[int], round_idx: int) -> torch.Tensor:
        """``[N]`` bool over the cohort."""
        if self.cfg.by_mode == "per_round":
            mask = torch.zeros(len(ids), dtype=torch.bool)
            pick = torch.randperm(len(ids), generator=generator(self.cfg.seed, "byzantine", round_idx))[: self.cfg.num_byzantine]
            mask[pick] = True
            return mask
        return self.malicious_ids[torch.tensor(ids, dtype=torch.long)] if ids else torch.zeros(0, dtype=torch.bool)

    def attack(self, U: torch.Tensor, malicious: torch.Tensor, weights: torch.Tensor, round_idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Step 6: rewrite the malicious rows of ``U [N, D]``."""
        from ..attacks import attack

        n_mal = int(malicious.sum())
        if self.cfg.by_attack == "none" or n_mal == 0:
            return U, ({"malicious": n_mal} if self.cfg.byzantine_on else {})
        U2, m = attack(
            self.cfg.by_attack, U, malicious.to(U.device), weights=weights,
            generator=generator(self.cfg.seed, "attack", round_idx, device=U.device),
            knowledge="omniscient" if self.cfg.all_grads else "partial", f=self.f,
            aggregator=self.cfg.by_defense, **self.attack_kwargs,
        )
        return U2, {"malicious": n_mal, **{f"attack_{k}": v for k, v in m.items() if isinstance(v, (int, float, str, bool))}}

    def aggregate(self, U: torch.Tensor, weights: torch.Tensor, malicious: torch.Tensor, state: dict, round_idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Step 8: the registered aggregator; a NaN/Inf row never reaches the model."""
        from ..aggregators import aggregate

        if U.shape[0] == 0:
            return torch.zeros(U.shape[1], device=U.device), {"round_rejected": True}
        agg, m = aggregate(
            self.cfg.by_defense, U, weights, f=min(self.f, U.shape[0] - 1), state=state,
            generator=generator(self.cfg.seed, "aggregator", round_idx, device=U.device), **self.defense_kwargs,
        )
        out: dict[str, Any] = {}
        if m.get("round_rejected"):
            out["round_rejected"] = True
        if m.get("nonfinite_excluded"):
            out["nonfinite_excluded"] = len(m["nonfinite_excluded"])
        if "selected" in m:
            sel = m["selected"]
            out["selected"] = len(sel)
            out["malicious_selected"] = int(malicious[torch.tensor(sel, dtype=torch.long)].sum()) if sel else 0
            if len(sel) <= MAX_LISTED:
                out["selected_ids"] = sel
        if self.cfg.byzantine_on:
            for k, v in m.items():
                if k not in out and k not in ("selected", "flagged", "scores", "nonfinite_excluded", "round_rejected") and isinstance(v, (int, float, bool)):
                    out[f"agg_{k}"] = v
            if "flagged" in m:
                out["flagged"] = len(m["flagged"])
        return agg, out


class PrivacyStage:
    """Differential privacy (issue 6): example level (DP-SGD), user level (DP-FedAvg), local DP.

    * ``example``: every client runs DP-SGD (Abadi et al. 2016) with Poisson batches; one
      accountant per client with its own ``q_k = B / n_k`` and step count.
    * ``user``: DP-FedAvg (McMahan et al. 2018): Poisson client sampling with
      ``q = per_round / total``, each update clipped to S, the sum noised with ``sigma * S`` and
      divided by the expected cohort ``q * total``; one global accountant.
    * ``local``: each client clips its update to S and adds ``N(0, sigma^2 S^2)`` itself; one
      accountant per client (a Gaussian mechanism per participation, no amplification).

    ``--target_epsilon`` without ``--dp_sigma`` calibrates sigma before training for the worst
    case: at example level, the smallest client (largest ``q_k``) participating in every round;
    at local level, a client participating in every round. With both given, sigma is used as is
    and the run stops before a round that would take any accountant past ``--target_epsilon``.
    """

    def __init__(self, cfg: Config, counts: list[int], n_train: int) -> None:
        self.cfg = cfg
        self.mode = cfg.effective_dp_mode
        self.counts = counts
        self.stop_reason: str | None = None
        self.sigma = cfg.dp_sigma if cfg.dp_sigma is not None else 1.0
        self.clip = cfg.grad_norm
        self.rows: list[dict[str, Any]] = []
        if self.mode == "none":
            return
        from ..privacy import ClientAccountants, PrivacyAccountant, calibrate_noise_multiplier, check_delta

        n = cfg.client_num_in_total if self.mode == "user" else n_train
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.delta = check_delta(cfg.dp_delta, n) if cfg.dp_delta is not None else 1.0 / n
        self.delta_warning = str(caught[0].message) if caught else None
        if self.mode == "user":
            self.accountant: Any = PrivacyAccountant(cfg.accountant)
        else:
            self.accountant = ClientAccountants(cfg.accountant)
        if cfg.target_epsilon is not None and cfg.dp_sigma is None:
            q, steps = self.worst_case()
            self.sigma = calibrate_noise_multiplier(cfg.target_epsilon, q, steps, self.delta, accountant=cfg.accountant)

    # ---- setup ------------------------------------------------------------------------------
    def worst_case(self) -> tuple[float, int]:
        """(sample rate, steps) of the accountant that spends most over the whole run."""
        c = self.cfg
        if self.mode == "user":
            return c.client_num_per_round / c.client_num_in_total, c.comm_round
        if self.mode == "local":
            return 1.0, c.comm_round
        from ..privacy.dpsgd import sample_rates, steps_per_client

        n_min = min(self.counts)
        return sample_rates([n_min], c.batch_size)[0], c.comm_round * steps_per_client([n_min], c.batch_size, c.epochs)[0]

    def trainer_config(self, cfg: Config) -> Config:
        return dataclasses.replace(cfg, dp_sigma=self.sigma)

    @property
    def poisson_clients(self) -> bool:
        return self.mode == "user"

    def describe(self) -> dict[str, Any]:
        if self.mode == "none":
            return {}
        d = {"privacy": {"mode": self.mode, "noise_multiplier": self.sigma, "clip": self.clip, "delta": self.delta,
                         "accountant": self.cfg.accountant, "target_epsilon": self.cfg.target_epsilon}}
        if self.delta_warning:
            d["privacy"]["warning"] = self.delta_warning
        return d

    # ---- per round ----------------------------------------------------------------------------
    def _client_steps(self, ids: list[int], counts: list[int]) -> tuple[list[float], list[int] | int]:
        if self.mode == "local":
            return [1.0] * len(ids), 1
        from ..privacy.dpsgd import sample_rates, steps_per_client

        return sample_rates(counts, self.cfg.batch_size), steps_per_client(counts, self.cfg.batch_size, self.cfg.epochs)

    def may_train(self, ids: list[int], counts: list[int]) -> bool:
        """Budget guard: False (and a reason) when this round would exceed --target_epsilon."""
        target = self.cfg.target_epsilon
        if self.mode == "none" or target is None:
            return True
        if self.mode == "user":
            q = self.cfg.client_num_per_round / self.cfg.client_num_in_total
            eps = self.accountant.epsilon_after(self.sigma, q, 1, self.delta)
            over = eps > target * (1 + 1e-9)
        else:
            if not ids:
                return True
            rates, steps = self._client_steps(ids, counts)
            over = bool(self.accountant.would_exceed(ids, rates, self.sigma, steps, target_epsilon=target * (1 + 1e-9), delta=self.delta))
        if over:
            self.stop_reason = f"privacy budget: the next round would exceed target epsilon {target} (delta {self.delta:g})"
        return not over

    def client_side(self, U: torch.Tensor, ids: list[int], round_idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Step 7, local DP: clip each row to S, add N(0, (sigma S)^2) per coordinate."""
        if self.mode != "local" or U.shape[0] == 0:
            return U, {}
        from spfl_kernels import clip_rows

        clipped, norms = clip_rows(U, self.clip)
        g = generator(self.cfg.seed, "local-dp", round_idx, device=U.device)
        noise = torch.randn(U.shape, generator=g, device=U.device, dtype=U.dtype)
        return clipped + self.sigma * self.clip * noise, {"dp_clipped_frac": float((norms > self.clip).float().mean())}

    def dp_fedavg(self, U: torch.Tensor, round_idx: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Step 8 at user level: ``(sum_k clip_S(U_k) + N(0, sigma^2 S^2)) / (q K)`` (McMahan et al. 2018)."""
        from spfl_kernels import clip_scale_noise_reduce

        expected = float(self.cfg.client_num_per_round)  # q * K
        finite = torch.isfinite(U).all(dim=1)  # (N,) a NaN/Inf row would poison the clipped sum
        excluded = int((~finite).sum())
        if excluded:
            U = U[finite]
        N = U.shape[0]
        weights = torch.full((N,), 1.0 / expected, device=U.device)
        noise_std = self.sigma * self.clip / expected
        seed = derive_seed(self.cfg.seed, "dp-fedavg", round_idx)
        if N == 0:  # nobody sampled: the release is noise alone
            g = generator(seed, device=U.device)
            return noise_std * torch.randn(U.shape[1], generator=g, device=U.device), {"dp_cohort": 0, "nonfinite_excluded": excluded}
        agg, norms = clip_scale_noise_reduce(U, self.clip, weights, noise_std, seed)
        m = {"dp_cohort": N, "dp_clip": self.clip, "dp_clipped_frac": float((norms > self.clip).float().mean())}
        if excluded:
            m["nonfinite_excluded"] = excluded
        if self.cfg.dp_adaptive_clip:
            self._adapt_clip(norms, round_idx)
        return agg, m

    def _adapt_clip(self, norms: torch.Tensor, round_idx: int) -> None:
        """Andrew et al. 2021: C <- C exp(-eta (b~ - gamma)), b~ a noisy fraction of unclipped updates."""
        from ..privacy import adaptive_clip_update

        expected = float(self.cfg.client_num_per_round)
        sigma_b = expected / 20.0  # the paper's default count-noise scale
        g = generator(self.cfg.seed, "adaptive-clip", round_idx)
        noisy = (float((norms <= self.clip).sum()) + sigma_b * float(torch.randn((), generator=g))) / expected
        self.clip = float(adaptive_clip_update(self.clip, noisy, self.cfg.dp_clip_quantile, self.cfg.dp_clip_lr))

    def account(self, ids: list[int], counts: list[int], round_idx: int) -> None:
        """Step 10: record what the round released."""
        if self.mode == "none":
            return
        if self.mode == "user":
            self.accountant.step(self.sigma, self.cfg.client_num_per_round / self.cfg.client_num_in_total, 1)
        elif ids:
            rates, steps = self._client_steps(ids, counts)
            self.accountant.step(ids, rates, self.sigma, steps)

    def report(self, round_idx: int) -> dict[str, Any]:
        """Epsilon now (computed at evaluation rounds only: one accountant query per distinct history)."""
        if self.mode == "none":
            return {}
        if self.mode == "user":
            eps = self.accountant.get_epsilon(self.delta)
            row = {"round": round_idx, "delta": self.delta, "epsilon": eps}
            self.rows.append(row)
            return {"epsilon": eps}
        eps = self.accountant.epsilons(self.delta)
        vals = sorted(eps.values())
        summary = {"eps_min": vals[0], "eps_median": vals[len(vals) // 2], "eps_max": vals[-1]} if vals else {"eps_max": 0.0}
        self.rows.append({"round": round_idx, "delta": self.delta, **summary, "epsilons": {str(k): v for k, v in eps.items()}})
        return summary

    def state_dict(self) -> dict[str, Any]:
        if self.mode == "none":
            return {}
        return {"accountant": self.accountant.state_dict(), "clip": self.clip, "sigma": self.sigma}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if self.mode == "none" or not sd:
            return
        self.accountant.load_state_dict(sd["accountant"])
        self.clip, self.sigma = float(sd["clip"]), float(sd["sigma"])
