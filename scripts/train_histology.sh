#!/bin/sh
# Reproduce models/histology.safetensors from ../shared/data on the CPU (docs/MODELS.md, "histology", gives
# times and figures): the shipped natural model fine-tuned on the H&E tiles of histology-gbm40, the last 7 in
# sorted order (gbm34 .. gbm40, the test set) left out, 3 of the other 30 held out for validation.
# The run was stopped by time; the same command plus --resume continues it.
set -e
cd "$(dirname "$0")/.."
D=${SHARED:-../shared/data}
# shellcheck disable=SC2046
idfzip train $(ls "$D"/histology-gbm40/gbm*.webp | sort | head -n 30) --config scripts/configs/histology.json \
    --init-from models/natural.safetensors --out runs/histology.safetensors -f --no-report "$@"
cp runs/histology.safetensors models/histology.safetensors
