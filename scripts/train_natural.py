"""Reproduce models/natural.safetensors: the default photo model, in two stages on the CPU.

    python scripts/train_natural.py --no-ar --steps 2000 --out runs/stage1.safetensors
    python scripts/train_natural.py --init-from runs/stage1.safetensors --lr 1e-3 --minutes 60
    cp runs/natural.safetensors models/natural.safetensors

Stage 1 trains the lifting flow and its priors; stage 2 adds the channel-autoregressive means and trains on.
Data: the CID22 training images in ../shared/data (the last 8, in sorted order, held out for validation).
Long runs can be stopped and continued with --resume runs/natural.safetensors.ckpt.
"""

import argparse
import dataclasses
from pathlib import Path

from idfzip.flows import IDFConfig
from idfzip.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
MODEL = IDFConfig(
    levels=5,
    coupling="quad",
    steps=1,
    coupling_hidden=0,
    init="lifting",
    color="rct",
    prior_hidden=48,
    prior_layers=2,
    mixtures=3,
    channel_ar=True,
)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--init-from", default=None, help="warm start from this model file (matching weights)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--no-ar", action="store_true", help="stage 1: without the channel-autoregressive prior")
    ap.add_argument("--out", default=str(ROOT / "runs" / "natural.safetensors"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cid22" / "training"))
    a = ap.parse_args()
    tc = TrainConfig(
        crop=128,
        batch=8,
        lr=a.lr,
        warmup=200,
        decay=0.9995,
        min_lr=1e-4,
        steps=a.steps,
        minutes=a.minutes,
        val_every=250,
        val_images=8,
        threads=a.threads,
    )
    model = dataclasses.replace(MODEL, channel_ar=False) if a.no_ar else MODEL
    train(model, tc, [a.data], a.out, "natural", resume=a.resume, init_from=a.init_from)
