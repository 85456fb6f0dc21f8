"""``spfl invert`` and ``spfl bench inversion``: argument parsing over
``spfl_vmap.experiments.invert`` and ``spfl_vmap.experiments.inversion_bench``."""

from __future__ import annotations

import json
import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Sequence

import torch

from ..attacks.inversion import ATTACK_NAMES, DEFAULT_ITERATIONS, DEFAULT_TV
from ..config import Config
from ..errors import ConfigError
from ..experiments.invert import InvertSpec, run_invert
from ..experiments.inversion_bench import bench_inversion, format_inversion_rows
from ..runner import load_run_config
from .common import OneLineParser, add_config_flags, config_from_args, print_table


def cmd_invert(argv: Sequence[str]) -> int:
    p = OneLineParser(
        prog="spfl invert",
        description="Gradient inversion: attack what honest clients would upload at the run's model (fresh, or a checkpoint "
                    "with --resume), with every spfl run flag (model, data, training, and defenses such as DP or ATS). "
                    "Writes inversion.json (per image PSNR, SSIM, label correct; means) and inversion.png to --out.")
    p.add_argument("--attack", choices=ATTACK_NAMES, default="ig",
                   help="dlg (Zhu et al. 2019), idlg (Zhao et al. 2020) or ig (Geiping et al. 2020); default ig")
    p.add_argument("--num_images", "--num-images", type=int, default=8, help="images attacked in all (default 8)")
    p.add_argument("--batch", type=int, default=1, help="images behind each client's upload, B (default 1)")
    p.add_argument("--restarts", type=int, default=1, help="random starts per upload; the best is kept (default 1)")
    p.add_argument("--iterations", type=int, default=None,
                   help="optimizer iterations (default: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_ITERATIONS.items()) + ")")
    p.add_argument("--tv", type=float, default=DEFAULT_TV, help=f"ig's total-variation weight (default {DEFAULT_TV:g})")
    p.add_argument("--resume", metavar="RUN_DIR", help="attack at this checkpointed run's model (its config is reused; "
                                                       "flags given here override it, e.g. a defense)")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)
    if ns.resume:
        base = load_run_config(ns.resume).to_dict()
        given = {f.name: getattr(ns, f.name) for f in fields(Config) if f.name in vars(ns)}
        base["out"] = None  # the run's own directory is not where the attack writes
        cfg = Config.from_dict({**base, **given})
    else:
        cfg = config_from_args(ns)
    spec = InvertSpec(ns.attack, ns.num_images, ns.batch, ns.restarts, ns.iterations, ns.tv)
    out = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-invert-{spec.attack}")
    rep = run_invert(cfg, spec, out, resume=ns.resume, log=lambda s: print(s, flush=True))

    def f(v: float | None, fmt: str) -> str:
        return format(v, fmt) if v is not None and math.isfinite(v) else "n/a"

    m = rep["mean"]
    rows = [
        ("attack", f"{rep['attack']} ({rep['label_method']} labels), {rep['iterations']} iterations, {rep['restarts']} restarts"),
        ("images", f"{rep['num_images']} = {len(rep['clients'])} clients x {rep['batch']}"),
        ("mean PSNR", f"{f(m['psnr'], '.2f')} dB (dataset-mean image: {f(rep['baseline_mean_image_psnr'], '.2f')} dB)"),
        ("mean SSIM", f(m["ssim"], ".3f")),
        ("label accuracy", f(m["label_acc"], ".3f")),
        ("failed", f"{rep['failed_problems']} uploads, {rep['failed_restarts']} restarts"),
        ("attack time", f"{rep['attack_s']:.1f} s"),
        ("json", str(out / "inversion.json")),
        ("grid", str(out / "inversion.png")),
    ]
    t = rep["mean_vs_trained_images"]
    if t is not None:  # a batch transform (ATS): the same reconstructions against what the clients trained on
        rows.insert(4, ("vs trained images", f"PSNR {f(t['psnr'], '.2f')} dB, SSIM {f(t['ssim'], '.3f')} (the transformed "
                                             f"images the clients trained on)"))
    print_table(rows)
    return 0


def _shape(s: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in s.split(","))
    except ValueError:
        raise ConfigError(f"--input_shape must be C,H,W such as 1,28,28, got {s!r}") from None
    return c, h, w


def cmd_bench_inversion(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench inversion",
                      description="The batched inversion attack (M problems x R restarts in one optimization) against a Python "
                                  "loop over the same problems and restarts, median of alternating calls.")
    p.add_argument("--attack", choices=ATTACK_NAMES, default="ig")
    p.add_argument("--model", default="lr", help="model name (default lr)")
    p.add_argument("--input_shape", "--input-shape", default="1,28,28", help="C,H,W (default 1,28,28)")
    p.add_argument("--problems", type=int, default=16, help="uploads attacked, M (default 16)")
    p.add_argument("--restarts", type=int, default=4, help="restarts per upload, R (default 4)")
    p.add_argument("--batch", type=int, default=1, help="images per upload, B (default 1)")
    p.add_argument("--iterations", type=int, default=20, help="attack iterations per call (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per variant (medians are reported)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ns = p.parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but CUDA is not available on this machine")
    res = bench_inversion(ns.attack, ns.model, _shape(ns.input_shape), ns.problems, ns.restarts, ns.batch, ns.iterations,
                          ns.repeats, ns.device, log=lambda s: print(s, flush=True))
    c = res["config"]
    print(f"spfl bench inversion: {c['attack']} on {c['model']} {tuple(c['input_shape'])}, {c['problems']} uploads x "
          f"{c['restarts']} restarts x {c['batch']} images, {c['iterations']} iterations, {c['device']}, {c['threads']} threads, "
          f"median of {c['repeats']} alternating calls")
    print(format_inversion_rows(res))
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {ns.json}")
    return 0
