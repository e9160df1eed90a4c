#!/bin/sh
# Reproduce models/natural.safetensors, the default photo model, from ../shared/data on the CPU.
# Stages, each warm-started from the one before (docs/MODELS.md gives times and figures):
#   1. the lifting flow and its priors; 2. channel-autoregressive means; 3. the checkerboard context, with a
#   moving average of the weights; 4. priors twice as deep (the new layers start as identities; this was the
#   first shipped natural, now natural-v1); 5. the same network trained on every photo source of ../shared/data
#   (CID22 training and validation, the CLIC 2025 crops), native-resolution crops held out for validation.
# Each stage exports its best validation checkpoint.
# The step counts are those of the shipped model's runs (stages 2 and 4 were stopped by time).
# A stage that was stopped continues with the same command plus --resume.
set -e
cd "$(dirname "$0")/.."
D=${SHARED:-../shared/data}
DATA=${DATA:-$D/cid22/training}
idfzip train "$DATA" --config scripts/configs/natural-1.json --out runs/natural-1.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-2.json --init-from runs/natural-1.safetensors \
    --out runs/natural-2.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-3.json --init-from runs/natural-2.safetensors \
    --out runs/natural-3.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-4.json --init-from runs/natural-3.safetensors \
    --out runs/natural-4.safetensors -f
# stage 5: every photo source, the native-resolution validation split held out (scripts/photo_data.sh)
PHOTOS=$(scripts/photo_data.sh "$D")  # an assignment, so that set -e stops on a missing folder
# shellcheck disable=SC2086
idfzip train $PHOTOS \
    --config scripts/configs/natural-5.json --init-from runs/natural-4.safetensors --out runs/natural.safetensors -f
cp runs/natural.safetensors models/natural.safetensors
