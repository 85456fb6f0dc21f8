"""Data-inference defense table (issue 12): PSNR / SSIM / label accuracy of `ig` and `idlg` against
each defense, plus the test-accuracy cost of each defense, on FashionMNIST with `cnn`.

Runs one command at a time (OMP_NUM_THREADS=1), skips a command whose output already exists, and
writes docs/results/data_inference_fashion_mnist_cnn.{csv,md}.

    python3 bench/data_inference_table.py [--dry]       (from the repository root; outputs under
                                                         $SPFL_TABLE_DIR, default runs/data_inference_table)
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXP = Path(os.environ.get("SPFL_TABLE_DIR", REPO / "runs" / "data_inference_table"))
RESULTS = REPO / "docs" / "results"
STEM = "data_inference_fashion_mnist_cnn"

# the attack: 8 single-image FedAvg uploads (1 local SGD step, lr 0.03) at the untrained model, 1 restart
INVERT = ["--dataset", "fashion_mnist", "--model", "cnn", "--num_images", "8", "--batch", "1"]
ITERATIONS = {"ig": 300, "idlg": 300}
# the accuracy cost: FedAvg, 100 Dirichlet(0.5) clients, 10 per round, 20 rounds, seed 0
RUN = ["--dataset", "fashion_mnist", "--model", "cnn", "--client_num_in_total", "100", "--client_num_per_round", "10",
       "--comm_round", "20", "--frequency_of_the_test", "10", "--seed", "0"]

# (key, label, flags for both commands, extra flags for the run only)
DEFENSES = [
    ("none", "no defense", [], []),
    ("ats_augid0", "ATS, `--augid 0` (policy 11-37-12)", ["--data_recovery_protection", "--augid", "0"], []),
    ("ats_topn3", "ATS, `--topn 3` (hybrid of 11-37-12, 27-4-37, 45-38-15)", ["--data_recovery_protection", "--topn", "3"], []),
    ("soteria", "Soteria, 60% of the features", ["--soteria_rate", "0.6"], ["--soteria_samples", "2"]),
    ("prune", "gradient pruning, 60% per layer", ["--grad_prune", "0.6"], []),
    ("dp_local", "local DP, clip 1, sigma 0.001", ["--dp_mode", "local", "--grad_norm", "1", "--dp_sigma", "0.001"], []),
]
ATTACKS = ("ig", "idlg")


def spfl(args: list[str]) -> str:
    return "spfl " + " ".join(args)


def invert_args(attack: str, flags: list[str], out: Path) -> list[str]:
    return ["invert", *INVERT, "--attack", attack, "--iterations", str(ITERATIONS[attack]), *flags, "--out", str(out)]


def run_args(flags: list[str], extra: list[str], out: Path) -> list[str]:
    return ["run", *RUN, *flags, *extra, "--out", str(out), "--no-progress"]


def execute(args: list[str], done: Path, log: Path, dry: bool) -> None:
    if done.is_file():
        return
    print(f"$ {spfl(args)}", flush=True)
    if dry:
        return
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        rc = subprocess.call([str(REPO / ".venv/bin/spfl"), *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
    print(f"  rc {rc}, {time.time() - t0:.0f} s", flush=True)
    if rc != 0:
        sys.exit(f"failed: see {log}")


def shown(args: list[str]) -> str:
    """The command as a reader types it: no --out/--no-progress."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a == "--out":
            skip = True
            continue
        if a != "--no-progress":
            out.append(a)
    return spfl(out)


def main() -> None:
    dry = "--dry" in sys.argv
    rows = []
    for key, label, flags, extra in DEFENSES:
        row = {"defense": key, "label": label, "flags": " ".join(flags)}
        for attack in ATTACKS:
            out = EXP / "inv" / f"{attack}_{key}"
            args = invert_args(attack, flags, out)
            execute(args, out / "inversion.json", EXP / "inv" / f"{attack}_{key}.log", dry)
            row[f"{attack}_cmd"] = shown(args)
            if not dry:
                rep = json.loads((out / "inversion.json").read_text())
                m = rep["mean"]
                row.update({f"{attack}_psnr": m["psnr"], f"{attack}_ssim": m["ssim"], f"{attack}_label_acc": m["label_acc"],
                            f"{attack}_attack_s": rep["attack_s"], "mean_image_psnr": rep["baseline_mean_image_psnr"]})
                t = rep.get("mean_vs_trained_images")  # ATS: the same reconstructions against the transformed images
                row[f"{attack}_psnr_vs_trained"] = t["psnr"] if t else None
        out = EXP / "acc" / key
        args = run_args(flags, extra, out)
        execute(args, out / "summary.json", EXP / "acc" / f"{key}.log", dry)
        row["run_cmd"] = shown(args)
        if not dry:
            s = json.loads((out / "summary.json").read_text())
            row.update(test_acc=s["final_test_acc"], run_wall_s=s["wall_s"], eps=s.get("eps_max", s.get("epsilon")))
        rows.append(row)
    if dry:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(RESULTS / f"{STEM}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    base = rows[0]["test_acc"]
    lines = [
        f"FashionMNIST, `cnn`. Attacks: {INVERT[5]} single-image FedAvg uploads (1 local SGD step, lr 0.03) at the untrained "
        f"model, 1 restart, `ig` {ITERATIONS['ig']} and `idlg` {ITERATIONS['idlg']} iterations; PSNR and SSIM against the "
        f"original (untransformed) images. Test accuracy: `spfl run`, 100 Dirichlet(0.5) clients, 10 per round, "
        f"20 rounds, seed 0. Dataset-mean image: {rows[0]['mean_image_psnr']:.1f} dB.",
        "",
        "| defense | ig PSNR (dB) | ig SSIM | ig label acc | idlg PSNR (dB) | idlg SSIM | idlg label acc | test acc (Δ points) "
        "| ig / idlg PSNR vs the transformed images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r is rows[0] else f" ({100 * (r['test_acc'] - base):+.1f})"
        vs = f"{r['ig_psnr_vs_trained']:.1f} / {r['idlg_psnr_vs_trained']:.1f}" if r["ig_psnr_vs_trained"] is not None else ""
        lines.append(f"| {r['label']} | {r['ig_psnr']:.1f} | {r['ig_ssim']:.3f} | {r['ig_label_acc']:.2f} | {r['idlg_psnr']:.1f} | "
                     f"{r['idlg_ssim']:.3f} | {r['idlg_label_acc']:.2f} | {r['test_acc']:.3f}{delta} | {vs} |")
    lines += ["", "Published references, on other setups: iDLG recovers single-image labels 100% of the time (LeNet, MNIST "
              "and CIFAR-100; PatrickZH/Improved-Deep-Leakage-from-Gradients, Table 1); breaching's DLG on a CIFAR-10 ConvNet "
              "reaches PSNR 23.4 dB (its example notebook). LPIPS is left out: its implementations download a pretrained "
              "backbone. The must-show pair (`ig`, 4800 iterations): 59.5 dB without a defense, 11.6 dB with "
              "`--data_recovery_protection --augid 0` (the two `spfl invert` commands without `--iterations`)."]
    lines += ["", "Commands (each table row: the `ig` and `idlg` attack, then the accuracy run):", "", "```bash"]
    for r in rows:
        lines += [r["ig_cmd"], r["idlg_cmd"], r["run_cmd"]]
    lines += ["```", ""]
    (RESULTS / f"{STEM}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
