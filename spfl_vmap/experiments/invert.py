"""``spfl invert``: how much of their data can the server reconstruct from what clients upload?

The run's configuration builds a :class:`~spfl_vmap.Simulator` (model, data, partition and every
module's stages: a data-inference defense such as ATS is a batch transform of the pipeline, DP
and pruning are update stages). Then, at the run's global model (a fresh one, or a checkpoint
with ``--resume``):

1. choose ``M = num_images / B`` honest clients holding at least ``B`` samples, seeded by
   ``(seed, "invert-clients")``; each keeps its first ``B`` samples (its partition order);
2. compute what they would upload: the engine's own trainer (``builder.make_trainer``) trains
   them on those ``B`` samples with the pipeline's batch transforms, then the update stages
   (client-side defenses) run, exactly as in round ``r + 1`` of the run;
3. attack the ``[M, D]`` uploads in one batched optimization
   (:func:`spfl_vmap.attacks.inversion.invert`);
4. match reconstructions to originals and score them (PSNR, SSIM, labels), and write
   ``inversion.json`` and ``inversion.png``.

The attacker knows the architecture, the global parameters, ``B``, and for FedAvg the local
epochs, lr, momentum and weight decay. It models a local update as ``epochs * ceil(B /
batch_size)`` SGD steps on all ``B`` images; with ``B <= --batch_size`` (one step per epoch)
that is exactly what the trainer does, with a larger ``B`` it is an approximation (the client's
shuffled mini-batches are unknown to the server). It does not model the defenses: those are
what the attack is measured against.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..attacks.inversion import ATTACK_NAMES, DEFAULT_ITERATIONS, DEFAULT_TV, invert, pixel_box
from ..attacks.inversion_metrics import psnr, reconstruction_metrics, save_grid, to_unit
from ..builder import Simulator, make_trainer
from ..config import Config
from ..engine.local import apply_transforms
from ..errors import ConfigError
from ..modules.inference import fresh_uploads, upload_model
from ..rng import generator
from ..runner import describe_lines, write_json_atomic
from ..stages import BuildEnv

@dataclasses.dataclass(frozen=True)
class InvertSpec:
    """What ``spfl invert`` attacks and how."""

    attack: str = "ig"
    num_images: int = 8
    batch: int = 1
    restarts: int = 1
    iterations: int | None = None
    tv: float = DEFAULT_TV

    @property
    def problems(self) -> int:
        return self.num_images // self.batch


def check_spec(spec: InvertSpec, cfg: Config) -> None:
    """One-line errors for settings the attack cannot run with."""
    if spec.attack not in ATTACK_NAMES:
        raise ConfigError(f"unknown --attack {spec.attack!r}; choose one of: {', '.join(ATTACK_NAMES)}")
    for flag, v in (("--num_images", spec.num_images), ("--batch", spec.batch), ("--restarts", spec.restarts)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if spec.iterations is not None and spec.iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {spec.iterations}")
    if spec.num_images % spec.batch:
        raise ConfigError(f"--num_images {spec.num_images} must be a multiple of --batch {spec.batch} (images per client update)")
    if not (math.isfinite(spec.tv) and spec.tv >= 0):
        raise ConfigError(f"--tv must be a number >= 0, got {spec.tv}")
    if not cfg.use_gradient and cfg.client_optimizer != "sgd":
        raise ConfigError("spfl invert models a FedAvg client's local SGD steps; --client_optimizer adam is not modelled: "
                          "use sgd, or attack gradients with --use_gradient")


def choose_clients(sim: Simulator, round_idx: int, problems: int, batch: int, seed: int) -> list[int]:
    """``problems`` honest clients with at least ``batch`` samples, in a seeded random order."""
    K = len(sim.counts)
    malicious = sim.pipeline.adversary.malicious_mask(list(range(K)), round_idx)
    ok = [k for k in range(K) if sim.counts[k] >= batch and not bool(malicious[k])]
    if len(ok) < problems:
        raise ConfigError(f"only {len(ok)} honest clients hold >= {batch} samples; {problems} are needed "
                          f"(lower --num_images or --batch, or use fewer clients)")
    perm = torch.randperm(len(ok), generator=generator(seed, "invert-clients"))
    return sorted(ok[int(i)] for i in perm[:problems])


def client_uploads(sim: Simulator, ids: list[int], batch: int, round_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What clients ``ids`` upload in round ``round_idx`` when each holds its first ``batch``
    samples (:func:`spfl_vmap.modules.inference.fresh_uploads` at ``sim``'s global model).

    Returns:
        ``(U [M, D], x [M, B, C, H, W], y [M, B])``: the uploads and the clients' samples.
    """
    ds = sim.dataset
    env = BuildEnv(sim.model, sim.spec, sim.packed, sim.counts, ds.num_classes, tuple(ds.input_shape),
                   sum(sim.counts), sim.device, sim.x_test, sim.y_test)
    return fresh_uploads(sim.cfg, env, sim.pipeline, lambda e: make_trainer(sim.cfg, e, sim.pipeline),
                         sim.context(round_idx, ids), batch)


def trained_images(sim: Simulator, ids: list[int], x: torch.Tensor, y: torch.Tensor, round_idx: int) -> torch.Tensor:
    """The images clients ``ids`` trained on in round ``round_idx`` when each holds one sample:
    ``x [M, 1, C, H, W]`` through the pipeline's batch transforms (ATS), as the trainer applies
    them. Exact for one image per client: its draws are those of slot 0 of its only batch
    (:class:`~spfl_vmap.modules.inference.ATSTransform` hashes the round, the client, the sample
    and the slot).

    Returns:
        ``[M, 1, C, H, W]``.
    """
    ctx = sim.context(round_idx, ids)
    rows = torch.arange(len(ids), device=y.device)
    return apply_transforms(ctx, sim.pipeline.batch_transforms, x, y, rows)[0]


def run_invert(
    cfg: Config, spec: InvertSpec, out: Path, resume: str | Path | None = None, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Attack ``spec.num_images`` images of honest clients at the model of ``cfg`` (or of the
    checkpointed run ``resume``) and write ``inversion.json`` and ``inversion.png`` to ``out``.

    Returns:
        The contents of ``inversion.json``.
    """
    check_spec(spec, cfg)
    t0 = time.perf_counter()
    sim = Simulator(cfg.replace(progress=False))
    if resume is not None:
        sim.load_checkpoint(resume)
    r = sim.round + 1
    B, M = spec.batch, spec.problems
    ids = choose_clients(sim, r, M, B, cfg.seed)
    upload = upload_model(cfg, B)
    if upload.kind == "update" and B > cfg.batch_size:
        log(f"note: B={B} > --batch_size {cfg.batch_size}: the attacker models {upload.steps} full-batch steps in place of "
            f"the client's shuffled mini-batches")
    U, x, y = client_uploads(sim, ids, B, r)
    box = pixel_box(sim.dataset.x_train)
    iterations = spec.iterations or DEFAULT_ITERATIONS[spec.attack]
    log(f"spfl invert: {spec.attack} on {M} clients x {B} images, {spec.restarts} restarts, {iterations} iterations, "
        f"{upload.kind}s of {cfg.dataset} {cfg.model} at round {r - 1}")
    for line in describe_lines(sim.describe()):  # the defenses the uploads go through (ATS list, DP, ...)
        log(line)
    t1 = time.perf_counter()
    res = invert(spec.attack, sim.model, sim.global_params, U, num_images=B, input_shape=tuple(sim.dataset.input_shape),
                 upload=upload, restarts=spec.restarts, iterations=iterations, seed=cfg.seed, problem_ids=ids,
                 box=box, tv=spec.tv)
    attack_s = time.perf_counter() - t1
    rec01, orig01 = to_unit(res.x.detach(), box), to_unit(x, box)
    met = reconstruction_metrics(rec01, orig01, res.labels, y)
    # Under a batch transform (ATS) the client trained on transformed images; the metrics above
    # compare with the original, which is what the defense protects (ATS's evaluation). Against
    # the transformed images, the same reconstructions show what the attack itself recovered.
    vs_trained = None
    if sim.pipeline.batch_transforms and B == 1:
        xt01 = to_unit(trained_images(sim, ids, x, y, r), box)
        vs_trained = {k: reconstruction_metrics(rec01, xt01, res.labels, y)["mean"][k] for k in ("psnr", "ssim")}
    mean_img = to_unit(sim.dataset.x_train.mean(0), box).expand_as(orig01)  # the best data-independent guess
    baseline = float(psnr(mean_img.flatten(0, 1), orig01.flatten(0, 1)).mean())
    images = []
    rows = torch.arange(M)[:, None]
    matched = rec01.cpu()[rows, met["order"]]  # (M, B, C, H, W)
    for m in range(M):
        for b in range(B):
            images.append({
                "client": ids[m], "slot": b, "label": int(y[m, b]),
                "recovered_label": int(res.labels[m, int(met["order"][m, b])]),
                "label_correct": bool(met["label_correct"][m, b]),
                "psnr": float(met["psnr"][m, b]), "ssim": float(met["ssim"][m, b]), "failed": not bool(res.ok[m]),
            })
    report = {
        "attack": spec.attack, "num_images": spec.num_images, "batch": B, "restarts": spec.restarts,
        "iterations": iterations, "tv": spec.tv if spec.attack == "ig" else None,
        "upload": dataclasses.asdict(upload), "label_method": res.label_method, "round": r - 1,
        "resumed_from": str(resume) if resume is not None else None, "clients": ids,
        "mean": met["mean"], "baseline_mean_image_psnr": baseline, "mean_vs_trained_images": vs_trained,
        "failed_restarts": int(res.failed.sum()), "failed_problems": int((~res.ok).sum()),
        "attack_s": attack_s, "total_s": time.perf_counter() - t0,
        "config": cfg.to_dict(), "images": images,
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "inversion.json", report)
    caps = [f"{im['psnr']:.1f} dB" if math.isfinite(im["psnr"]) else "failed" for im in images]
    save_grid(orig01.cpu().flatten(0, 1), matched.flatten(0, 1), out / "inversion.png",
              f"{spec.attack}: {cfg.dataset} {cfg.model}, {M} x {B} images, mean PSNR {met['mean']['psnr']:.1f} dB", caps)
    return report
