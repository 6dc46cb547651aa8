#!/usr/bin/env bash
# The race of issue 15 on a GPU, in under 10 minutes: the `adaptive` preset's five methods
# against tuned Adam and SOAP on CURVES and MNIST, one seed, 1,000 iterations each
# (absolute times there; docs/results.md gets them when a GPU is lent). Data must be in the
# cache first (`kronfisher data curves`, `kronfisher data mnist`: the device has no network).
#   usage: benchmarks/gpu_race.sh [device] [iterations] [out]    (defaults: cuda 1000 results/gpu-race)
# Then: python benchmarks/race_report.py results/gpu-race/curves  (and .../mnist)
set -euo pipefail
DEVICE=${1:-cuda}
ITERS=${2:-1000}
OUT=${3:-results/gpu-race}
PY=${PY:-.venv/bin/python}
for problem in curves mnist; do
  case $problem in
    curves) ADAM=adam@0.003 ;;
    mnist) ADAM=adam@0.001 ;;
  esac
  "$PY" -m kronfisher.cli compare --problem "$problem" --preset adaptive --iterations "$ITERS" \
    --optimizers "kfac,kpsvd,deflation,kfac_corrected,lanczos,$ADAM,soap" --device "$DEVICE" \
    --eval-subset 5000 --no-progress --out "$OUT/$problem"
done
