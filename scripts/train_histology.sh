#!/bin/sh
# Reproduce models/histology.safetensors from ../shared/data on the CPU (docs/MODELS.md, "histology", gives
# times and figures): the shipped natural model fine-tuned on the H&E tiles of histology-gbm40, the last 7 in
# sorted order (gbm34 .. gbm40, the test set) left out, 3 of the other 30 (gbm01, gbm17, gbm33) held out for
# validation. Stage 1 is zero-config training as a user runs it (10 minutes); stage 2 goes on from it with
# scripts/configs/histology.json (lr 3e-4 decaying, a short weight average), run as 1,000 steps and then twice
# more with --resume (to steps 1,500 and 2,598; --minutes bounds each run): the same command plus --resume
# continues it.
set -e
cd "$(dirname "$0")/.."
D=${SHARED:-../shared/data}
TILES=$(ls "$D"/histology-gbm40/gbm*.webp | sort | head -n 30)
# shellcheck disable=SC2086
idfzip train $TILES --minutes 10 --out runs/histology-1.safetensors -f
# shellcheck disable=SC2086
idfzip train $TILES --config scripts/configs/histology.json --init-from runs/histology-1.safetensors \
    --out runs/histology.safetensors -f --no-report "$@"
cp runs/histology.safetensors models/histology.safetensors
