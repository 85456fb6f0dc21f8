"""``spfl run``: train one configuration, print a table at the end."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed
from ..config import Config
from ..errors import SpflError
from ..runner import default_run_dir, load_run_config, run
from .common import OneLineParser, add_config_flags, config_from_args, print_table


def cmd_run(argv: Sequence[str]) -> int:
    """``spfl run``. Under torchrun every process runs it: rank 0 alone prints and writes the run
    directory, and a rank that fails ends the job with its error (``distributed.exit_on_error``)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(distributed.exit_on_error("spfl run"))
        if not distributed.is_main():  # its errors still reach stderr
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        return run_command(argv)


def run_command(argv: Sequence[str]) -> int:
    p = OneLineParser(prog="spfl run", description="Train one federated configuration.")
    p.add_argument("--config", help="YAML/JSON file of flag values (command-line flags override it)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a checkpointed run (its config is reused)")
    add_config_flags(p)
    add_toolkit_flags(p)
    ns = p.parse_args(argv)

    if ns.resume:
        base = load_run_config(ns.resume).to_dict()
        given = {f.name: getattr(ns, f.name) for f in fields(Config) if f.name in vars(ns)}
        cfg = Config.from_dict({**base, **given})
        out = ns.resume
    else:
        cfg = config_from_args(ns)
        if cfg.out is None:
            cfg = cfg.replace(out=str(default_run_dir(cfg)))
        out = cfg.out

    def on_start_log(msg: str) -> None:
        print(msg, flush=True)

    print(f"spfl run: {cfg.dataset} / {cfg.model} / {cfg.partition_method} / {cfg.client_num_per_round} of {cfg.client_num_in_total} clients x {cfg.comm_round} rounds -> {out}")
    for note in toolkit_notes(ns, cfg):
        print(note, flush=True)
    wandb_run = start_wandb(ns, cfg, out) if distributed.is_main() else None

    def on_round(m: dict[str, Any]) -> None:
        if "test_acc" in m and not sys.stderr.isatty():
            print(f"round {m['round']:>4}  test_acc {m['test_acc']:.4f}  test_loss {m['test_loss']:.4f}  train_loss {m['train_loss']:.4f}  wall {m['wall_s']:.1f}s", flush=True)
        if wandb_run is not None:
            wandb_run.log({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=m["round"])

    try:
        hist = run(cfg, resume_dir=ns.resume, on_round=on_round, log=on_start_log)
    finally:
        if wandb_run is not None:
            wandb_run.finish()
    if ns.save_path and distributed.is_main():
        save_model(hist.model_state, ns.save_path)
    s = hist.summary
    print_table([
        ("dataset / model", f"{cfg.dataset} / {cfg.model} ({s['num_params']:,} params)"),
        ("engine / strategy", f"{s['engine']} / {s['strategy']} (chunk {s['client_chunk']}) on {s['device']}"),
        ("rounds", str(s["rounds"])),
        ("final test acc", f"{s['final_test_acc']:.4f}" if s["final_test_acc"] is not None else "-"),
        ("best test acc", f"{s['best_test_acc']:.4f}" if s["best_test_acc"] is not None else "-"),
        ("final test loss", f"{s['final_test_loss']:.4f}" if s["final_test_loss"] is not None else "-"),
        *([("epsilon", f"{s['epsilon']:.3f} (delta {s['privacy']['delta']:.2g})")] if "epsilon" in s else []),
        *([("epsilon per client", f"min {s['eps_min']:.3f} median {s['eps_median']:.3f} max {s['eps_max']:.3f}")] if "eps_max" in s and "eps_min" in s else []),
        *([("stopped", s["stopped"])] if s.get("stopped") else []),
        ("wall time", f"{s['wall_s']:.1f} s"),
        ("clients / s", f"{s['mean_clients_per_s']:.1f}" if s["mean_clients_per_s"] else "-"),
        ("run directory", str(out)),
    ])
    return 1 if s.get("diverged") else 0


# ---- the original toolkit's launcher flags -----------------------------------------------------
# Its scripts (test/*.sh) run ``mpirun ... main_fedavg.py FLAGS``; ``spfl run FLAGS`` must take
# them unchanged. Flags about processes and GPUs have no meaning in one vectorized process.
NO_MEANING = {
    "backend": "spfl runs every client in one process (no MPI backend)",
    "gpu_mapping_file": "spfl places all clients on --device (auto|cpu|cuda)",
    "gpu_mapping_key": "spfl places all clients on --device (auto|cpu|cuda)",
    "gpu_server_num": "spfl uses one device; see torch.distributed sharding for more",
    "gpu_num_per_server": "spfl uses one device; see torch.distributed sharding for more",
    "is_mobile": "no mobile clients in a simulator",
    "ci": "spfl has no CI shortcut mode; use fewer --comm_round for quick runs",
    "separate_client": "clients are always simulated together",
}


def add_toolkit_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("the original toolkit's launcher flags (accepted so its scripts run unchanged)")
    for name in NO_MEANING:
        g.add_argument(f"--{name}", dest=f"tk_{name}", nargs="?", const="1", default=None, help=argparse.SUPPRESS)
    g.add_argument("--num_worker", "--num_workers", dest="tk_num_worker", type=int, default=None,
                   help="the toolkit's worker count: MPI processes; here the clients per round")
    g.add_argument("--wandb-off", "--wandb_off", dest="wandb_off", action="store_true", help="do not log to Weights & Biases")
    g.add_argument("--wandb-name", "--wandb_name", dest="wandb_name", default=None, help="W&B run name")
    g.add_argument("--no_save_to_localfile", "--no-save-to-localfile", dest="tk_no_save_to_localfile", action="store_true",
                   help=argparse.SUPPRESS)
    g.add_argument("--save_path", "--save-path", dest="save_path", default=None, help="also save the final global model (state_dict) here")


def toolkit_notes(ns: argparse.Namespace, cfg: Config) -> list[str]:
    """One line for each toolkit flag given that has no meaning here."""
    notes = [f"note: --{k} ignored: {why}" for k, why in NO_MEANING.items() if getattr(ns, f"tk_{k}") is not None]
    if ns.tk_num_worker is not None and ns.tk_num_worker != cfg.client_num_per_round:
        notes.append(f"note: --num_worker {ns.tk_num_worker} ignored: {cfg.client_num_per_round} clients per round "
                     f"(--client_num_per_round) are trained together in one process")
    if cfg.backdoor_test:
        notes.append(f"note: --backdoor_test: each attacker (client index % {cfg.backdoor_test_frequency} == 0) trains once, on "
                     f"batches with {cfg.bd_poison_frac:g} of the samples poisoned, instead of the toolkit's clean and fully "
                     f"poisoned pair of models (spfl_vmap.modules.backdoor.toolkit_backdoor_test says why)")
    if cfg.data_recovery_protection and cfg.dataset in ("cifar10", "cifar100"):
        notes.append("note: --data_recovery_protection applies the ATS policies only; the toolkit's CIFAR pipeline also "
                     "crops, flips and cuts out (RandomCrop(32, 4), RandomHorizontalFlip, Cutout(16)), which is not done here")
    if ns.tk_no_save_to_localfile:
        notes.append("note: --no_save_to_localfile ignored: spfl always writes its run directory, the record of the run")
    return notes


def start_wandb(ns: argparse.Namespace, cfg: Config, out: str) -> Any:
    """A W&B run when wandb is installed and --wandb-off is absent (offline without an API key)."""
    if ns.wandb_off:
        return None
    try:
        import wandb  # optional
    except ImportError:
        if ns.wandb_name:
            print(f"note: wandb is not installed; --wandb-name ignored, metrics are in {out}/metrics.jsonl", flush=True)
        return None
    mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return wandb.init(project="spfl_vmap", name=ns.wandb_name, config=cfg.to_dict(), dir=out, mode=mode)


def save_model(state: dict[str, torch.Tensor], path: str) -> None:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, p)
    except OSError as e:
        raise SpflError(f"--save_path {path}: {e.strerror or e}") from None
    print(f"saved the final model to {p}", flush=True)
