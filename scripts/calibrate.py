"""Calibrate a model file's integer mode (container version 5) in place, keeping its float weights.

    python scripts/calibrate.py MODEL.safetensors DATA... [--crop 128] [--batch 8] [--seed 0]

The activation unit of every hidden channel (idfzip/flows/nets.py) is set from the float activations of
random crops of DATA (folders, images or zips; idfzip.train.calibrate), and the file is rewritten with them
and with ``calibrated_from``, the sha256 of the uncalibrated file, so that files written with that one
(versions 1-4) still decode with this one. ``idfzip train`` calibrates what it exports by itself.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from idfzip import zoo
from idfzip.train import calibrate, load_images

_OWN = ("format", "format_version", "name", "config")  # save_model writes these itself


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("data", nargs="+")
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    data = path.read_bytes()
    model = zoo.model_from_bytes(data, path.stem, str(path))
    meta = {k: v for k, v in model.metadata.items() if k not in _OWN}
    meta.setdefault("calibrated_from", hashlib.sha256(data).hexdigest())
    images = load_images(args.data, channels=model.flow.config.channels)
    t = time.time()
    calibrate(model.flow, images, args.crop, args.batch, args.seed)
    digest = zoo.save_model(model.flow, path, model.name, meta)
    print(f"{path}: calibrated on {len(images)} images in {time.time() - t:.0f} s; sha256 {digest.hex()[:16]}")


if __name__ == "__main__":
    main()
