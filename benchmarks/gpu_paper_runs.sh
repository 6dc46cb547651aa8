#!/usr/bin/env bash
# The paper's full-length runs (200 epochs, paper preset = the authors' protocol) on a GPU:
# all seven optimizers on CURVES, MNIST and FACES, plus the identity controls of KFAC and
# KFAC-corrected. Resumable: finished runs in results/gpu-paper/<problem>/runs are kept.
#   usage: benchmarks/gpu_paper_runs.sh [device] [epochs]     (defaults: cuda 200)
# Each run writes runs/<optimizer>.iterations.csv (per-step per-pixel minibatch loss), so
# the summary's table sets our loss next to the authors' stored runs at equal iterations.
set -euo pipefail
DEVICE=${1:-cuda}
EPOCHS=${2:-200}
PY=${PY:-.venv/bin/python}
OPTS=kfac,kpsvd,deflation,kfac_corrected,lanczos,adam,sgd,identity_kfac,identity_kfac_corrected
for problem in curves mnist faces; do
  "$PY" -m kronfisher.cli compare --problem "$problem" --preset paper --epochs "$EPOCHS" \
    --optimizers "$OPTS" --device "$DEVICE" --no-progress \
    --out "results/gpu-paper/$problem"
done
