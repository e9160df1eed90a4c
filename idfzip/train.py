"""Training of a hierarchical IDF on random crops: the library side of ``idfzip train`` and scripts/.

Loss: the model's ideal code length in bits per sub-pixel (straight-through rounding in the couplings).
Adamax/Adam with linear warm-up and exponential decay, as in Hoogeboom et al. 2019.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .flows import HierarchicalIDF, IDFConfig
from .zoo import save_model

IMAGE_SUFFIXES = {".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".jpg", ".jpeg", ".gif"}


@dataclass
class TrainConfig:
    crop: int = 128
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 200
    decay: float = 0.9995  # per step after warm-up
    min_lr: float = 1e-4
    steps: int = 100_000
    minutes: float = 0.0  # stop after this many minutes of training (0: no limit)
    val_every: int = 500
    val_images: int = 8  # the last N images are held out for validation
    seed: int = 0
    threads: int = 0


def load_images(sources: list[str | Path], limit: int = 0) -> list[np.ndarray]:
    """RGB uint8 arrays (H, W, 3) from folders (recursively), single images, or zips of images, sorted."""
    out: list[np.ndarray] = []

    def add(im: Image.Image) -> None:
        out.append(np.asarray(im.convert("RGB")).copy())

    for src in sources:
        p = Path(src)
        if p.is_dir():
            for f in sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES):
                with Image.open(f) as im:
                    add(im)
                if limit and len(out) >= limit:
                    return out
        elif p.suffix.lower() == ".zip":
            with zipfile.ZipFile(p) as zf:
                for name in sorted(n for n in zf.namelist() if Path(n).suffix.lower() in IMAGE_SUFFIXES):
                    with Image.open(io.BytesIO(zf.read(name))) as im:
                        add(im)
                    if limit and len(out) >= limit:
                        return out
        else:
            with Image.open(p) as im:
                add(im)
    return out


def _crops(images: list[np.ndarray], n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    batch = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        im = images[rng.integers(len(images))]
        h, w = im.shape[:2]
        if h < size or w < size:
            im = np.pad(im, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="edge")
            h, w = im.shape[:2]
        y, x = rng.integers(h - size + 1), rng.integers(w - size + 1)
        c = im[y : y + size, x : x + size]
        if rng.random() < 0.5:
            c = c[:, ::-1]
        batch[i] = c
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float()


def evaluate(model: HierarchicalIDF, images: list[np.ndarray], size: int = 256) -> float:
    """Bits per sub-pixel (float32 training path) on centre crops of ``images``."""
    bits, n = 0.0, 0
    m = model.multiple
    with torch.no_grad():
        for im in images:
            h, w = im.shape[:2]
            s = min(size, h // m * m, w // m * m)
            if s == 0:
                continue
            y, x = (h - s) // 2, (w - s) // 2
            t = torch.from_numpy(im[y : y + s, x : x + s].copy()).permute(2, 0, 1)[None].float()
            bits += float(model(t))
            n += t.numel()
    return bits / max(n, 1)


def warm_start(model: HierarchicalIDF, path: str | Path) -> int:
    """Copy weights from a model file into ``model`` where names match: whole tensors of equal shape, or the
    leading rows of an output layer that has grown (e.g. extra prior outputs). Returns tensors copied."""
    from safetensors.torch import load_file

    src = load_file(str(path))
    own = model.state_dict()
    n = 0
    with torch.no_grad():
        for k, v in own.items():
            w = src.get(k)
            if w is None:
                continue
            if w.shape == v.shape:
                v.copy_(w)
                n += 1
            elif w.ndim == v.ndim and w.shape[1:] == v.shape[1:] and w.shape[0] < v.shape[0]:
                v[: w.shape[0]] = w
                n += 1
    return n


def train(
    model_config: IDFConfig,
    train_config: TrainConfig,
    data: list[str | Path],
    out: str | Path,
    name: str,
    resume: str | Path | None = None,
    device: str = "cpu",
    init_from: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> HierarchicalIDF:
    """Train and export ``out`` (safetensors). A checkpoint ``out + '.ckpt'`` allows ``resume``."""
    tc = train_config
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    images = load_images(data)
    if len(images) <= tc.val_images:
        raise ValueError(f"need more than {tc.val_images} images, found {len(images)}")
    train_imgs, val_imgs = images[: -tc.val_images], images[-tc.val_images :]
    log(f"{len(train_imgs)} training images, {len(val_imgs)} validation images")
    model = HierarchicalIDF(model_config)
    if init_from and not resume:
        log(f"warm start from {init_from}: {warm_start(model, init_from)} tensors copied")
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    step = 0
    ckpt = Path(str(out) + ".ckpt")
    if resume:
        state = torch.load(resume, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        rng = np.random.default_rng(tc.seed + step)
        log(f"resumed at step {step}")
    log(f"model: {model.num_parameters()} parameters, {json.dumps(model_config.to_dict())}")
    best = math.inf
    start = time.time()
    running = None
    while step < tc.steps:
        lr = tc.lr * min(1.0, (step + 1) / tc.warmup) * max(tc.decay ** max(0, step - tc.warmup), tc.min_lr / tc.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        x = _crops(train_imgs, tc.batch, tc.crop, rng).to(device)
        loss = model(x) / x.numel()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        step += 1
        lv = float(loss.detach())
        running = lv if running is None else 0.98 * running + 0.02 * lv
        done = tc.minutes and (time.time() - start) > tc.minutes * 60
        if step % 50 == 0:
            log(f"step {step} lr {lr:.2e} train {running:.4f} bpd ({time.time() - start:.0f}s)")
        if step % tc.val_every == 0 or done or step == tc.steps:
            model.eval()
            v = evaluate(model.cpu(), val_imgs)
            model.to(device).train()
            log(f"step {step} validation {v:.4f} bpd")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
            if v < best:
                best = v
                save_model(model.cpu(), out, name, {"step": str(step), "val_bpd": f"{v:.4f}"})
                model.to(device)
        if done:
            break
    os.sync()
    return model
