#!/bin/sh
# Reproduce models/grey.safetensors, the greyscale (L) model, from ../shared/data and the first natural model
# (shipped as natural-v1) on the CPU. One stage: the architecture of natural with one channel and no colour
# transform, started from natural's luma (idfzip.train.grey_of: its couplings' and priors' weights to and from
# Y), trained on every photo source as L (Pillow's ITU-R 601 luma). The native-resolution validation split of
# docs/MODELS.md (the first 27 CLIC 2025 crops in sorted order: all 3 crops of 9 photos) is given last, so that
# the config's val_images = 27 holds it out. docs/MODELS.md gives the time and figures; continue a stopped run
# with the same command plus --resume (the shipped file: 6,500 steps, then --resume to 15,750 and to 17,250).
set -e
cd "$(dirname "$0")/.."
D=${DATA:-../shared/data}
CLIC=$(ls "$D"/clic2025-validation/*.webp | sort)
# shellcheck disable=SC2046,SC2086
idfzip train "$D/cid22/training" "$D/cid22/validation" $(echo "$CLIC" | tail -n +28) $(echo "$CLIC" | head -27) \
    --config scripts/configs/grey-1.json --init-from models/natural-v1.safetensors --out runs/grey.safetensors -f "$@"
cp runs/grey.safetensors models/grey.safetensors
