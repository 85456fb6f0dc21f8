#!/usr/bin/env bash
# Issue 13, must-show "Sweep timing": one `spfl sweep` of 8 learning rates against the same 8
# runs as separate `spfl run` processes (one after another), on FashionMNIST `lr`, 100 clients,
# 10 per round, 30 rounds. Prints both wall times, their ratio (the issue asks <= 1/4) and each
# point's final test accuracy from both (the issue asks for the same accuracies).
#
#   bench/sweep_timing.sh                 # the issue's command
#   ROUNDS=3 bench/sweep_timing.sh        # a quick smoke test of this script
#
# FashionMNIST is found as `spfl run` finds it: ./data, else Debian's /usr/share/datasets/fashion-mnist.
set -euo pipefail
REPO=${REPO:-$(cd "$(dirname "$0")/.." && pwd)}
SPFL=${SPFL:-$REPO/.venv/bin/spfl}
ROUNDS=${ROUNDS:-30}
LRS=${LRS:-0.01,0.02,0.03,0.05,0.1,0.2,0.3,0.5}
OUT=${OUT:-$REPO/runs/sweep_timing}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
COMMON=(--dataset fashion_mnist --model lr --client_num_in_total 100 --client_num_per_round 10 --comm_round "$ROUNDS" --no-progress)

rm -rf "$OUT"
mkdir -p "$OUT"
cd "$REPO"

echo "== spfl sweep --grid lr=$LRS ${COMMON[*]}"
t0=$(date +%s.%N)
"$SPFL" sweep --grid "lr=$LRS" "${COMMON[@]}" --out "$OUT/sweep" | tee "$OUT/sweep.log"
t1=$(date +%s.%N)
sweep_s=$(echo "$t1 - $t0" | bc -l)

echo "== 8 separate spfl run processes"
t0=$(date +%s.%N)
for lr in ${LRS//,/ }; do
  "$SPFL" run --lr "$lr" "${COMMON[@]}" --wandb-off --out "$OUT/runs/lr=$lr" > "$OUT/runs-lr=$lr.log"
done
t1=$(date +%s.%N)
runs_s=$(echo "$t1 - $t0" | bc -l)

SWEEP_S=$sweep_s RUNS_S=$runs_s OUT=$OUT "$REPO/.venv/bin/python" - <<'EOF'
import csv, json, os
from pathlib import Path
out = Path(os.environ["OUT"])
sweep_s, runs_s = float(os.environ["SWEEP_S"]), float(os.environ["RUNS_S"])
rows = list(csv.DictReader(open(out / "sweep" / "sweep.csv")))
print(f"\n| lr | sweep final test_acc | spfl run final test_acc | abs diff | sweep mode |\n|---|---|---|---|---|")
worst = 0.0
for r in rows:
    s = json.loads((out / "runs" / f"lr={r['lr']}" / "summary.json").read_text())
    a, b = float(r["final_test_acc"]), s["final_test_acc"]
    worst = max(worst, abs(a - b))
    print(f"| {r['lr']} | {a:.4f} | {b:.4f} | {abs(a - b):.1e} | {r['mode']} |")
print(f"\nsweep (one process): {sweep_s:.1f} s; 8 separate spfl run processes: {runs_s:.1f} s; "
      f"ratio {sweep_s / runs_s:.3f} (issue: <= 0.25); largest accuracy difference {worst:.1e}")
EOF
