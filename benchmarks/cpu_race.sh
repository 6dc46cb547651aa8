#!/usr/bin/env bash
# Issue 15's race at equal wall time on one CPU thread per process, for one problem and seed:
# tuned Adam first for N iterations, then the others with --time-budget = Adam's wall time at
# its N-th iteration (same data, init and minibatches). docs/results.md, "The race".
#   usage: benchmarks/cpu_race.sh PROBLEM SEED OUT [N] [OTHERS]
#     defaults: N = 3000 (curves) / 1000 (mnist, faces); OTHERS = lanczos,kpsvd,kfac,soap
# Then: python benchmarks/race_report.py OUT_seed0 OUT_seed1 ... --reference adam@LR
set -euo pipefail
PROBLEM=$1
SEED=$2
OUT=$3
case $PROBLEM in
  curves) ADAM=adam@0.003; N=${4:-3000} ;;
  mnist) ADAM=adam@0.001; N=${4:-1000} ;;
  faces) ADAM=adam@0.001; N=${4:-1000} ;;
  *) echo "unknown problem $PROBLEM" >&2; exit 2 ;;
esac
OTHERS=${5:-lanczos,kpsvd,kfac,soap}
PY=${PY:-.venv/bin/python}
COMMON=(--problem "$PROBLEM" --preset adaptive --seed "$SEED" --threads 1 --eval-subset 5000
        --no-progress)
"$PY" -m kronfisher.cli compare "${COMMON[@]}" --optimizers "$ADAM" --iterations "$N" \
  --out "$OUT/first"
CSV="$OUT/first/runs/$ADAM.iterations.csv"
T=$("$PY" - "$CSV" "$N" <<'PY'
import csv, math, sys
rows = list(csv.DictReader(open(sys.argv[1])))
n = int(sys.argv[2])
if len(rows) < n:
    sys.exit(f"{sys.argv[1]} has {len(rows)} iterations, fewer than {n}")
print(f"{math.ceil(float(rows[n - 1]['wall_time']) * 100) / 100:.2f}")  # never below T
PY
)
echo "time budget: $T s ($ADAM at iteration $N)"
"$PY" -m kronfisher.cli compare "${COMMON[@]}" --optimizers "$OTHERS" --time-budget "$T" \
  --out "$OUT/second"
mkdir -p "$OUT/runs"
cp "$OUT"/first/runs/*.iterations.csv "$OUT"/second/runs/*.iterations.csv "$OUT/runs/"
