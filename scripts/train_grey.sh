#!/bin/sh
# Reproduce models/grey.safetensors, the greyscale (L) model, from ../shared/data and the first natural model
# (shipped as natural-v1) on the CPU. One stage: the architecture of natural with one channel and no colour
# transform, started from natural's luma (idfzip.train.grey_of: its couplings' and priors' weights to and from
# Y), trained on every photo source as L (Pillow's ITU-R 601 luma), with the native-resolution validation split
# held out (scripts/photo_data.sh). docs/MODELS.md gives the time and figures; continue a stopped run with the
# same command plus --resume (the shipped file: 6,500 steps, then --resume to 15,750 and to 17,250).
set -e
cd "$(dirname "$0")/.."
PHOTOS=$(scripts/photo_data.sh "${DATA:-../shared/data}")  # an assignment, so that set -e stops on a missing folder
# shellcheck disable=SC2086
idfzip train $PHOTOS \
    --config scripts/configs/grey-1.json --init-from models/natural-v1.safetensors --out runs/grey.safetensors -f "$@"
cp runs/grey.safetensors models/grey.safetensors
