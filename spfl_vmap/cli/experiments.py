"""``spfl matrix``, ``spfl privacy-curve``, ``spfl backdoor-curve`` and ``spfl bench``: argument
parsing over ``spfl_vmap.experiments``."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import torch

from ..aggregators import AGGREGATORS
from ..attacks import ATTACKS
from ..config import COMPILE_MODES, STRATEGIES
from ..errors import ConfigError, SpflError
from ..experiments.backdoor_curve import backdoor_curve, curve_configs, title_of, write_curve as write_backdoor_curve
from ..experiments.bench import bench_engine, bench_scale, format_rows, plot_scale
from ..experiments.bench_dist import bench_processes, workload_config
from ..experiments.matrix import (
    BD,
    attack_names,
    backdoor_name,
    check_axes,
    defense_names,
    run_matrix,
    split_params,
    write_outputs,
)
from ..experiments.privacy_curve import privacy_curve, write_curve
from ..models import MODELS
from ..modules.backdoor import defense as backdoor_defense
from ..modules.byzantine import num_byzantine
from ..modules.privacy import dp_mode
from .bench_backdoor import cmd_bench_backdoor
from .common import OneLineParser, add_config_flags, config_from_args, print_table, write_json_result
from .invert import cmd_bench_inversion


def cmd_matrix(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl matrix", description="Run every attack x defense pair. Backdoors use the prefix bd: on both axes, "
                      "e.g. --attacks none,bd:badnets --defenses mean,krum,bd:norm_bound --by_frac 0.2 --bd_clip 1; "
                      "backdoor rows add the attack success rate (asr) to the CSV, table and heatmap.")
    p.add_argument("--attacks", required=True,
                   help="comma-separated attacks (include none for the baseline): Byzantine attacks or bd:<backdoor attack> "
                        f"(--bd_attack); one of: {', '.join(attack_names())}")
    p.add_argument("--defenses", required=True,
                   help="comma-separated defenses: aggregators or bd:<backdoor defense stage> (--bd_defense, bounded by --bd_clip/"
                        f"--bd_noise, in front of --by_defense, default mean); one of: {', '.join(defense_names())}")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)

    attacks = [a.strip() for a in ns.attacks.split(",") if a.strip()]
    defenses = [d.strip() for d in ns.defenses.split(",") if d.strip()]
    check_axes(attacks, defenses)
    byz_attacks = [a for a in attacks if not backdoor_name(a)]
    bd_attacks = [backdoor_name(a) for a in attacks if backdoor_name(a)]
    attack_text, defense_text = getattr(ns, "by_attack_params", ""), getattr(ns, "by_defense_params", "")
    ns.by_attack_params = ns.by_defense_params = ""  # applied per pair below
    # the base carries the first backdoor attack so that its flags (--bd_boost ...) are validated
    first_bd = bd_attacks[0] if bd_attacks else "none"
    base = config_from_args(ns, extra_defaults={"bd_attack": first_bd})
    if base.bd_attack != first_bd:
        raise ConfigError(f"matrix sets --bd_attack per row: list backdoor attacks in --attacks as {BD}NAME instead")
    if backdoor_defense(base) != "none":
        raise ConfigError(f"matrix sets --bd_defense per column: list backdoor defenses in --defenses as {BD}NAME instead")
    # a bd: column aggregates with --by_defense: it takes --by_defense_params too
    aggregators = [d for d in defenses if not backdoor_name(d)]
    if any(backdoor_name(d) for d in defenses) and base.by_defense not in aggregators:
        aggregators.append(base.by_defense)
    attack_params = split_params(ATTACKS, byz_attacks, attack_text, "--by_attack_params") if byz_attacks else {}
    if attack_text and not byz_attacks:
        raise ConfigError("--by_attack_params: the matrix has no Byzantine attack to take them")
    defense_params = split_params(AGGREGATORS, aggregators, defense_text, "--by_defense_params")
    if num_byzantine(base) == 0 and any(a != "none" for a in byz_attacks):
        raise ConfigError("attacks need Byzantine clients: add --by_frac F or --by_workers K")
    out = Path(base.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-matrix")
    out.mkdir(parents=True, exist_ok=True)
    title = (f"{base.dataset} {base.model}, {base.client_num_per_round}/{base.client_num_in_total} clients, "
             f"{base.comm_round} rounds, {num_byzantine(base)} Byzantine, {base.partition_method}")
    rows = run_matrix(base, attacks, defenses, out, attack_params=attack_params, defense_params=defense_params)
    write_outputs(rows, attacks, defenses, out, title)
    print((out / "matrix.md").read_text())
    print_table([("csv", str(out / "matrix.csv")), ("heatmap", str(out / "matrix.png"))])
    return 0


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def cmd_backdoor_curve(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl backdoor-curve",
                      description="Sun et al. (2019), 'Can You Really Backdoor Federated Learning?': one run per (norm bound, noise) "
                                  "with --bd_defense norm_bound --bd_clip BOUND --bd_noise NOISE, plus an undefended baseline; "
                                  "plots the attack success rate and the accuracy against the bound (curve.csv, curve.md, curve.png). "
                                  "Needs --bd_attack and malicious clients (--by_frac or --by_workers).")
    p.add_argument("--bounds", required=True, help="comma-separated L2 norm bounds of a client update, e.g. 0.5,1,2,4")
    p.add_argument("--noises", default="0", help="comma-separated std of the Gaussian noise on the aggregate (weak DP), "
                                                 "e.g. 0,0.001,0.01 (default 0)")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)
    bounds, noises = _floats(ns.bounds, "--bounds"), _floats(ns.noises, "--noises")
    for flag in ("bd_defense", "bd_clip", "bd_noise"):
        if flag in vars(ns):
            raise ConfigError(f"--{flag} is set per run by --bounds and --noises: drop it")
    base = config_from_args(ns)
    out = Path(base.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-backdoor-curve")
    curve_configs(base, bounds, noises, out)  # every point validated before the directory is made
    out.mkdir(parents=True, exist_ok=True)
    rows = backdoor_curve(base, bounds, noises, out)
    write_backdoor_curve(rows, out, title_of(base))
    print((out / "curve.md").read_text())
    print_table([("csv", str(out / "curve.csv")), ("plot", str(out / "curve.png"))])
    return 0


def cmd_privacy_curve(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl privacy-curve", description="Train at each target epsilon and plot accuracy vs epsilon.")
    p.add_argument("--epsilons", required=True, help="comma-separated target epsilons, e.g. 0.5,1,2,4,8")
    p.add_argument("--config", help="YAML/JSON file of run flags")
    add_config_flags(p)
    ns = p.parse_args(argv)
    try:
        epsilons = [float(e) for e in ns.epsilons.split(",") if e.strip()]
    except ValueError:
        raise ConfigError(f"--epsilons must be numbers, got {ns.epsilons!r}") from None
    if not epsilons or any(not (math.isfinite(e) and e > 0) for e in epsilons):
        raise ConfigError("--epsilons must be positive numbers")
    base = config_from_args(ns)
    if dp_mode(base) == "none":
        raise ConfigError("privacy-curve needs --dp_mode example, user or local")
    out = Path(base.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-privacy-curve")
    out.mkdir(parents=True, exist_ok=True)
    rows = privacy_curve(base, sorted(epsilons), out)
    title = f"{base.dataset} {base.model}, dp_mode {dp_mode(base)}, {base.comm_round} rounds"
    write_curve(rows, out, title)
    print_table([(f"eps {r['target_epsilon']}", f"acc {r['final_test_acc']:.4f}  sigma {r['noise_multiplier']:.3f}") for r in rows]
                + [("csv", str(out / "privacy_curve.csv")), ("plot", str(out / "privacy_curve.png"))])
    return 0


def _shape(s: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {s!r}") from None
    return c, h, w


def _ints(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {s!r}") from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lr", help="model name (default lr)")
    p.add_argument("--steps", type=int, default=5, help="local steps per client (each client holds steps*B samples)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=10, help="local batch size B")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default) or a real dataset such as fashion_mnist")
    p.add_argument("--data_dir", "--data-dir", default="./data", help="root of real datasets")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine (medians are reported)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")


def _setup_threads(n: int) -> None:
    if n:
        torch.set_num_threads(n)


def _check_model(model: str) -> None:
    if model not in MODELS:
        raise ConfigError(f"unknown model {model!r}; choose one of: {', '.join(MODELS.names())}")


def cmd_bench_engine(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench engine", description="Vectorized engine vs the per-client reference loop on one workload.")
    _common(p)
    p.add_argument("--clients", type=int, required=True, help="clients in total")
    p.add_argument("--per_round", "--per-round", type=int, default=None, help="clients per round (default: all)")
    p.add_argument("--input_shape", "--input-shape", type=_shape, default=None, help="C,H,W of synthetic data (default 1,28,28)")
    p.add_argument("--strategies", default="auto", help="comma-separated vectorized strategies to time (default auto), e.g. auto,vmap,loop")
    p.add_argument("--no_loop", "--no-loop", action="store_true", help="skip the reference loop")
    p.add_argument("--partition", choices=("homo", "hetero"), default="homo",
                   help="homo: every client takes --steps full batches; hetero: Dirichlet(--alpha) split of the whole dataset (unequal clients)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of --partition hetero")
    p.add_argument("--compile", default="trace", help="comma-separated --compile modes to time side by side, e.g. off,trace")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    ns = p.parse_args(argv)
    _check_model(ns.model)
    compiles = [c for c in ns.compile.split(",") if c]
    if not compiles or any(c not in COMPILE_MODES for c in compiles):
        raise ConfigError(f"--compile must be a comma-separated subset of {COMPILE_MODES}, got {ns.compile!r}")
    if ns.repeats < 1:
        raise ConfigError("--repeats must be >= 1")
    strategies = [s for s in ns.strategies.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        raise ConfigError(f"--strategies must be a comma-separated subset of {STRATEGIES}, got {ns.strategies!r}")
    _setup_threads(ns.threads)
    device = "cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device)
    res = bench_engine(
        ns.model, ns.clients, ns.per_round, ns.steps, ns.batch_size, device, ns.dataset, ns.input_shape,
        strategies, ns.repeats, not ns.no_loop, ns.data_dir, ns.partition, ns.alpha, compiles,
    )
    c = res["config"]
    work = (f"{c['per_round']} of {ns.clients} Dirichlet({ns.alpha}) clients (samples min/median/max "
            f"{'/'.join(map(str, c['client_samples_min_median_max']))}), {c['client_steps_per_round']} client-steps"
            if ns.partition == "hetero" else f"{c['per_round']} clients x {c['steps']} steps")
    print(
        f"spfl bench engine: {c['model']} ({c['num_params']:,} params) on {c['dataset']} {tuple(c['input_shape'])}, "
        f"{work} x batch {c['batch_size']}, {c['device']}, "
        f"{c['threads']} threads, median of {c['repeats']} alternating calls"
    )
    print(format_rows(res["rows"]))
    write_json_result(ns.json, res)
    return 0


def cmd_bench_scale(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl bench scale", description="Time per round and clients/s against cohort size.")
    _common(p)
    p.set_defaults(steps=1)
    p.add_argument("--clients", type=_ints, default=[10, 100, 1000, 10000], help="comma-separated cohort sizes")
    p.add_argument("--loop_max", "--loop-max", type=int, default=1000, help="largest cohort the reference loop runs")
    p.add_argument("--out", default="bench/results/scale", help="directory for scale.json and scale.png")
    p.add_argument("--nproc", type=_ints, default=None,
                   help="comma-separated process counts, e.g. 1,2,4: whole rounds under torchrun with the clients sharded "
                        "over P processes (OMP threads per process: --threads, default 1); per-round time and peak memory per rank")
    p.add_argument("--by_attack", default="none", help="with --nproc: a Byzantine attack in the timed rounds (e.g. alie)")
    p.add_argument("--by_defense", default="mean", help="with --nproc: the aggregator (default mean)")
    p.add_argument("--by_frac", type=float, default=0.0, help="with --nproc: the malicious share of each cohort (per_round mode)")
    p.add_argument("--dist_gather", action="store_true", help="with --nproc: gather all of U in every process (the comparison)")
    ns = p.parse_args(argv)
    _check_model(ns.model)
    if not ns.clients or min(ns.clients) < 1:
        raise ConfigError("--clients must list cohort sizes >= 1")
    device = "cuda" if ns.device == "auto" and torch.cuda.is_available() else ("cpu" if ns.device == "auto" else ns.device)
    if ns.nproc is not None:
        return bench_scale_processes(ns, device)
    _setup_threads(ns.threads)
    print(f"spfl bench scale: {ns.model}, {ns.steps} steps x batch {ns.batch_size}, {device}, {torch.get_num_threads()} threads")
    rows = bench_scale(ns.model, ns.clients, ns.steps, ns.batch_size, device, ns.dataset, ns.loop_max, ns.repeats, log=lambda s: print(s, flush=True))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": ns.model, "steps": ns.steps, "batch_size": ns.batch_size, "device": device, "dataset": ns.dataset,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    (out / "scale.json").write_text(json.dumps({"config": meta, "rows": rows}, indent=2))
    plot_scale(rows, out / "scale.png", f"{ns.model} on {device}: {ns.steps} local steps x batch {ns.batch_size}")
    print(f"wrote {out / 'scale.json'} and {out / 'scale.png'}")
    return 0


def bench_scale_processes(ns: argparse.Namespace, device: str) -> int:
    """``spfl bench scale --nproc``: one torchrun job per process count and cohort size."""
    if not ns.nproc or min(ns.nproc) < 1 or ns.repeats < 1:
        raise ConfigError("--nproc must list process counts >= 1, and --repeats must be >= 1")
    if ns.dataset != "synthetic":
        raise ConfigError("--nproc runs on synthetic data (the homo workload of --clients x --steps x --batch_size)")
    threads = ns.threads or 1
    byz = {"by_attack": ns.by_attack, "by_defense": ns.by_defense, "by_frac": ns.by_frac, "by_mode": "per_round",
           "dist_gather": ns.dist_gather}
    for n in ns.clients:  # the flags' own checks, before any process starts
        workload_config(ns.model, n, ns.steps, ns.batch_size, 1, device, **byz)
    print(f"spfl bench scale: {ns.model}, {ns.steps} steps x batch {ns.batch_size}, {device}, processes {ns.nproc}, "
          f"{threads} thread(s) each, median of {ns.repeats} rounds, attack {ns.by_attack}, aggregator {ns.by_defense}")
    rows = bench_processes(ns.model, ns.clients, ns.nproc, ns.steps, ns.batch_size, device, ns.repeats, threads,
                           log=lambda s: print(s, flush=True), overrides=byz)
    meta = {"model": ns.model, "steps": ns.steps, "batch_size": ns.batch_size, "device": device, "threads_per_process": threads,
            "rounds_timed": ns.repeats, "torch": torch.__version__, **byz}
    write_json_result(str(Path(ns.out) / "scale_nproc.json"), {"config": meta, "rows": rows})
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    subs = {"engine": cmd_bench_engine, "scale": cmd_bench_scale, "backdoor": cmd_bench_backdoor, "inversion": cmd_bench_inversion}
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: spfl bench engine|scale|backdoor|inversion [flags]   (spfl bench engine --help)")
        return 0 if argv else 2
    if argv[0] not in subs:
        raise SpflError(f"unknown bench {argv[0]!r}; choose one of: {', '.join(subs)}")
    return subs[argv[0]](list(argv[1:]))
