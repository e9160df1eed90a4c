"""Training of a hierarchical IDF on random crops: the library side of ``idfzip train`` and scripts/.

Loss: the model's ideal code length in bits per sub-pixel (straight-through rounding in the couplings).
Adamax/Adam with linear warm-up and exponential decay, as in Hoogeboom et al. 2019.

Data parallel: under ``torchrun`` (WORLD_SIZE > 1) every process draws the same global batch of crops from
the same seed and trains on its own slice of it in DistributedDataParallel (NCCL on GPUs, gloo on CPUs),
whose gradient average makes each step the single-process step on the whole batch (to float rounding).
Process 0 alone validates, logs and writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import registry
from .flows import HierarchicalIDF, IDFConfig
from .flows.nets import ConvNet
from .imagefile import Source, find_images
from .zoo import save_model


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
    val_images: int = 8  # N images are held out for validation
    holdout: str = "last"  # "last": the last N in sorted order; "spread": N evenly spaced ones (class-sorted sets)
    seed: int = 0
    threads: int = 0
    optimizer: str = "adam"  # "adam" or "adamax" (the IDF paper's)
    ema: float = 0.0  # validate and export an exponential moving average of the weights with this decay (0: off)
    amp: bool = False  # bfloat16 autocast of the priors' hidden layers (GPUs; validation and export stay float32)
    patience: int = 0  # stop when this many validations in a row have not improved on the best (0: never)

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamax"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}")
        if self.holdout not in ("last", "spread"):
            raise ValueError(f"unknown holdout {self.holdout!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError("ema must be in [0, 1)")
        if min(self.crop, self.batch, self.steps, self.val_every, self.val_images) < 1 or self.lr <= 0:
            raise ValueError("crop, batch, steps, val_every, val_images and lr must be positive")
        if self.patience < 0:
            raise ValueError("patience must be 0 (never stop early) or positive")


def load_config(path: str | Path) -> tuple[IDFConfig, TrainConfig]:
    """A training config file: JSON ``{"model": {IDFConfig fields}, "train": {TrainConfig fields}}``; fields
    left out take their defaults."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict) or set(d) - {"model", "train"}:
        raise ValueError(f'{path}: a config has the sections "model" and "train" only')
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    t = d.get("train", {})
    if set(t) - names:
        raise ValueError(f"{path}: unknown train fields {sorted(set(t) - names)}")
    try:
        return IDFConfig.from_dict(d.get("model", {})), TrainConfig(**t)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_images(sources: list, limit: int = 0, channels: int = 3) -> list[np.ndarray]:
    """uint8 arrays (H, W, channels) from folders (recursively), single images, or zips of images, sorted (or
    from the :class:`Source` list of ``find_images``): every image as RGB, or as L (Pillow's ITU-R 601 luma) for
    a 1-channel model."""
    if channels not in (1, 3):
        raise ValueError(f"models of {channels} channels are not trained here (1 or 3)")
    mode = "L" if channels == 1 else "RGB"
    found = sources if all(isinstance(s, Source) for s in sources) else find_images(sources)
    return [np.atleast_3d(np.asarray(src.open().convert(mode))).copy() for src in found[: limit or None]]


def split_holdout(images: list, n: int, how: str = "last") -> tuple[list, list]:
    """(training, validation): the last n images, or n evenly spaced ones (for sets sorted by class)."""
    if how == "last":
        return images[:-n], images[-n:]
    if how != "spread":
        raise ValueError(f"unknown holdout {how!r}")
    held = {int(i) for i in np.linspace(0, len(images) - 1, n).round()}
    return [im for i, im in enumerate(images) if i not in held], [images[i] for i in sorted(held)]


GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def auto_holdout(n: int, pixels: int = 0) -> int:
    """Images held out for validation when training without a config: a tenth, 1 to AUTO_MAX_VAL, or for
    small images (``pixels`` each, the median) as many as make AUTO_VAL_PIXELS, but never over a tenth."""
    if n < 2:
        raise ValueError(f"need at least 2 images (one is held out for validation), found {n}")
    cap = max(AUTO_MAX_VAL, -(-AUTO_VAL_PIXELS // pixels)) if pixels > 0 else AUTO_MAX_VAL
    return max(1, min(cap, round(n / 10)))


AUTO_MAX_VAL = 8
AUTO_VAL_PIXELS = 1 << 20  # validation pixels wanted, where the images are small (CIFAR-10: 1,024 images)
AUTO_MINUTES = 20.0  # zero-config training's default time limit (docs/MODELS.md, "What it gave")
AUTO_CROP = 128  # pixels per step: 8 crops of 128 x 128, or more smaller crops of small images
AUTO = TrainConfig(
    crop=AUTO_CROP,
    batch=8,
    lr=3e-4,
    warmup=50,
    decay=1.0,  # constant after warm-up: the time limit ends the run, not a schedule
    min_lr=3e-4,
    steps=1_000_000,
    minutes=AUTO_MINUTES,
    val_every=50,
    holdout="spread",
    ema=0.0,
    patience=6,
)


def auto_config(sources: list[Source]) -> tuple[IDFConfig, TrainConfig, Path]:
    """(model config, training config, model to start from) for fine-tuning without a config file: the
    shipped model for the images' kind (natural for colour, grey when all are greyscale), its architecture,
    a tenth of the files (spread over the sorted list; auto_holdout) held out, crops of up to 128 (smaller for
    small images: as many pixels per step), and the settings measured in docs/MODELS.md ("Training your own")."""
    heads = [(im.mode, im.size) for im in (src.open() for src in sources)]  # one look at each image's header
    channels = 1 if heads and all(mode in GREY_MODES for mode, _ in heads) else 3  # 1: every image greyscale
    start = registry.shipped(registry.default_model(channels))
    model = IDFConfig.from_dict(json.loads(registry.describe(start)["metadata"]["config"]))
    m = 1 << model.levels
    sizes = sorted((min(size), size[0] * size[1]) for _, size in heads)
    side, pixels = sizes[len(sizes) // 2] if sizes else (AUTO_CROP, AUTO_CROP**2)
    crop = min(AUTO_CROP, max(m, side // m * m))
    batch = min(128, AUTO.batch * (AUTO_CROP // crop) ** 2)
    val = auto_holdout(len(sources), pixels)
    tc = dataclasses.replace(AUTO, crop=crop, batch=batch, val_images=val, threads=0)
    return model, tc, start


def _crops(images: list[np.ndarray], n: int, size: int, rng: np.random.Generator) -> torch.Tensor:
    batch = np.empty((n, size, size, images[0].shape[2]), dtype=np.uint8)
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
    crops = []
    for im in images:
        h, w = im.shape[:2]
        s = min(size, h // m * m, w // m * m)
        if s:
            y, x = (h - s) // 2, (w - s) // 2
            crops.append(im[y : y + s, x : x + s])
    with torch.no_grad():
        i = 0
        while i < len(crops):  # equal-sized crops in batches of up to 64 x 64 x 64 pixels
            j = i + 1
            while (
                j < len(crops) and crops[j].shape == crops[i].shape and (j - i + 1) * crops[i][..., 0].size <= 1 << 18
            ):
                j += 1
            t = torch.from_numpy(np.stack(crops[i:j])).permute(0, 3, 1, 2).float()
            bits += float(model(t))
            n += t.numel()
            i = j
    return bits / max(n, 1)


CALIBRATION_BATCHES = 8
EXPORT_PERIOD = 600.0  # seconds: a new best model is written at most this often, and at the end of the run
MIN_GAIN = 1e-4  # a validation counts as an improvement (for patience) when it is this much better, relatively


def calibrate(model: HierarchicalIDF, images: list[np.ndarray], crop: int, batch: int, seed: int = 0) -> None:
    """Calibrate ``model``'s integer mode (nets.py) on CALIBRATION_BATCHES batches of random crops of ``images``
    (the same crops for a given seed)."""
    rng = np.random.default_rng(seed)
    model.calibrate([_crops(images, batch, crop, rng) for _ in range(CALIBRATION_BATCHES)], seed=seed)


def _conv_depth(state: dict, net: str) -> int:
    """Number of convolutions in the residual branch of the ConvNet named ``net`` in ``state``."""
    n = 0
    while f"{net}.convs.{n}.weight" in state:
        n += 1
    return n


def warm_start(model: HierarchicalIDF, path: str | Path) -> int:
    """Copy weights from a model file into ``model`` where names match: whole tensors of equal shape, or into
    the leading block of a tensor that has grown (extra prior outputs, extra prior inputs, wider hidden layers).
    Grown input columns are zeroed, so the new inputs start ignored. A prior network that has grown deeper gets
    the source's layers first and last, and identity convolutions between (ReLU outputs are non-negative, so
    an identity layer passes them unchanged). The copied model's function is kept. A 1-channel model starts from
    a 3-channel one's luma instead (``grey_of``; not the same function). Returns tensors copied."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safetensors file, not a dict)
        meta = f.metadata() or {}
    given = json.loads(meta.get("config", "{}"))
    cs, C = given.get("channels", 3), model.config.channels
    if cs != C:
        if not (C == 1 and cs == 3 and given.get("color") == "rct"):
            raise ValueError(f"{path}: a {cs}-channel model cannot start a {C}-channel one")
        src = grey_of(src, IDFConfig.from_dict(given))
    own = model.state_dict()
    remap = {}  # own key -> source key, for the prior networks that have grown deeper
    identity = set()
    for level, nets in enumerate(model.priors):
        for j, net in enumerate(nets):
            name = f"priors.{level}.{j}"
            have, want = _conv_depth(src, name), len(net.convs)
            if 0 < have < want:
                for i in range(want):
                    key = f"{name}.convs.{i}"
                    if i == want - 1:
                        remap[key] = f"{name}.convs.{have - 1}"
                    elif i >= have - 1:
                        identity.add(key)
    n = 0
    with torch.no_grad():
        for k, v in own.items():
            conv, _, kind = k.rpartition(".")
            if conv in identity:
                v.zero_()
                if kind == "weight":
                    c = min(v.shape[0], v.shape[1])
                    i = torch.arange(c)
                    v[i, i, v.shape[2] // 2, v.shape[3] // 2] = 1.0
                continue
            w = src.get(f"{remap[conv]}.{kind}" if conv in remap else k)
            if w is None or w.ndim != v.ndim or any(a > b for a, b in zip(w.shape, v.shape)):
                continue
            if w.ndim > 1 and w.shape[1] < v.shape[1]:
                v[:, w.shape[1] :] = 0.0
            v[tuple(slice(0, d) for d in w.shape)] = w
            n += 1
    return n


GREY_CHANNEL = 1  # the luma (Y) of a colour model's reversible colour transform, whose outputs are (V, Y, U)


def grey_of(state: dict, config: IDFConfig) -> dict:
    """The weights of a 3-channel model with the colour transform restricted to its luma channel: the
    tensors of a 1-channel model of the same shape otherwise (no colour coupling, no channel
    autoregression), whose couplings are the luma's own filters and whose priors read and predict the luma
    only. A starting point for greyscale training, not an equal model: the luma lost its chroma context."""
    C, K, ch = config.channels, config.mixtures, GREY_CHANNEL
    out = {}
    for key, v in state.items():
        parts = key.split(".")
        if parts[0] == "top":
            out[key] = v.view(C, 3 * K)[ch].clone()
            continue
        if parts[0] not in ("couplings", "priors") or parts[-1] == "act_exp":
            continue  # the colour coupling and the permutations have no 1-channel counterpart
        if parts[0] == "couplings":  # channel groups in and out
            ins = [g * C + ch for g in range(3)]
            outs = [ch]
        else:
            j = int(parts[2])
            ins = [g * C + ch for g in range(1 + j)]
            if config.context == "checkerboard":  # the slot's anchors, then the anchor mask
                ins += [(1 + j) * C + ch, (2 + j) * C]
            outs = list(range(ch * 3 * K, (ch + 1) * 3 * K))
        net, _, layer = key.rpartition(".")[0].partition(".linear" if ".linear" in key else ".convs.")
        first = layer in ("", "0")  # the linear branch ("") or the first convolution read the channels
        if parts[-1] == "weight" and first:
            v = v[:, ins]
        if layer == "" or layer == str(_conv_depth(state, net) - 1):  # ... and it or the last one write them
            v = v[outs]
        out[key] = v.clone()
    return out


def _distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device): under torchrun joins the process group (NCCL for CUDA, else gloo) and
    picks this process's GPU (LOCAL_RANK); otherwise (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _set_amp(model: HierarchicalIDF, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, ConvNet):
            m.amp = on


def _all_true(flag: bool, device: str) -> bool:
    """Process 0's ``flag`` on every process (a time limit must stop all of them at the same step)."""
    import torch.distributed as dist

    t = torch.tensor([float(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


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
    progress: Callable[[int, float | None], None] | None = None,
) -> HierarchicalIDF:
    """Train and export ``out`` (safetensors), the best validation checkpoint so far, ready for coding: written
    at the end, and during the run at most every EXPORT_PERIOD seconds (each export calibrates the integer
    mode, which costs as much as several training steps).

    A checkpoint ``out + '.ckpt'`` (weights, optimiser, step, best validation) is written at each validation;
    ``resume`` continues from one. ``progress(step, running training bpd, validation bpd)`` is called after
    every step (validation None) and after each validation, and with (step, None, None) on resuming (the
    running figure is process 0's slice of the batch under torchrun). With ``patience`` the run stops once
    that many validations in a row have not improved on the best."""
    tc = train_config
    if tc.threads:
        torch.set_num_threads(tc.threads)
    rank, world, device = _distributed(device)
    if tc.batch % world:
        raise ValueError(f"batch {tc.batch} does not split over {world} processes")
    if rank:
        log, progress = (lambda line: None), None
    torch.manual_seed(tc.seed)
    rng = np.random.default_rng(tc.seed)
    sources = find_images(data)
    if len(sources) <= tc.val_images:
        raise ValueError(
            f"need more than {tc.val_images} images ({tc.val_images} are held out for validation: val_images in the "
            f"config's train section, or --val-images), found {len(sources)}"
        )
    images = load_images(sources, channels=model_config.channels)
    train_imgs, val_imgs = split_holdout(images, tc.val_images, tc.holdout)
    held = split_holdout(sources, tc.val_images, tc.holdout)[1]
    names = ", ".join(Path(s.member or s.path).name for s in held[:8]) + (", ..." if len(held) > 8 else "")
    log(f"{len(train_imgs)} training images, {len(val_imgs)} validation images (held out: {names})")
    model = HierarchicalIDF(model_config)
    if init_from and not resume:
        log(f"warm start from {init_from}: {warm_start(model, init_from)} tensors copied")
    model.to(device)
    if device.startswith("cuda"):  # TF32 tensor cores for float32 products (the exported model is exact anyway)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    _set_amp(model, tc.amp)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, broadcast_buffers=False)
        log(f"data parallel over {world} processes, {tc.batch // world} crops each")
    opt = (torch.optim.Adamax if tc.optimizer == "adamax" else torch.optim.Adam)(model.parameters(), lr=tc.lr)
    step = 0
    best = math.inf
    ema_state = None
    ckpt = Path(str(out) + ".ckpt")
    if resume:
        state = torch.load(resume, map_location=device, weights_only=True)
        if state.get("config", model_config.to_dict()) != model_config.to_dict():
            raise ValueError(f"{resume}: the checkpoint's model config differs from this one")
        model.load_weights(state["model"])
        opt.load_state_dict(state["opt"])
        ema_state = None if rank else state.get("ema")
        step = int(state["step"])
        best = float(state.get("best", math.inf))
        rng = np.random.default_rng(tc.seed + step)
        torch.manual_seed(tc.seed + step)
        log(f"resumed at step {step}")
        if progress:
            progress(step, None, None)  # a progress bar starts where the run is
    log(f"model: {model.num_parameters()} parameters, {json.dumps(model_config.to_dict())}")
    if tc.ema and ema_state is None and not rank:
        ema_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    pending = []  # the best snapshot not yet exported: (model, step, bpd)
    exported = [time.time()]

    def export() -> None:
        """Calibrate and write the best snapshot (calibration costs several training steps: see EXPORT_PERIOD)."""
        if pending:
            snapshot, step, v = pending.pop()
            calibrate(snapshot, train_imgs, tc.crop, tc.batch, tc.seed)
            save_model(snapshot, out, name, {"step": str(step), "val_bpd": f"{v:.4f}"})
            exported[0] = time.time()

    def validate(step: int, running: float | None, best: float, stale: int) -> tuple[float, int]:
        """Validate a CPU copy (of the averaged weights, with ema), keep it if it is the best, and checkpoint."""
        snapshot = copy.deepcopy(model)
        if ema_state:
            snapshot.load_state_dict(ema_state)
        snapshot = snapshot.cpu().eval()
        _set_amp(snapshot, False)
        v = evaluate(snapshot, val_imgs)
        log(f"step {step} validation {v:.4f} bpd" + (" (best)" if v < best else "") + (" (the start)" * (not step)))
        stale = 0 if v < best * (1.0 - MIN_GAIN) else stale + 1
        best = min(best, v)
        if progress:
            progress(step, running, v)
        if v == best:
            pending[:] = [(snapshot, step, v)]
        if pending and time.time() - exported[0] >= EXPORT_PERIOD:
            export()
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "best": best}
        torch.save({**state, "ema": ema_state, "config": model_config.to_dict()}, str(ckpt) + ".tmp")
        os.replace(str(ckpt) + ".tmp", ckpt)  # a run stopped while saving keeps its previous checkpoint
        return best, stale

    start = time.time()  # the time limit counts from here
    running = None
    stale = 0  # validations in a row without a new best
    if init_from and not resume and not rank:  # the starting model is the one to beat (and exported if never beaten)
        best, stale = validate(0, None, best, stale)
    per = tc.batch // world
    try:
        while step < tc.steps:
            lr = tc.lr * min(1.0, (step + 1) / tc.warmup) * max(tc.decay ** max(0, step - tc.warmup), tc.min_lr / tc.lr)
            for g in opt.param_groups:
                g["lr"] = lr
            x = _crops(train_imgs, tc.batch, tc.crop, rng)[rank * per : (rank + 1) * per].to(device)
            loss = net(x) / x.numel()  # DDP averages the gradients over the processes' equal slices
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
            if ema_state is not None:
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        if v.is_floating_point():
                            ema_state[k].lerp_(v, 1.0 - tc.ema)
            lv = float(loss.detach())
            running = lv if running is None else 0.98 * running + 0.02 * lv
            done = bool(tc.minutes) and (time.time() - start) > tc.minutes * 60
            if world > 1 and tc.minutes:
                done = _all_true(done, device)
            if progress:
                progress(step, running, None)
            if step % 50 == 0 and not progress:
                log(f"step {step} lr {lr:.2e} train {running:.4f} bpd ({time.time() - start:.0f}s)")
            if (step % tc.val_every == 0 or done or step == tc.steps) and not rank:
                best, stale = validate(step, running, best, stale)
                if tc.patience and stale >= tc.patience:
                    log(f"validation has not improved for {stale} checks: stopping")
                    done = True
            if world > 1 and tc.patience and step % tc.val_every == 0:
                done = _all_true(done, device)  # process 0's early stop
            if done:
                break
    except KeyboardInterrupt:
        if pending and not rank:  # Ctrl-C: the best model so far is written before the run ends
            log("interrupted: writing the best model so far")
            export()
        raise
    export()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # process 0's last files are written before any process returns
    if not rank:
        os.sync()
    return model
