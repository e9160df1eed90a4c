"""Orchestration: image <-> tiles <-> flow <-> coding <-> container. The public API.

    data = idfzip.compress(image)        # PIL image or numpy array -> .idfz bytes
    image = idfzip.decompress(data)      # -> PIL image, identical pixels, mode, size, palette

Tiles are coded independently, one at a time (batch of one, the same tensor shapes when encoding and
decoding), each padded by edge replication to a multiple of 2**levels; their order in the file is row-major.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from . import adapt
from .coding import Decoder, Encoder
from .container import MAX_PIXELS, MAX_SIDE, MAX_TILE, MODEL_HASH_BYTES, Container
from .errors import CorruptFileError, IdfzipError, InputImageError, ModelMismatchError
from .planes import apply_meta, as_image, decode_rest, encode_meta, encode_rest, merge, rest_mode, signature, split
from .priors import Mixture
from .zoo import Model, is_shipped, load, load_by_hash, load_shipped, shipped_name

DEFAULT_TILE = 1024
SMALL_IMAGE = 64 * 64  # RGB images up to this many pixels also try the classical coding and keep the smaller
THIN = 16  # so do images narrower or shorter than this: padding to the model's multiple wastes most of the work


@dataclass
class Stats:
    """What an encode measured: total bytes, and the flow part's ideal code length (model NLL) in bits (also
    when the classical coding was smaller and kept; 0 when the image has no RGB part)."""

    bytes: int = 0
    flow_bytes: int = 0
    nll_bits: float = 0.0
    subpixels: int = 0
    method: str = ""

    @property
    def bpd(self) -> float:
        return 8.0 * self.bytes / max(1, self.subpixels)


def subpixels(im: Image.Image) -> int:
    return im.width * im.height * len(im.getbands())


def _tiles(width: int, height: int, tile: int):
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield x, y, min(tile, width - x), min(tile, height - y)


def _pad(a: np.ndarray, m: int) -> np.ndarray:
    h, w = a.shape[:2]
    return np.pad(a, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge")


def _gather(t: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, ch, h, w) -> (B, ch, 1, len(pos)): the positions of one pass of a slot (all of them if None)."""
    if pos is None:
        return t
    return t.flatten(2)[:, :, pos.to(t.device)].unsqueeze(2)


def _channel_raws(flow, raw: torch.Tensor, zg: torch.Tensor) -> list[torch.Tensor]:
    """Per channel of a slot pass, its mixture parameters (B, 3K, ...) before adaptation."""
    K = flow.config.mixtures
    if flow.n_ar:
        return [flow.channel_raw(raw, c, zg[:, :c]) for c in range(flow.config.channels)]
    return [raw[:, c * 3 * K : (c + 1) * 3 * K] for c in range(flow.config.channels)]


@torch.no_grad()
def _encode_tile(model: Model, rgb: np.ndarray, device: str, fit: bool = True) -> tuple[adapt.Params, bytes, float]:
    """(adaptation parameters, entropy-coded stream, its ideal length in bits). ``fit``: fit the adaptation."""
    flow = model.flow
    C, K = flow.config.channels, flow.config.mixtures
    enc = Encoder()
    params: adapt.Params = {}
    x = torch.from_numpy(_pad(rgb, flow.multiple).astype(np.int64)).permute(2, 0, 1)[None].contiguous()
    x = flow.color_encode(x.to(device))
    for level in range(flow.config.levels):
        kept, z = flow.level_encode(level, x)
        groups = flow.groups(*kept.shape[2:])
        for j in reversed(range(3)):  # ANS is a stack: push in the reverse of the decoding order
            ctx = torch.cat([kept, z[:, : j * C]], 1)
            zj = z[:, j * C : (j + 1) * C]
            segments = []  # per pass, in decoding order: (symbols, per-channel mixture parameters)
            for g, pos in enumerate(groups):
                zg = _gather(zj, pos)
                segments.append((zg, _channel_raws(flow, _gather(flow.prior_raw(level, j, ctx, zj, g), pos), zg)))
            p = adapt.fit_slot(segments, C, K) if fit else None
            if p is not None:
                params[level, j] = p
            for zg, raws in reversed(segments):
                raws = [adapt.apply(r, None if p is None else p[c], K) for c, r in enumerate(raws)]
                if flow.n_ar:
                    for c in reversed(range(C)):
                        enc.push(zg[:, c : c + 1], Mixture(raws[c], K))
                else:
                    enc.push(zg, Mixture(torch.cat(raws, 1), K))
        x = kept
    enc.push(x, Mixture(flow.top_raw(x.shape), K))
    return params, enc.finish(), enc.bits


@torch.no_grad()
def _decode_tile(model: Model, data: bytes, w: int, h: int, device: str, adapted: bool) -> np.ndarray:
    """One tile's pixels from its stream; ``adapted``: the stream starts with an adaptation block."""
    flow = model.flow
    C, K, L = flow.config.channels, flow.config.mixtures, flow.config.levels
    m = flow.multiple
    H, W = -(-h // m) * m, -(-w // m) * m
    params: adapt.Params = {}
    if adapted:
        params, n = adapt.from_bytes(data, L, C)
        data = data[n:]
    dec = Decoder(data)
    shape = (1, C, H >> L, W >> L)
    x = dec.pop(Mixture(flow.top_raw(shape), K)).view(shape).to(device)
    for level in reversed(range(L)):
        shape = (1, C, H >> (level + 1), W >> (level + 1))
        groups = flow.groups(*shape[2:])
        ctx, zs = x, []
        for j in range(3):
            zj = torch.zeros(shape, dtype=torch.long, device=device)
            flat = zj.view(1, C, -1)
            for g, pos in enumerate(groups):
                raw = _gather(flow.prior_raw(level, j, ctx, zj, g), pos)
                zg = torch.zeros((1, C) + raw.shape[2:], dtype=torch.long, device=device)
                p = params.get((level, j))
                if flow.n_ar:
                    for c in range(C):
                        r = adapt.apply(flow.channel_raw(raw, c, zg[:, :c]), None if p is None else p[c], K)
                        zg[:, c : c + 1] = dec.pop(Mixture(r, K)).view(zg[:, c : c + 1].shape).to(device)
                else:
                    raws = [
                        adapt.apply(r, None if p is None else p[c], K)
                        for c, r in enumerate(_channel_raws(flow, raw, zg))
                    ]
                    zg = dec.pop(Mixture(torch.cat(raws, 1), K)).view(zg.shape).to(device)
                if pos is None:
                    zj = zg
                    flat = zj.view(1, C, -1)
                else:
                    flat[:, :, pos.to(device)] = zg.view(1, C, -1)
            zs.append(zj)
            ctx = torch.cat([ctx, zj], 1)
        x = flow.level_decode(level, x, torch.cat(zs, 1))
    x = flow.color_decode(x).cpu()
    dec.check_end()
    if int(x.min()) < 0 or int(x.max()) > 255:
        raise CorruptFileError("decoded pixels out of range (corrupted data or wrong model)")
    return x[0, :, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)


def _encode_rgb(
    model: Model, rgb: np.ndarray, tile: int, device: str, fit: bool, progress: Callable[[int], None] | None
) -> tuple[list[bytes], bool, float]:
    """(tile streams, whether they start with adaptation blocks, ideal code length in bits)."""
    h, w = rgb.shape[:2]
    coded, bits = [], 0.0
    for x, y, tw, th in _tiles(w, h, tile):
        params, s, b = _encode_tile(model, rgb[y : y + th, x : x + tw], device, fit)
        coded.append((params, s))
        bits += b
        if progress:
            progress(tw * th)
    # the blocks are stored only when some tile is adapted; then every tile has one (an unadapted: 1 byte)
    adapted = any(params for params, _ in coded)
    C = model.flow.config.channels
    return [adapt.to_bytes(params, C) + s if adapted else s for params, s in coded], adapted, bits


def compress_with_stats(
    image,
    model: str | Model | None = None,
    tile: int = DEFAULT_TILE,
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
    adaptive: bool = True,
) -> tuple[bytes, Stats]:
    """Compress ``image`` (PIL image or numpy array); return the .idfz bytes and what was measured.
    ``adaptive``: fit each tile's prior adaptation (idfzip.adapt); off, the file is written without it."""
    im = as_image(image)
    im.load()
    if not (1 <= im.width <= MAX_SIDE and 1 <= im.height <= MAX_SIDE) or im.width * im.height > MAX_PIXELS:
        raise InputImageError(
            f"image size {im.width}x{im.height} is outside what .idfz stores "
            f"(sides 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels)"
        )
    if not 1 <= tile <= MAX_TILE:
        raise IdfzipError(f"tile size must be 1..{MAX_TILE}")
    mdl = model if isinstance(model, Model) else None
    meta = encode_meta(im)
    c = Container(im.mode, im.width, im.height, crc32=signature(im, meta), meta=meta or None)
    rgb, rest = split(im)
    stats = Stats(subpixels=subpixels(im))
    classical = None
    if rgb is not None and (im.width * im.height <= SMALL_IMAGE or min(im.width, im.height) < THIN):
        classical = Container(im.mode, im.width, im.height, crc32=c.crc32, meta=c.meta)
        classical.rest_method, classical.rest = encode_rest(im)
    if rgb is not None:
        mdl = mdl or load(model)
        m = mdl.flow.multiple
        if tile < m or tile % m:
            raise IdfzipError(f"tile size must be a positive multiple of {m} for model {mdl.name}")
        # a shipped model is named by its hash alone, and an image that fits one tile stores tile side 0
        c.model_name = "" if is_shipped(mdl) else mdl.name
        c.model_hash = mdl.sha256[:MODEL_HASH_BYTES]
        c.tile = 0 if max(im.width, im.height) <= tile else tile
        c.tiles, c.adapted, stats.nll_bits = _encode_rgb(mdl, rgb, c.tile_side, device, adaptive, progress)
        stats.flow_bytes = sum(len(t) for t in c.tiles)
        stats.method = f"flow:{mdl.name}"
    if rest is not None:
        c.rest_method, c.rest = encode_rest(rest)
        if not c.tiles:
            stats.method = "classical"
    data = c.to_bytes()
    if classical is not None:
        alt = classical.to_bytes()
        if len(alt) < len(data):
            data, stats.method, stats.flow_bytes = alt, "classical", 0  # nll_bits: still the model's NLL
    stats.bytes = len(data)
    return data, stats


def compress(image, model: str | Model | None = None, tile: int = DEFAULT_TILE, device: str = "cpu") -> bytes:
    """Compress a PIL image or numpy array to .idfz bytes."""
    return compress_with_stats(image, model, tile, device)[0]


def decompress(
    data: bytes, model: str | Model | None = None, device: str = "cpu", progress: Callable[[int], None] | None = None
) -> Image.Image:
    """Decode .idfz bytes. ``model`` defaults to the one named in the file."""
    c = Container.from_bytes(bytes(data))
    rgb = rest = None
    if c.tiles:
        if isinstance(model, Model):
            mdl = model
        elif model:
            mdl = load(model)
        else:
            mdl = load_shipped(c.model_name) if c.model_name else load_by_hash(c.model_hash)
        if mdl.sha256[:MODEL_HASH_BYTES] != c.model_hash:
            written = repr(c.model_name) if c.model_name else "a shipped model"
            raise ModelMismatchError(
                f"file was written with model {written} ({c.model_hash.hex()}), "
                f"available model {mdl.name!r} is {mdl.sha256[:MODEL_HASH_BYTES].hex()}"
            )
        if c.tile % mdl.flow.multiple:
            raise CorruptFileError(f"tile size {c.tile} does not suit model {mdl.name}")
        if c.mode not in ("RGB", "RGBA"):
            raise CorruptFileError(f"mode {c.mode} cannot have a flow-coded part")
        rgb = np.empty((c.height, c.width, 3), dtype=np.uint8)
        for (x, y, tw, th), t in zip(_tiles(c.width, c.height, c.tile_side), c.tiles):
            rgb[y : y + th, x : x + tw] = _decode_tile(mdl, t, tw, th, device, c.adapted)
            if progress:
                progress(tw * th)
    if c.rest is not None:
        rmode = rest_mode(c.mode) if c.tiles or c.mode in ("P", "PA") else c.mode
        rest = decode_rest(c.rest_method, c.rest, rmode, (c.width, c.height))
    if (bool(c.tiles) and c.mode == "RGBA") != (rest is not None and rgb is not None) or (rgb is None and rest is None):
        raise CorruptFileError("the parts present do not match the image mode")
    im = merge(c.mode, (c.width, c.height), rgb, rest)
    im = apply_meta(im, c.meta)
    if signature(im, c.meta or b"") != c.crc32:
        raise CorruptFileError(
            "CRC mismatch: decoded pixels differ from the original (corrupted file or non-reproducible decoding)"
        )
    return im


def inspect(data: bytes) -> dict:
    """Header facts of .idfz bytes, without decoding."""
    c = Container.from_bytes(bytes(data))
    try:
        bands = len(Image.new(c.mode, (1, 1)).getbands())
    except (ValueError, OSError):
        bands = 1
    n = c.width * c.height * bands
    return {
        "mode": c.mode,
        "width": c.width,
        "height": c.height,
        "bytes": len(data),
        "bpd": 8.0 * len(data) / n,
        "model": c.model_name or (shipped_name(c.model_hash) if c.model_hash else None),
        "model_sha256_prefix": c.model_hash.hex() if c.model_hash else None,
        "tile": c.tile_side if c.tiles else None,
        "tiles": len(c.tiles),
        "flow_bytes": sum(len(t) for t in c.tiles),
        "adapted_tiles": sum(1 for t in c.tiles if t[:1] != b"\0") if c.adapted else 0,  # mask varint 0: not
        "rest": None if c.rest is None else {"method": c.rest_method, "bytes": len(c.rest)},
        "meta_bytes": len(c.meta or b""),
        "crc32": f"{c.crc32:08x}",
    }
