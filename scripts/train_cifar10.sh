#!/bin/sh
# Reproduce models/cifar10.safetensors from ../shared/data on the CPU (docs/MODELS.md gives times and figures).
# Warm-started from the photo model of stage 2 (scripts/train_natural.sh), trained briefly on CIFAR-10 as it
# is, then grown (priors 48 -> 96 wide, checkerboard context) and trained on; the last two stages lower the
# learning rate's floor and train on. 5,000 of the 50,000 training images (500 per class) are held out for validation.
# The step counts and resume points are those of the shipped model's runs.
set -e
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cifar10/cifar10_train.zip}
[ -f runs/natural-2.safetensors ] || { echo "run the first two stages of scripts/train_natural.sh first" >&2; exit 1; }
idfzip train "$DATA" --config scripts/configs/cifar10-1.json --init-from runs/natural-2.safetensors \
    --out runs/cifar10-1.safetensors -f
idfzip train "$DATA" --config scripts/configs/cifar10-2.json --init-from runs/cifar10-1.safetensors \
    --out runs/cifar10.safetensors -f --steps 1000
idfzip train "$DATA" --config scripts/configs/cifar10-2.json --out runs/cifar10.safetensors --resume
idfzip train "$DATA" --config scripts/configs/cifar10-3.json --out runs/cifar10.safetensors --resume
idfzip train "$DATA" --config scripts/configs/cifar10-4.json --out runs/cifar10.safetensors --resume
cp runs/cifar10.safetensors models/cifar10.safetensors
