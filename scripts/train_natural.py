"""Reproduce models/natural.safetensors: the default photo model.

    python scripts/train_natural.py [--minutes 60] [--resume runs/natural.safetensors.ckpt]

Trains on the CID22 training images in ../shared/data (the last 8 held out for validation) on the CPU.
"""

import argparse
from pathlib import Path

from idfzip.flows import IDFConfig
from idfzip.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
MODEL = IDFConfig(levels=5, coupling="quad", steps=1, coupling_hidden=0, init="lifting", color="rct",
                  prior_hidden=48, prior_layers=2, mixtures=3)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--out", default=str(ROOT / "runs" / "natural.safetensors"))
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cid22" / "training"))
    a = ap.parse_args()
    tc = TrainConfig(crop=128, batch=8, lr=2e-3, warmup=200, decay=0.9995, min_lr=1e-4, steps=a.steps,
                     minutes=a.minutes, val_every=250, val_images=8, threads=a.threads)
    train(MODEL, tc, [a.data], a.out, "natural", resume=a.resume)
