"""``spfl certify``: CRFL's parameter smoothing and certified accuracy of a finished run.

Xie, Chen, Chen & Li, "CRFL: Certifiably Robust Federated Learning against Backdoor Attacks",
ICML 2021 (the authors' ``smooth_mnist.py`` and ``certify_mnist.py``). For a run directory with a
checkpoint:

1. load the run's config (``config.json``) and its final model (``checkpoint.pt``); a CRFL run
   smooths around the last clipped model before its noise (``CRFLClipNoise.clipped``), any other
   run around its final model;
2. draw ``M`` noisy copies ``w + sigma_T * N(0, I)``; copy ``m``'s noise comes from a generator
   seeded by ``(run seed, "crfl_certify", m)``, so the result does not depend on ``--batch`` or
   the device;
3. let them vote on the test set and, for a run with a backdoor attack, on the triggered test
   set (the backdoor module's trigger; images whose true class is the target are left out, as
   for ``asr``); ``correct`` means the smoothed prediction is the true label;
4. per test point, Clopper-Pearson bounds of the top two classes' vote shares and the certified
   radius of :func:`spfl_vmap.defenses.crfl.certified_radius` with the theorem's terms taken from
   the run (each can be overridden);
5. write ``certify.json`` (settings, terms, notes, per-point results) and ``certify.csv``
   (certified accuracy and certified rate against the radius).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..attacks.backdoor import apply_trigger
from ..builder import Simulator
from ..config import Config, need
from ..defenses.crfl import certified_accuracy, certified_radius, contraction, crfl_lipschitz, rho_at, smoothing_bounds
from ..engine.simulator import CHECKPOINT, read_checkpoint
from ..errors import SpflError
from ..modules.backdoor import AttackSuccess, backdoor_on, boost_gamma, num_malicious
from ..modules.byzantine import MaliciousClients
from ..modules.crfl import CRFLClipNoise
from ..rng import generator
from ..runner import load_run_config, write_json_atomic

DEFAULT_RADII = 10  # the default grid: 0 and 10 steps up to the largest finite radius


@dataclass
class CertifyOptions:
    """What ``spfl certify`` may set; ``None`` takes the value from the run."""

    sigma: Optional[float] = None  # smoothing noise sigma_T (default: the run's --crfl_sigma)
    samples: int = 1000  # M noisy models (the authors' N_m)
    alpha: float = 0.001  # the pair of vote bounds holds with probability 1 - alpha (the authors' value)
    batch: int = 32  # noisy models evaluated together (vmap)
    t_adv: Optional[int] = None  # attack round (default: R of --bd_schedule single:R, else T - 1, the least contracted one)
    attackers: Optional[int] = None  # R (default: malicious clients per cohort, at most the cohort; 1 without an attack)
    agg_weight: Optional[float] = None  # p_i (default 1 / clients per round, FedAvg with equal weights)
    gamma: Optional[float] = None  # scale factor (default --bd_boost / --backdoor_test_boost, N / server lr with --bd_boost_auto, else 1)
    poison_frac: Optional[float] = None  # q_B / n_B (default --bd_poison_frac)
    lipschitz: Optional[float] = None  # L_z (default sqrt(2 + 2 rho + rho^2) at rho_{t_adv})
    tau: Optional[int] = None  # local steps of an attacker (default epochs * ceil(largest attacker's samples / B))
    radii: Optional[list[float]] = None  # radii of the table (default: 0 .. the largest finite radius)


def check_options(o: CertifyOptions) -> None:
    """One-line :class:`~spfl_vmap.errors.ConfigError` for a bad option."""
    def pos(name: str, v: Optional[float], strict: bool = True) -> None:
        if v is not None:
            need(math.isfinite(v) and (v > 0 if strict else v >= 0), f"--{name} must be a finite number {'>' if strict else '>='} 0, got {v}")

    pos("sigma", o.sigma)
    need(o.samples >= 2, f"--samples must be >= 2, got {o.samples}")
    need(math.isfinite(o.alpha) and 0 < o.alpha < 1, f"--alpha must be in (0, 1), got {o.alpha}")
    need(o.batch >= 1, f"--batch must be >= 1, got {o.batch}")
    need(o.t_adv is None or o.t_adv >= 1, f"--t_adv must be >= 1, got {o.t_adv}")
    need(o.attackers is None or o.attackers >= 1, f"--attackers must be >= 1, got {o.attackers}")
    need(o.tau is None or o.tau >= 1, f"--tau must be >= 1, got {o.tau}")
    for name in ("agg_weight", "gamma", "lipschitz", "poison_frac"):
        pos(name, getattr(o, name))
    for name in ("agg_weight", "poison_frac"):
        v = getattr(o, name)
        need(v is None or v <= 1, f"--{name} must be <= 1, got {v}")
    for r in o.radii or []:
        pos("radii", r, strict=False)


def load_run(run_dir: str | Path) -> tuple[Config, Simulator]:
    """The run's config and a simulator holding its checkpointed state; one-line errors for a
    missing or damaged run directory."""
    p = Path(run_dir)
    if not p.is_dir():
        raise SpflError(f"--run {run_dir}: no such run directory")
    if not (p / "config.json").is_file():
        raise SpflError(f"{run_dir} is not a run directory: {p / 'config.json'} is missing")
    if not (p / CHECKPOINT).is_file():
        raise SpflError(f"{run_dir} has no {CHECKPOINT}: spfl certify needs the final model; train with --checkpoint_every K")
    cfg = load_run_config(p)
    state = read_checkpoint(p / CHECKPOINT)
    sim = Simulator(cfg)
    sim.load_checkpoint(p, state)
    if sim.round == 0:
        raise SpflError(f"{p / CHECKPOINT} holds no trained round")
    return cfg, sim


@torch.no_grad()
def smoothed_votes(sim: Simulator, base: torch.Tensor, xs: list[torch.Tensor], *, sigma: float, samples: int, batch: int) -> list[torch.Tensor]:
    """Votes of ``samples`` noisy copies of ``base (D,)`` on each test set ``x (n, ...)``.

    Returns:
        One ``(n, classes)`` long tensor per set; every row sums to ``samples``.
    """
    C, D, dev = sim.dataset.num_classes, base.numel(), base.device
    predict = vmap(lambda p, xb: functional_call(sim.model, p, (xb,)), in_dims=(0, None))
    counts = [torch.zeros(len(x), C, dtype=torch.long, device=dev) for x in xs]
    for lo in range(0, samples, batch):
        ids = range(lo, min(lo + batch, samples))
        # noise drawn on the CPU per model: the same copies for every --batch and device
        noise = torch.stack([torch.randn(D, generator=generator(sim.cfg.seed, "crfl_certify", m)) for m in ids])  # (b, D)
        params = sim.spec.unflatten(base[None] + sigma * noise.to(dev, base.dtype))  # {name: (b, *shape)}
        step = max(1, sim.cfg.eval_batch_size // len(ids))  # images per call: about one evaluation batch in all
        for x, c in zip(xs, counts):
            for xlo in range(0, len(x), step):
                pred = predict(params, x[xlo : xlo + step]).argmax(dim=-1)  # (b, nb)
                c[xlo : xlo + step] += F.one_hot(pred, C).sum(dim=0)
    return counts


def single_attack_round(cfg: Config) -> Optional[int]:
    """``R`` when the backdoor attack acted in round ``R`` only (``--bd_schedule single:R``), else None."""
    kind, _, n = str(getattr(cfg, "bd_schedule", "continuous")).strip().lower().partition(":")
    return int(n) if backdoor_on(cfg) and kind == "single" and n.isdigit() else None


def theorem_terms(cfg: Config, sim: Simulator, o: CertifyOptions, sigma_T: float) -> dict[str, Any]:
    """The terms of CRFL's radius for this run, from its config and data, overridden by ``o``."""
    T = sim.round
    single = single_attack_round(cfg)
    t_adv = o.t_adv if o.t_adv is not None else (single if single is not None and single < T else T - 1)
    need(T >= 2 or o.t_adv is not None, f"the checkpoint is at round {T}: CRFL certifies an attack round before the last, so the run needs >= 2 rounds")
    need(1 <= t_adv < T, f"--t_adv must be a round before the checkpoint's round {T}, got {t_adv}")
    attack = backdoor_on(cfg)
    R = o.attackers if o.attackers is not None else (min(num_malicious(cfg), cfg.client_num_per_round) if attack else 1)
    p_i = o.agg_weight if o.agg_weight is not None else 1.0 / cfg.client_num_per_round
    if o.gamma is not None:
        gamma = o.gamma
    elif boost_gamma(cfg) is not None:
        gamma = boost_gamma(cfg)
    else:
        gamma = cfg.client_num_per_round / cfg.effective_server_lr if cfg.bd_boost_auto else 1.0
    if o.tau is not None:
        tau = o.tau
    else:
        adversary = sim.pipeline.adversary
        ids = (adversary.malicious_ids.nonzero().flatten().tolist()
               if attack and isinstance(adversary, MaliciousClients) and cfg.by_mode == "fixed" else [])
        largest = max(sim.counts[i] for i in ids) if ids else max(sim.counts)
        tau = cfg.epochs * math.ceil(largest / cfg.batch_size)
    sigma_train = cfg.crfl_sigma
    rhos = [rho_at(t, cfg.crfl_rho, cfg.crfl_rho_init, cfg.crfl_rho_step) for t in range(t_adv + 1, T + 1)]
    sigmas = [sigma_train] * (T - t_adv - 1) + [sigma_T]
    rho_adv = rho_at(t_adv, cfg.crfl_rho, cfg.crfl_rho_init, cfg.crfl_rho_step)
    return {
        "T": T, "t_adv": t_adv, "attackers": R, "agg_weight": p_i, "gamma": gamma, "tau": tau, "lr": cfg.lr,
        "lipschitz": o.lipschitz if o.lipschitz is not None else crfl_lipschitz(rho_adv),
        "poison_ratio": o.poison_frac if o.poison_frac is not None else cfg.bd_poison_frac,
        "sigma_adv": sigma_train, "sigma_T": sigma_T, "rho_adv": rho_adv, "rhos": rhos, "sigmas": sigmas,
        "contraction": contraction(rhos, sigmas),
    }


def notes_for(cfg: Config, sim: Simulator) -> list[str]:
    """What the reader of the certificate must know about this run."""
    out = []
    if not cfg.crfl:
        out.append("the run was trained without --crfl: its global model was neither clipped nor smoothed (noised) during training, "
                   "so the radii are those the theorem would give a CRFL training with the config's crfl_* values; "
                   "only the smoothed accuracy describes this model")
    if not backdoor_on(cfg):
        out.append("the run had no backdoor attack: the radii certify against a hypothetical one (attackers, gamma and poison "
                   "fraction as listed)")
    if backdoor_on(cfg) and single_attack_round(cfg) is None:
        out.append(f"the attack acted in more than one round (--bd_schedule {getattr(cfg, 'bd_schedule', 'continuous')}); the "
                   f"theorem certifies an attack in one round, t_adv (--t_adv)")
    if cfg.model != "lr" or cfg.client_optimizer != "sgd" or cfg.momentum or cfg.wd:
        out.append(f"CRFL's analysis and its L_z are for a convex (logistic regression) model trained with plain SGD; this run "
                   f"has --model {cfg.model} --client_optimizer {cfg.client_optimizer}: the radii follow the formula, not a proof")
    if cfg.by_defense != "mean":
        out.append(f"p_i defaults to 1 / clients per round (FedAvg); --by_defense {cfg.by_defense} weighs attackers "
                   f"differently: give --agg_weight")
    if sim.round < cfg.comm_round:
        out.append(f"the checkpoint is at round {sim.round} of {cfg.comm_round}")
    return out


def set_result(counts: torch.Tensor, y: torch.Tensor, base_pred: torch.Tensor, terms: dict[str, Any], alpha: float) -> dict[str, Any]:
    """Bounds, radii and per-point outcome of one test set (``counts (n, C)``, labels ``y (n,)``)."""
    pred, p_a, p_b = smoothing_bounds(counts.cpu(), alpha)
    radius = certified_radius(p_a, p_b, sigma_adv=terms["sigma_adv"], contraction_factor=terms["contraction"],
                              weights=[terms["agg_weight"]] * terms["attackers"], gamma=terms["gamma"], tau=terms["tau"],
                              lr=terms["lr"], lipschitz=terms["lipschitz"], poison_ratio=terms["poison_ratio"])
    y = y.cpu()
    correct = pred == y
    n = len(y)
    return {
        "n": n,
        "base_acc": float((base_pred.cpu() == y).double().mean()) if n else math.nan,
        "smoothed_acc": float(correct.double().mean()) if n else math.nan,
        "abstained": float(radius.isnan().double().mean()) if n else math.nan,
        "points": {"label": y.tolist(), "prediction": pred.tolist(), "p_a": p_a.tolist(), "p_b": p_b.tolist(),
                   "radius": radius.tolist(), "correct": correct.tolist()},
        "_radius": radius, "_correct": correct, "_pred": pred,
    }


def default_radii(sets: dict[str, dict[str, Any]]) -> list[float]:
    finite = [float(r) for s in sets.values() for r in s["_radius"] if math.isfinite(float(r))]
    top = max(finite, default=0.0)
    # the last point is ``top`` itself (``top * n / n`` may round below it and drop the points that reach it)
    return [top * i / DEFAULT_RADII for i in range(DEFAULT_RADII)] + [top] if top > 0 else [0.0]


def certify(run_dir: str | Path, o: CertifyOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Smooth the run's final model, certify every test point, return the result (see the module doc)."""
    check_options(o)
    cfg, sim = load_run(run_dir)
    sigma_T = o.sigma if o.sigma is not None else cfg.crfl_sigma
    need(sigma_T > 0, "the run's --crfl_sigma is 0: give the smoothing noise with --sigma")
    terms = theorem_terms(cfg, sim, o, sigma_T)
    notes = notes_for(cfg, sim)
    for line in notes:
        log(f"note: {line}")
    stage = next((s for s in sim.stages if isinstance(s, CRFLClipNoise)), None)
    base = stage.clipped.to(sim.device, sim.w.dtype) if stage is not None and stage.clipped is not None else sim.w  # (D,)

    x, y = sim.x_test, sim.y_test
    xs, labels, names = [x], [y], ["clean"]
    hook = next((h for h in sim.pipeline.eval_hooks if isinstance(h, AttackSuccess)), None)
    if hook is not None:  # triggered test images whose true class is not the target (one-to-one: the source class)
        keep = (y == cfg.bd_source) if cfg.bd_source is not None else (y != cfg.bd_target)
        xs.append(apply_trigger(x[keep], hook.mask, hook.value))
        labels.append(y[keep])
        names.append("triggered")
    log(f"smoothing round {sim.round}'s {'clipped ' if stage is not None else ''}model: {o.samples} noisy copies, "
        f"sigma {sigma_T:g}, on {', '.join(f'{len(v)} {k}' for k, v in zip(names, labels))} test images")
    counts = smoothed_votes(sim, base, xs, sigma=sigma_T, samples=o.samples, batch=o.batch)
    params = sim.spec.unflatten(base)
    with torch.no_grad():
        base_preds = [torch.cat([functional_call(sim.model, params, (xi[lo : lo + cfg.eval_batch_size],)).argmax(1)
                                 for lo in range(0, len(xi), cfg.eval_batch_size)]) if len(xi) else torch.zeros(0, dtype=torch.long)
                      for xi in xs]
    sets = {k: set_result(c, yy, bp, terms, o.alpha) for k, c, yy, bp in zip(names, counts, labels, base_preds)}
    if "triggered" in sets:
        s = sets["triggered"]
        s["smoothed_asr"] = float((s["_pred"] == cfg.bd_target).double().mean()) if s["n"] else math.nan
    radii = list(o.radii) if o.radii else default_radii(sets)
    table = []
    for i, r in enumerate(radii):
        row: dict[str, Any] = {"radius": r}
        for k, s in sets.items():
            row[f"{k}_certified_accuracy"] = float(certified_accuracy(s["_radius"], [r], s["_correct"])[0])
            row[f"{k}_certified_rate"] = float(certified_accuracy(s["_radius"], [r])[0])
        table.append(row)
    for s in sets.values():
        for k in ("_radius", "_correct", "_pred"):
            s.pop(k)
    return {
        "run": str(run_dir), "round": sim.round, "crfl_trained": bool(cfg.crfl), "backdoor": cfg.bd_attack,
        "options": asdict(o), "theorem": terms, "notes": notes, "table": table, "sets": sets,
        "method": "CRFL (Xie et al. ICML 2021): parameter smoothing, one-sided Clopper-Pearson bounds at alpha/2 each",
    }


def write_outputs(result: dict[str, Any], json_path: Path) -> Path:
    """``certify.json`` at ``json_path`` and the table as ``certify.csv`` beside it; returns the CSV path."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, result)
    csv_path = json_path.with_suffix(".csv")
    cols = list(result["table"][0]) if result["table"] else ["radius"]
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(result["table"])
    return csv_path


def format_table(result: dict[str, Any]) -> str:
    """The certified accuracy of each set against the radius, as aligned text."""
    sets = list(result["sets"])
    head = ["radius"] + [f"{k} cert. acc" for k in sets]
    lines = ["  ".join(f"{h:>18}" for h in head)]
    for row in result["table"]:
        lines.append("  ".join([f"{row['radius']:>18.6g}"] + [f"{row[f'{k}_certified_accuracy']:>18.4f}" for k in sets]))
    summary = [f"{k}: smoothed acc {s['smoothed_acc']:.4f}, base acc {s['base_acc']:.4f}, abstained {s['abstained']:.4f}"
               + (f", smoothed asr {s['smoothed_asr']:.4f}" if "smoothed_asr" in s else "") for k, s in result["sets"].items()]
    return "\n".join(summary + lines)


__all__ = ["CertifyOptions", "certify", "check_options", "format_table", "load_run", "smoothed_votes", "theorem_terms", "write_outputs"]
