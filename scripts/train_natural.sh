#!/bin/sh
# Reproduce models/natural.safetensors, the default photo model, from ../shared/data on the CPU.
# Stages, each warm-started from the one before (docs/MODELS.md gives times and figures):
#   1. the lifting flow and its priors; 2. channel-autoregressive means; 3. the checkerboard context, with a
#   moving average of the weights; 4. priors twice as deep (the new layers start as identities).
# Each stage exports its best validation checkpoint.
# The step counts are those of the shipped model's runs (stages 2 and 4 were stopped by time).
# A stage that was stopped continues with the same command plus --resume.
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cid22/training}
idfzip train "$DATA" --config scripts/configs/natural-1.json --out runs/natural-1.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-2.json --init-from runs/natural-1.safetensors \
    --out runs/natural-2.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-3.json --init-from runs/natural-2.safetensors \
    --out runs/natural-3.safetensors -f
idfzip train "$DATA" --config scripts/configs/natural-4.json --init-from runs/natural-3.safetensors \
    --out runs/natural.safetensors -f
cp runs/natural.safetensors models/natural.safetensors
