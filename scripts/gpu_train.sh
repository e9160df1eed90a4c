#!/usr/bin/env bash
# Train, or continue training, a model on a bare GPU machine for a fixed time; leave the model where it can
# be fetched.
#
#   scripts/gpu_train.sh MINUTES CONFIG OUT_DIR DATA... [idfzip train options: --init-from M, --steps N, ...]
#
# Made for short offline GPU slots (docs/MODELS.md, "Training on a GPU"):
# * packages the machine lacks (idfzip's own needs besides torch) are installed from wheel files in $WHEELS
#   (default .whl/) into a temporary folder; idfzip itself runs from this checkout, nothing is built;
# * one process per visible GPU: several GPUs train data parallel under torchrun (idfzip/train.py), the
#   config's batch being the global batch;
# * training stops after MINUTES of steps (then validates and exports once more); OUT_DIR/NAME.safetensors
#   (NAME: the config's file name) is the best validated model, float32 and calibrated, ready for `--model`
#   or for `idfzip train --init-from` on a CPU; OUT_DIR/NAME.safetensors.ckpt holds the optimiser too
#   (about 4x the model's size), for `--resume` on the same kind of machine;
# * set the config's "amp": true for bfloat16 autocast of the priors' hidden layers (validation and export
#   stay float32). TF32 is always allowed on CUDA.
# DEVICE=cpu runs the same steps on a CPU (to try the script where no GPU is at hand).
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,20p' "$0" >&2
    exit 2
fi
minutes=$1 config=$2 out=$3
shift 3
cd "$(dirname "$0")/.."
wheels=${WHEELS:-.whl}
if ! python3 -c "import click, numpy, PIL, safetensors, tqdm" 2>/dev/null; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
        echo "gpu_train.sh: click, numpy, pillow, safetensors or tqdm is missing and $wheels has no wheels" >&2
        exit 1
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/idfzip-site \
        "$wheels"/*.whl
    export PYTHONPATH=/tmp/idfzip-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
device=${DEVICE:-cuda}
procs=1
if [ "$device" = cuda ]; then
    procs=$(python3 -c "import torch; print(torch.cuda.device_count())")
    if [ "$procs" -lt 1 ]; then
        echo "gpu_train.sh: no CUDA device" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
mkdir -p "$out"
name=$(basename "$config" .json)
launch=(python3)
if [ "$procs" -gt 1 ]; then
    launch=(python3 -m torch.distributed.run --standalone --nproc_per_node "$procs")
fi
start=$(date +%s)
"${launch[@]}" -m idfzip.cli train "$@" --config "$config" --out "$out/$name.safetensors" --minutes "$minutes" \
    --device "$device" -f
echo "gpu_train.sh: $procs process(es) on $device, $(($(date +%s) - start)) s; $(ls -l "$out" | tail -n +2 | wc -l) files in $out"
