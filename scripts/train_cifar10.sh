#!/bin/sh
# Reproduce models/cifar10.safetensors from ../shared/data on the CPU (docs/MODELS.md gives times and figures).
# Warm-started from the photo model of stage 2 (scripts/train_natural.sh), then grown: wider priors (96) and
# the checkerboard context. 5,000 of the 50,000 training images (500 per class) are held out for validation.
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10/cifar10_train.zip}
[ -f runs/natural-2.safetensors ] || { echo "run the first two stages of scripts/train_natural.sh first" >&2; exit 1; }
idfzip train "$DATA" --config scripts/configs/cifar10-1.json --init-from runs/natural-2.safetensors \
    --out runs/cifar10-1.safetensors -f
idfzip train "$DATA" --config scripts/configs/cifar10-2.json --init-from runs/cifar10-1.safetensors \
    --out runs/cifar10.safetensors -f
cp runs/cifar10.safetensors models/cifar10.safetensors
