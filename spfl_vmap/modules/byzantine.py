"""Byzantine resilience as round stages: malicious clients, attacks on ``U``, robust aggregation.

Malicious clients are a fixed set of client ids drawn from ``(seed, "byzantine")``
(``--by_mode fixed``), so they are sampled into cohorts like anyone else; or, as in the original
toolkit, exactly ``--by_workers`` of every cohort (``--by_mode per_round``).

Stages (see ``spfl_vmap.stages``):

* :class:`MaliciousClients` (adversary): the ``[N]`` malicious mask of a cohort;
* :class:`LabelPoison` (batch transform): data-poisoning attacks such as ``label_flip`` rewrite
  the malicious clients' labels inside local training (``torch.where`` on the mask);
* :class:`ByzantineAttack` (update stage): the registered attack rewrites malicious rows of ``U``;
* :class:`RobustAggregation` (aggregation): the registered aggregator, with the non-finite-row
  policy of :func:`spfl_vmap.aggregators.aggregate`. Every run that is not DP-FedAvg uses it,
  plain FedAvg (``mean``) included;
* :class:`FLTrustAggregation` (aggregation of ``--by_defense fltrust``): FLTrust's server side
  (Cao et al., "FLTrust: Byzantine-robust Federated Learning via Trust Bootstrapping", NDSS
  2021). The root set is ``--root_samples`` class-stratified training samples (default 100)
  that the round loop holds out before the clients' partition (``BuildEnv.x_root`` /
  ``y_root``), so no client ever trains on them; every round the server trains a copy of the
  global model on it with the clients' local procedure and the rule scores each client update
  by its cosine to that server update.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..aggregators import (AGGREGATORS, INDEX_KEYS, Rows, aggregate, check_clients, krum_scores, krum_select, normalise_weights, required_clients,
                           subset_parts)
from ..attacks import ATTACKS, Cohort, attack, attack_cohort, attackers_quantile, data_poison, shards_rows
from ..config import NORMALIZERS, SECTIONS, Config, check_params, need, parse_params
from ..data import dataset_meta, pack_clients
from ..distributed import Sharding
from ..engine.loop import plain_trainer
from ..errors import ConfigError, SpflError
from ..rng import derive_seed, generator
from ..stages import Adversary, Aggregation, BatchTransform, BuildEnv, Metrics, RoundContext, Stage, UpdateStage

MAX_LISTED = 100  # index lists longer than this are logged as counts only


# ---- the config section -----------------------------------------------------------------------
def byzantine_on(cfg: Config) -> bool:
    return cfg.byzantine_aggregate or cfg.by_attack != "none" or cfg.by_defense != "mean"


def num_byzantine(cfg: Config) -> int:
    """Byzantine clients in the population (fixed mode) or per cohort (per_round mode)."""
    if cfg.by_workers:
        return cfg.by_workers
    base = cfg.client_num_per_round if cfg.by_mode == "per_round" else cfg.client_num_in_total
    return int(round(cfg.by_frac * base))


F_QUANTILE = 0.99  # fixed mode: the server plans for the 99% quantile of attackers in a cohort


def assumed_f(cfg: Config) -> int:
    """The f robust aggregators assume.

    ``--by_f`` if given. In per_round mode, the exact count per cohort. In fixed mode a cohort of
    ``n`` drawn from ``K`` clients of which ``M`` are malicious holds a hypergeometric number of
    attackers, often more than its mean ``n M / K``; a rule that assumes the mean is routinely
    overrun (trimmed mean under Gaussian noise fell to 0.32 at 20% attackers). The default is
    the 0.99 quantile of that count, clamped to the largest f the rule admits for ``n``
    (Krum ``2f+3 <= n``, Bulyan ``4f+3 <= n``, ...) but never below the expected count.
    """
    if cfg.by_f is not None:
        return cfg.by_f
    if cfg.by_mode == "per_round":
        return num_byzantine(cfg)
    n, K = cfg.client_num_per_round, cfg.client_num_in_total
    expected = int(round(num_byzantine(cfg) * n / K))
    f = attackers_quantile(K, num_byzantine(cfg), n, F_QUANTILE)
    params = parse_params(cfg.by_defense_params)
    # clamp the margin above the expected count (never below it: a rule that cannot take even the
    # expected attackers is refused by the section validator, as the paper's bound demands)
    while f > expected and (2 * f >= n or required_clients(cfg.by_defense, f, params) > n):
        f -= 1  # also keep a majority of honest clients
    return f


#: Coordinate-wise rules: under torchrun they run on U sharded by columns (``Sharding.columns``)
COORDINATE_WISE = ("median", "trimmed_mean")

#: FLTrust's root set: 100 class-stratified training samples (Cao et al. 2021 use 100 for
#: MNIST-0.1 / Fashion-MNIST; FLPoison's ``fltrust.py`` default)
FLTRUST_ROOT_SAMPLES = 100

# the original toolkit's names (test/Byzantine_defense.sh), matched case-insensitively
DEFENSE_ALIASES = {"avg": "mean", "mkrum": "multi_krum", "trimmed-mean": "trimmed_mean", "trimmed_mean": "trimmed_mean",
                   "median": "median", "krum": "krum", "bulyan": "bulyan", "dnc": "dnc"}
ATTACK_ALIASES = {"gaussian": "gaussian", "agr-tal": "agr_tal", "agr_tal": "agr_tal"}


@NORMALIZERS.register("byzantine")
def canonical_names(cfg: Config) -> dict[str, Any]:
    """``--by_defense MKrum`` -> ``multi_krum``, ``--by_attack AGR-TAL`` -> ``agr_tal``, ...;
    names in the registries' own spelling pass unchanged."""
    out: dict[str, Any] = {}
    d, a = cfg.by_defense.lower(), cfg.by_attack.lower()
    if cfg.by_defense not in AGGREGATORS and d in DEFENSE_ALIASES:
        out["by_defense"] = DEFENSE_ALIASES[d]
    if cfg.by_attack not in ATTACKS and a in ATTACK_ALIASES:
        out["by_attack"] = ATTACK_ALIASES[a]
    if cfg.root_samples is None and out.get("by_defense", cfg.by_defense) == "fltrust":
        out["root_samples"] = FLTRUST_ROOT_SAMPLES
    return out


@SECTIONS.register("byzantine")
def validate(cfg: Config) -> None:
    """The ``--by_*`` flags; the cohort-size bound of the chosen rule comes from the aggregators."""
    need(cfg.by_defense in AGGREGATORS, f"unknown --by_defense {cfg.by_defense!r}; choose one of: {', '.join(AGGREGATORS.names())}")
    need(cfg.by_attack in ATTACKS, f"unknown --by_attack {cfg.by_attack!r}; choose one of: {', '.join(ATTACKS.names())}")
    need(cfg.by_mode in ("fixed", "per_round"), f"--by_mode must be fixed or per_round, got {cfg.by_mode!r}")
    need(cfg.by_workers >= 0, "--by_workers must be >= 0")
    need(0.0 <= cfg.by_frac < 1.0, f"--by_frac must be in [0, 1), got {cfg.by_frac}")
    need(not (cfg.by_workers and cfg.by_frac), "give --by_workers or --by_frac, not both")
    nb = num_byzantine(cfg)
    limit = cfg.client_num_per_round if cfg.by_mode == "per_round" else cfg.client_num_in_total
    need(nb <= limit, f"{nb} Byzantine clients exceed the {limit} clients available")
    need(cfg.by_attack == "none" or nb > 0, f"--by_attack {cfg.by_attack} needs --by_workers or --by_frac > 0")
    if cfg.by_f is not None:
        need(0 <= cfg.by_f < cfg.client_num_per_round, "--by_f must be in [0, client_num_per_round)")
    check_params("--by_defense_params", AGGREGATORS.get(cfg.by_defense), cfg.by_defense_params)
    check_params("--by_attack_params", ATTACKS.get(cfg.by_attack), cfg.by_attack_params)
    root = cfg.root_samples or 0
    need(root >= 0, f"--root_samples must be >= 0, got {root}")
    if cfg.by_defense == "fltrust":
        classes = dataset_meta(cfg.dataset).num_classes
        need(root >= classes, f"--by_defense fltrust needs a server root set of at least one sample per class: "
                              f"--root_samples >= {classes} for {cfg.dataset}, got {root}")
    try:  # the rule's own bound (Krum 2f+3, Bulyan 4f+3, ...), written once in the aggregators
        check_clients(cfg.by_defense, cfg.client_num_per_round, assumed_f(cfg), parse_params(cfg.by_defense_params))
    except ConfigError as e:
        raise ConfigError(f"--by_defense {e}; raise --client_num_per_round or lower --by_f / the Byzantine count") from None


# ---- stages -------------------------------------------------------------------------------------
class MaliciousClients(Adversary):
    """Which sampled clients are malicious: a fixed set of ids, or a count per cohort."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.count = num_byzantine(cfg)
        K = cfg.client_num_in_total
        ids = torch.randperm(K, generator=generator(cfg.seed, "byzantine"))[: self.count] if cfg.by_mode == "fixed" else torch.empty(0)
        self.malicious_ids = torch.zeros(K, dtype=torch.bool)  # (K,)
        self.malicious_ids[ids.long()] = True

    def malicious_mask(self, client_ids: list[int], round_idx: int) -> torch.Tensor:
        if self.cfg.by_mode == "per_round":
            mask = torch.zeros(len(client_ids), dtype=torch.bool)
            pick = torch.randperm(len(client_ids), generator=generator(self.cfg.seed, "byzantine", round_idx))[: self.count]
            mask[pick] = True
            return mask
        return self.malicious_ids[torch.tensor(client_ids, dtype=torch.long)] if client_ids else torch.zeros(0, dtype=torch.bool)

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        f_rule = ("--by_f" if c.by_f is not None else "exact count per cohort" if c.by_mode == "per_round"
                  else f"{F_QUANTILE} quantile of the hypergeometric attacker count, clamped to what {c.by_defense} admits")
        return {"byzantine": {"attack": c.by_attack, "defense": c.by_defense, "f": assumed_f(c), "f_rule": f_rule,
                              "malicious_clients": int(self.malicious_ids.sum()) if c.by_mode == "fixed" else self.count,
                              "mode": c.by_mode, "knowledge": "omniscient" if c.all_grads else "partial"}}


class LabelPoison(BatchTransform):
    """Malicious clients train on ``poison(y)`` (e.g. label flipping, Fang et al. 2020)."""

    name = "label_poison"

    def __init__(self, poison: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        self.poison = poison

    def apply(
        self, ctx: RoundContext, x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], Metrics]:
        mal = ctx.malicious[rows]  # (n,)
        if not bool(mal.any()):
            return (x, y), {}
        return (x, torch.where(mal[:, None], self.poison(y, ctx.num_classes), y)), {}


class ByzantineAttack(UpdateStage):
    """Round step 6: the registered attack rewrites the malicious rows of ``U [N, D]``."""

    name = "byzantine_attack"
    sharding: Optional[Sharding] = None  # set by the builder: ``apply`` then gets this rank's rows only

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.kwargs = parse_params(cfg.by_attack_params)

    @property
    def reads_rows(self) -> bool:
        """Whether the stage needs all of ``U`` in every process. Attacks with a sharded path
        (:func:`~spfl_vmap.attacks.shards_rows`: all but ``agr_tal``) rewrite each rank's own
        malicious rows from statistics taken by collectives, and ``--by_attack none`` only
        counts the malicious clients, so sharded processes need not gather ``U`` for them."""
        return self.cfg.by_attack != "none" and not shards_rows(self.cfg.by_attack)

    @property
    def reads_stats(self) -> bool:
        """Whether the attack reads other rows than the attacker's own (sharded: collectives)."""
        return self.cfg.by_attack != "none"

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        malicious = ctx.malicious
        n_mal = int(malicious.sum())
        if self.cfg.by_attack == "none" or n_mal == 0:
            return U, {"malicious": n_mal}
        kwargs = dict(generator=ctx.generator("attack", device=U.device),
                      knowledge="omniscient" if self.cfg.all_grads else "partial", f=assumed_f(self.cfg),
                      aggregator=self.cfg.by_defense, **self.kwargs)
        if self.sharding is not None:  # U is this rank's rows (n_r, D)
            cohort = Cohort.sharded(U, malicious, self.sharding, self.sharding.rows(ctx.client_ids))
            U2, m = attack_cohort(self.cfg.by_attack, cohort, **kwargs)
        else:
            U2, m = attack(self.cfg.by_attack, U, malicious.to(U.device), weights=ctx.weights, **kwargs)
        return U2, {"malicious": n_mal, **{f"attack_{k}": v for k, v in m.items() if isinstance(v, (int, float, str, bool))}}


@dataclass
class _Share:
    """One rank's part of a sharded aggregation (:meth:`RobustAggregation._share`)."""

    rows: list[list[int]]  # every rank's cohort positions
    X: torch.Tensor  # (n_r, D) fp32: this rank's rows
    mine_finite: torch.Tensor  # (n_r,) which of them have a finite squared norm
    kept: torch.Tensor  # (n_kept,) the cohort positions of every finite row
    f: int  # the rule's f, lowered by the excluded rows
    metrics: Metrics  # {"nonfinite_excluded": k} when rows were excluded
    zeros: torch.Tensor  # (D,) the update of a rejected round
    early: Optional[tuple[torch.Tensor, Metrics]] = None  # the round's result when it cannot aggregate

    def kept_rows(self, U: torch.Tensor, sh: Sharding) -> Rows:
        """The cohort's finite rows as :class:`~spfl_vmap.aggregators.Rows` sharded over the
        ranks: this rank's finite rows of ``U (n_r, D)``, every rank's positions among them."""
        N = sum(len(pos) for pos in self.rows)
        mask = torch.zeros(N, dtype=torch.bool, device=self.kept.device)
        mask[self.kept] = True
        X = U if bool(self.mine_finite.all()) else U[self.mine_finite]  # no copy when all are finite
        return Rows(X, self.kept.numel(), sh, subset_parts(mask, self.rows))

    def reject(self, **extra: Any) -> tuple[torch.Tensor, Metrics]:
        return self.zeros, {**self.metrics, "round_rejected": True, **extra}

    def result(self, agg: torch.Tensor, **extra: Any) -> tuple[torch.Tensor, Metrics]:
        """``agg`` (in the update's dtype) with the metrics, or a rejected round if not finite."""
        if not bool(torch.isfinite(agg).all()):
            return self.reject()
        return agg.to(self.zeros.dtype), {**self.metrics, **extra}


class RobustAggregation(Aggregation):
    """Round step 8: the registered aggregator; a NaN/Inf row never reaches the model.

    Holds the aggregator's state across rounds (centered clipping's momentum, FoolsGold's
    per-client histories), checkpointed.

    Under torchrun, when the builder sets :attr:`sharding` (:attr:`sums_rows`), ``apply`` gets this
    rank's rows and the rule runs on them with collectives (:meth:`sharded_rows`,
    :meth:`sharded_krum`, :meth:`sharded_columns`); every other rule gets all of ``U``, gathered.
    """

    name = "aggregator"
    sharding: Optional[Sharding] = None  # set by the builder: ``apply`` then gets this rank's rows only

    @property
    def sums_rows(self) -> bool:
        """Ranks can aggregate without gathering ``U``: rules with an ``on_rows`` core (the mean,
        clipping rules, FLTrust, RLR, FLAME) run it on sharded rows (:meth:`sharded_rows`);
        Krum / Multi-Krum select from distances that ranks compute in blocks
        (:meth:`Sharding.sqdist`), then sum the selected rows; the coordinate-wise median and
        trimmed mean work on ``U`` sharded by columns (:meth:`Sharding.columns`)."""
        return self.rule in ("krum", "multi_krum", *COORDINATE_WISE) or hasattr(AGGREGATORS.get(self.rule), "on_rows")

    @property
    def sharded_path(self) -> str:
        """How the rows meet when :attr:`sums_rows` (``config.json``'s ``distributed.aggregation``)."""
        if self.rule == "mean":
            return "all_reduce of per-process sums"
        if self.rule in COORDINATE_WISE:
            return "U sharded by columns (all_to_all), the (D,) result gathered"
        if hasattr(AGGREGATORS.get(self.rule), "on_rows"):
            return "per-row scalars gathered, all_reduce of weighted sums"
        return "distance blocks, all_reduce of the selected rows"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.rule = cfg.by_defense
        self.kwargs = parse_params(cfg.by_defense_params)
        self.f = assumed_f(cfg)
        self.verbose = byzantine_on(cfg)  # plain FedAvg logs no aggregator internals
        self.state: dict[str, Any] = {}

    def apply(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        for k, v in self.state.items():  # a resumed state comes from a CPU checkpoint
            if isinstance(v, torch.Tensor) and v.device != U.device:
                self.state[k] = v.to(U.device)
        if self.sharding is not None:
            if self.rule in COORDINATE_WISE:
                return self.sharded_columns(ctx, U)
            return self.sharded_krum(ctx, U) if self.rule in ("krum", "multi_krum") else self.sharded_rows(ctx, U)
        if U.shape[0] == 0:
            return torch.zeros(U.shape[1], device=U.device), {"round_rejected": True}
        agg, m = aggregate(
            self.rule, U, ctx.weights, f=min(self.f, U.shape[0] - 1), state=self.state,
            generator=ctx.generator("aggregator", device=U.device), client_ids=ctx.client_ids,
            **self.extra_kwargs(ctx), **self.kwargs,
        )
        return agg, self.report(ctx, m)

    def report(self, ctx: RoundContext, m: dict[str, Any]) -> Metrics:
        """The stage's metrics from the rule's ``m`` (row indices are cohort positions)."""
        out: Metrics = {}
        if m.get("round_rejected"):
            out["round_rejected"] = True
        if m.get("nonfinite_excluded"):
            out["nonfinite_excluded"] = len(m["nonfinite_excluded"])
        if "selected" in m:
            sel = m["selected"]
            out["selected"] = len(sel)
            out["malicious_selected"] = int(ctx.malicious[torch.tensor(sel, dtype=torch.long, device=ctx.malicious.device)].sum()) if sel else 0
            if len(sel) <= MAX_LISTED:
                out["selected_ids"] = sel
        if self.verbose:
            for k, v in m.items():
                if k not in out and k not in ("selected", "flagged", "scores", "nonfinite_excluded", "round_rejected") and isinstance(v, (int, float, bool)):
                    out[f"agg_{k}"] = v
            if "flagged" in m:
                flagged = m["flagged"]
                out["flagged"] = len(flagged)
                idx = torch.tensor(flagged, dtype=torch.long, device=ctx.malicious.device)
                out["malicious_flagged"] = int(ctx.malicious[idx].sum()) if flagged else 0
        return out

    def extra_kwargs(self, ctx: RoundContext) -> dict[str, Any]:
        """Engine keywords a subclass computes per round (FLTrust's ``server_update``)."""
        return {}

    def _share(self, ctx: RoundContext, U: torch.Tensor) -> "_Share":
        """Under sharding, as :func:`~spfl_vmap.aggregators.aggregate` prepares all of ``U``:
        the finite flags of every row (gathered, ``(N,)`` bytes), ``f`` lowered by the excluded
        rows, and the round's result when it cannot aggregate (no row, no finite row, or too few
        for the rule). Every rank decides the same, so an early return skips no collective."""
        sh, N = self.sharding, ctx.num_clients
        zeros = torch.zeros(ctx.spec.dim, dtype=U.dtype, device=U.device)
        rows = sh.rows(ctx.client_ids)
        X = U.float()
        mine_finite = torch.isfinite(torch.einsum("nd,nd->n", X, X))  # (n_r,)
        finite = sh.gather_rows(mine_finite.to(torch.uint8), rows).bool() if N else mine_finite  # (N,)
        kept = finite.nonzero().squeeze(1)  # (n_kept,)
        excluded = N - kept.numel()
        f = max(0, min(self.f, N - 1) - excluded)
        share = _Share(rows, X, mine_finite, kept, f, {"nonfinite_excluded": excluded} if excluded else {}, zeros)
        if kept.numel() == 0:
            share.early = share.reject()
        elif excluded and kept.numel() < required_clients(self.rule, f, self.kwargs):
            share.early = share.reject(too_few_rows=kept.numel())
        return share

    def sharded_krum(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """Krum / Multi-Krum (Blanchard et al. 2017) from this rank's rows ``U (n_r, D)``.

        As :func:`~spfl_vmap.aggregators.aggregate` on all of ``U``: non-finite rows are excluded
        (and ``f`` lowered by their number, :meth:`_share`); the ``(N, N)`` distances come in
        per-rank blocks (:meth:`Sharding.sqdist`), so no rank holds all of ``U``; every rank runs
        the same selection on them; each rank sums its selected rows and one ``all_reduce`` adds
        the partial sums. Krum's result is the selected row's bits; Multi-Krum's mean agrees with
        one process to the order of the additions (and the distances to the blocking of the
        matmul).
        """
        s = self._share(ctx, U)
        if s.early is not None:
            return s.early
        sh, N, D = self.sharding, ctx.num_clients, ctx.spec.dim
        Dm = sh.sqdist(torch.where(s.mine_finite[:, None], s.X, 0.0), s.rows)  # (N, N)
        n, f, kept = s.kept.numel(), s.f, s.kept
        check_clients(self.rule, n, f)
        Dk = Dm[kept][:, kept]  # (n, n)
        weighted = False
        if self.rule == "krum":
            sel = [int(torch.argmin(krum_scores(Dk, f)))]
        else:
            m = n - 2 * f if self.kwargs.get("m") is None else int(self.kwargs["m"])
            if not 1 <= m <= n:
                raise ConfigError(f"multi_krum: m must be in [1, n={n}], got {m}")
            sel = krum_select(Dk, f, m, rescore=bool(self.kwargs.get("rescore", True)))
            weighted = bool(self.kwargs.get("weighted", False))
        chosen = kept[torch.tensor(sel, dtype=torch.long, device=kept.device)]  # (m,) cohort positions
        w = torch.zeros(N, device=U.device)
        w[chosen] = normalise_weights(ctx.weights[chosen] if weighted else None, len(sel), U.device)  # (N,)
        mine = torch.tensor(s.rows[sh.rank], dtype=torch.long, device=U.device)
        wm = w[mine]  # (n_r,)
        pick = (wm != 0) & s.mine_finite
        partial = wm[pick] @ s.X[pick] if bool(pick.any()) else torch.zeros(D, device=U.device)  # (D,)
        sel_pos = chosen.tolist()
        listed = {"selected_ids": sel_pos} if len(sel_pos) <= MAX_LISTED else {}
        return s.result(sh.sum(partial), selected=len(sel_pos),
                        malicious_selected=int(ctx.malicious[chosen.to(ctx.malicious.device)].sum()), **listed)

    def sharded_columns(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """The coordinate-wise median or trimmed mean (Yin et al. 2018) from this rank's rows
        ``U (n_r, D)``.

        As :func:`~spfl_vmap.aggregators.aggregate` on all of ``U``: rows with a non-finite
        squared norm are excluded (and ``f`` lowered by their number, :meth:`_share`). One
        ``all_to_all`` gives each rank every row's values in its ``D / P`` columns
        (:meth:`Sharding.columns`), the rule runs on them, and the ``(D,)`` result is gathered.
        A coordinate's statistic depends on its own column only (the trimmed mean sums each
        column in row order), so the result is the one-process one, bit for bit.
        """
        s = self._share(ctx, U)
        if s.early is not None:
            return s.early
        cols, _ = self.sharding.columns(U, s.rows)  # (N, D / P)
        excluded = ctx.num_clients - s.kept.numel()
        part, own = AGGREGATORS.get(self.rule)(cols[s.kept] if excluded else cols, None, f=s.f, **self.kwargs)  # (D / P,)
        return s.result(self.sharding.join_columns(part.to(U.dtype), ctx.spec.dim), **self.report(ctx, own))

    def sharded_rows(self, ctx: RoundContext, U: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """A rule whose result is a weighted sum of rows with weights from per-row scalars (the
        mean, norm clipping, centered clipping, FLTrust; RLR also sums signs; FLAME clusters on
        cosine distances computed in blocks) from this rank's rows ``U (n_r, D)``.

        As :func:`~spfl_vmap.aggregators.aggregate` on all of ``U``: non-finite rows are excluded
        (:meth:`_share`); the rule's own code (its ``on_rows``) runs on the kept rows as sharded
        :class:`~spfl_vmap.aggregators.Rows`, per-row norms gathered and every sum all_reduced, so
        every rank takes the same steps. Equal to one process up to the order of the additions.
        """
        s = self._share(ctx, U)
        if s.early is not None:
            return s.early
        core = AGGREGATORS.get(self.rule).on_rows
        check_clients(self.rule, s.kept.numel(), s.f, self.kwargs)
        engine = {"state": self.state, "generator": ctx.generator("aggregator", device=U.device), **self.extra_kwargs(ctx)}
        engine = {k: v for k, v in engine.items() if k in inspect.signature(core).parameters}
        agg, own = core(s.kept_rows(U, self.sharding), ctx.weights[s.kept], **engine, **self.kwargs)
        kept = s.kept.tolist()  # the rule's row indices count kept rows, as in aggregate()
        own = {k: [kept[i] for i in v] if k in INDEX_KEYS else v for k, v in own.items()}
        return s.result(agg, **self.report(ctx, own))

    def state_dict(self) -> dict[str, Any]:
        return {"state": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in self.state.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state.get("state", {}))

    def describe(self) -> dict[str, Any]:
        return {"aggregator": self.rule}


class FLTrustAggregation(RobustAggregation):
    """The aggregation stage of ``--by_defense fltrust``: root-set update, then the rule.

    The server update of round ``t`` is trained from the round's global model on the root set as
    a one-client cohort (client id 0 of the root set, batches seeded by ``(seed, "fltrust_root",
    ...)``, so they never coincide with a client's), without the clients' batch transforms: the
    server is honest. In ``--use_gradient`` mode it is the root set's gradient, as the clients'.
    """

    def __init__(self, cfg: Config, env: BuildEnv) -> None:
        super().__init__(cfg)
        if env.x_root is None or env.y_root is None or len(env.y_root) == 0:
            raise SpflError("--by_defense fltrust needs the server root set (--root_samples > 0)")
        n = len(env.y_root)
        self.root_size = n
        packed = pack_clients(env.x_root, env.y_root, [np.arange(n)], env.device)
        self.trainer = plain_trainer(env.model, env.spec, packed, cfg, env.device)
        self.seed = derive_seed(cfg.seed, "fltrust_root")

    def server_update(self, ctx: RoundContext) -> torch.Tensor:
        """``[D]`` the server's update (or gradient) on the root set from ``ctx.global_params``."""
        root = RoundContext(
            round=ctx.round, seed=self.seed, client_ids=[0], counts=[self.root_size],
            malicious=torch.zeros(1, dtype=torch.bool, device=ctx.device),
            weights=torch.tensor([float(self.root_size)], device=ctx.device),
            global_params=ctx.global_params, spec=ctx.spec, device=ctx.device, num_classes=ctx.num_classes,
            population=1, expected_cohort=1, use_gradient=ctx.use_gradient, server_lr=ctx.server_lr,
        )
        return self.trainer.train(root, ()).U[0]

    def extra_kwargs(self, ctx: RoundContext) -> dict[str, Any]:
        return {"server_update": self.server_update(ctx)}

    def describe(self) -> dict[str, Any]:
        return {"aggregator": self.rule, "root_samples": self.root_size}


def stages(cfg: Config, env: BuildEnv) -> list[Stage]:
    """The module's stages for ``cfg``. The aggregator is always included (FedAvg's mean when the
    module is off); the builder replaces it with a fused aggregator where one is configured."""
    # FLTrust's aggregation trains the server's own update on the root set every round
    out: list[Stage] = [FLTrustAggregation(cfg, env) if cfg.by_defense == "fltrust" else RobustAggregation(cfg)]
    if not byzantine_on(cfg):
        return out
    out.append(MaliciousClients(cfg))
    poison = data_poison(cfg.by_attack)
    if poison is not None:
        out.append(LabelPoison(poison))
    out.append(ByzantineAttack(cfg))
    return out


__all__ = ["ByzantineAttack", "LabelPoison", "MaliciousClients", "RobustAggregation", "assumed_f", "byzantine_on",
           "num_byzantine", "stages", "validate"]