"""Orchestration: image <-> parts <-> tiles <-> container. The public API.

    data = idfzip.compress(image)        # PIL image or numpy array -> .idfz bytes
    image = idfzip.decompress(data)      # -> PIL image, identical pixels, mode, size, palette

Tiles are coded independently, in row-major order in the file, each by the flow (idfzip.flowcode) or as a
VP8L stream. Importing this module does not import torch: idfzip.flowcode (and with it torch and the models)
is imported only where an image or a file needs the flow, so a file stored classically decodes without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from . import kernels
from .container import (
    FLOW_VERSION,
    MAX_PIXELS,
    MAX_SIDE,
    MAX_TILE,
    MIXED,
    MODEL_HASH_BYTES,
    REST_WEBP,
    Container,
    boxes,
)
from .errors import CorruptFileError, IdfzipError, InputImageError
from .planes import (
    FLOW_MODES,
    WITH_ALPHA,
    apply_meta,
    as_image,
    colour_image,
    decode_rest,
    decode_vp8l,
    encode_meta,
    encode_rest,
    merge,
    rest_mode,
    signature,
    split,
)

if TYPE_CHECKING:
    from .zoo import Model

DEFAULT_TILE = 256  # small enough that WebP can take a smooth sky or a flat background tile by tile
LARGE_TILE = 1024  # efforts 7-9 also try it: output updates pay only in slots of 2**17 symbols (adapt)
SMALL_IMAGE = 64 * 64  # colour parts (RGB, L) up to this many pixels also try the classical coding and keep the smaller
THIN = 16  # so do images narrower or shorter than this: padding to the model's multiple wastes most of the work


Progress = Callable[[float], None] | None  # called with the pixels done since the last call (fractions too)

EFFORTS = range(1, 10)
DEFAULT_EFFORT = 5
WHOLE_WEBP_CLOSE = 0.9  # the whole image is also coded as WebP where the tiles' flow or WebP come within this
# factor of their WebP (tiles coded apart: on four CLIC photos WebP of the whole was 2-6% larger than of its tiles)


@dataclass
class Stats:
    """What an encode measured: total bytes, and the flow part's ideal code length (model NLL) in bits (also
    when the classical coding was smaller and kept; 0 when the image has no colour part: RGB or L)."""

    bytes: int = 0
    flow_bytes: int = 0
    nll_bits: float = 0.0
    subpixels: int = 0
    method: str = ""
    model_sha256: bytes = b""  # of the model that coded the colour part, if one did
    tiles: int = 0  # the colour part's tiles (0: stored classically whole) ...
    classical_tiles: int = 0  # ... and how many of them are WebP, not the flow

    @property
    def bpd(self) -> float:
        return 8.0 * self.bytes / max(1, self.subpixels)


def subpixels(im: Image.Image) -> int:
    return im.width * im.height * len(im.getbands())


def _stored_whole(im: Image.Image, c: Container, webp: bool) -> bytes:
    """The file of ``im`` stored classically, whole, as the rest part (with ``webp`` WebP too: then format version
    11)."""
    whole = Container(im.mode, im.width, im.height, crc32=c.crc32, meta=c.meta)
    whole.rest_method, whole.rest = encode_rest(im, webp)
    if whole.rest_method == REST_WEBP:
        whole.version = FLOW_VERSION + MIXED
    return whole.to_bytes()


def compress_with_stats(
    image,
    model: str | Model | None = None,
    tile: int | None = None,
    device: str = "cpu",
    progress: Progress = None,
    effort: int = DEFAULT_EFFORT,
    flow_only: bool = False,
) -> tuple[bytes, Stats]:
    """Compress ``image`` (PIL image or numpy array); return the .idfz bytes and what was measured.
    ``effort`` 1..9 (``EFFORTS``): how hard the encoder fits each tile's prior adaptation (idfzip.adapt).
    ``flow_only``: no tile and no whole colour image is coded with WebP, whatever that would save (the flow's own
    files, as before format version 11: for measuring the model). ``tile`` None: DEFAULT_TILE, and at efforts
    7-9 also LARGE_TILE, whose slots are large enough for output updates (FitPlan.delta), the smaller file kept."""
    if effort not in EFFORTS:
        raise IdfzipError(f"effort must be {EFFORTS.start}..{EFFORTS.stop - 1}")
    im = as_image(image)
    sides = [tile] if tile else [DEFAULT_TILE] + [LARGE_TILE] * (effort >= 7 and max(im.size) > DEFAULT_TILE)
    share = None if progress is None else (lambda n: progress(n / len(sides)))
    return min((_compress(im, model, t, device, share, effort, flow_only) for t in sides), key=lambda r: len(r[0]))


def _compress(
    image, model: str | Model | None, tile: int, device: str, progress: Progress, effort: int, flow_only: bool
) -> tuple[bytes, Stats]:
    """compress_with_stats with one tile side."""
    im = as_image(image)
    im.load()
    if not (1 <= im.width <= MAX_SIDE and 1 <= im.height <= MAX_SIDE) or im.width * im.height > MAX_PIXELS:
        raise InputImageError(
            f"image size {im.width}x{im.height} is outside what .idfz stores "
            f"(sides 1..{MAX_SIDE}, at most {MAX_PIXELS} pixels)"
        )
    if not 1 <= tile <= MAX_TILE:
        raise IdfzipError(f"tile size must be 1..{MAX_TILE}")
    meta = encode_meta(im)
    c = Container(im.mode, im.width, im.height, crc32=signature(im, meta), meta=meta or None)
    colour, rest = split(im)
    stats = Stats(subpixels=subpixels(im))
    stored = None  # the file's bytes with the whole image coded classically, where that is tried
    # one colour everywhere: the flow would still spend coding.MIN_SYMBOL_BITS per sub-pixel, the classical
    # coding (a constant) a few bytes, so only that is written
    flat = colour is not None and bool((colour == colour[:1, :1]).all())
    # so do grey images always: drawn and synthetic greys are common, and PNG or LZMA of a grey image costs a
    # small part of the flow's time (files of grey images were never larger than their PNG before the flow)
    small = im.width * im.height <= SMALL_IMAGE or min(im.width, im.height) < THIN
    if colour is not None and (flat or small or colour.shape[2] == 1):
        stored = _stored_whole(im, c, not flow_only)
    # a flow-coded file holds at least its header with a shipped model's hash and one 4-byte word of stream:
    # where the classical coding is no larger, the model is not even loaded
    floor = Container(im.mode, im.width, im.height, model_name="", model_hash=bytes(MODEL_HASH_BYTES), meta=c.meta)
    floor.tiles = [bytes(4)] * (floor.tiles_x * floor.tiles_y)
    if colour is not None and not flat and not (stored is not None and len(stored) <= len(floor.to_bytes())):
        from .zoo import is_shipped

        fc = _flowcode()
        mdl = fc.flow_model(model, colour.shape[2], device)
        m = mdl.flow.multiple
        if tile < m or tile % m:
            raise IdfzipError(f"tile size must be a positive multiple of {m} for model {mdl.name}")
        # a shipped model is named by its hash alone, and an image that fits one tile stores tile side 0
        c.model_name = "" if is_shipped(mdl) else mdl.name
        c.model_hash = mdl.sha256[:MODEL_HASH_BYTES]
        c.tile = 0 if max(im.width, im.height) <= tile else tile
        # a calibrated model runs its networks in integer arithmetic and splits wide windows (version 8); others
        # write version 4
        c.version = FLOW_VERSION if mdl.flow.integer else 4
        plan = replace(fc.fit_plan(effort), webp=0) if flow_only else fc.fit_plan(effort)
        if c.version == 4:  # whose adaptation blocks hold the 4-number adaptation only (the same search)
            plan = replace(plan, offsets=0, steps=0, delta=0, delta_steps=0)
        coded = fc.encode_colour(mdl, colour, c.tile_side, device, c.version, plan, progress)
        colour = None  # (its pixels, 72 MB of a 24 MP photo, are free for the whole image's tries)
        c.tiles, c.classical, c.adapted, c.version = coded.tiles, coded.classical, coded.adapted, coded.version
        stats.nll_bits, stats.tiles, stats.classical_tiles = coded.bits, len(c.tiles), sum(c.classical)
        stats.flow_bytes = sum(len(t) for t in c.flow_tiles)
        stats.method, stats.model_sha256 = f"flow:{mdl.name}", mdl.sha256
        # where WebP's tiles come close to the whole file, WebP of the whole image may be smaller still (it
        # shares its entropy codes and copies across tiles): then it is tried too, so a file is never larger than it
        if stored is None and coded.webp_bytes and coded.size > WHOLE_WEBP_CLOSE * coded.webp_bytes:
            stored = _stored_whole(im, c, True)
    if rest is not None and not flat:
        c.rest_method, c.rest = encode_rest(rest)
        if not c.tiles:
            stats.method = "classical"
    data = None if flat else c.to_bytes()
    if stored is not None and (data is None or len(stored) < len(data)):  # (nll_bits: still the model's NLL)
        data, stats.method, stats.flow_bytes, stats.model_sha256 = stored, "classical", 0, b""
        stats.tiles = stats.classical_tiles = 0
    elif stats.classical_tiles:
        stats.method += f", {stats.classical_tiles} of {stats.tiles} tiles WebP"
    stats.bytes = len(data)
    return data, stats


def compress(
    image,
    model: str | Model | None = None,
    tile: int | None = None,
    device: str = "cpu",
    effort: int = DEFAULT_EFFORT,
    flow_only: bool = False,
) -> bytes:
    """Compress a PIL image or numpy array to .idfz bytes; ``effort`` 1..9 trades encoding time for size;
    ``flow_only`` codes every colour tile by the flow, never WebP; ``tile`` None: the efforts' own (see
    ``compress_with_stats``)."""
    return compress_with_stats(image, model, tile, device, effort=effort, flow_only=flow_only)[0]


def decompress(
    data: bytes, model: str | Model | None = None, device: str = "cpu", progress: Progress = None, preview: int = 0
) -> Image.Image:
    """Decode .idfz bytes to a PIL image (identical pixels, mode, size, palette). ``model`` defaults to the one
    named in the file. CorruptFileError for anything that is not an intact .idfz file.

    ``preview`` K (1 .. the model's levels): instead, a quick look 2**K times smaller per side (ceil(width /
    2**K) x ceil(height / 2**K)): of a flow-coded image only the latents of levels K and coarser are decoded,
    the finer ones take the priors' likeliest values, and the inverted flow's output is box-averaged (mode RGB or
    L, or RGBA or LA with the alpha plane box-averaged); other images are decoded whole, converted to RGB(A) or L and
    box-averaged. Not exact and not checked against the CRC: a picture of the image, not the image."""
    c = Container.from_bytes(data)
    if preview:
        return _preview(c, model, device, progress, preview)
    try:
        return _decode(c, model, device, progress)
    except CorruptFileError as e:
        if c.tiles and c.version < 4:  # float coding tables: their last bits depend on the CPU
            raise CorruptFileError(
                f"{e}; coding tables of version {c.version} depend on the kind of CPU that wrote the file:"
                " decode it on that kind of machine"
            ) from None
        raise


def _decode(c: Container, model: str | Model | None, device: str, progress: Progress) -> Image.Image:
    colour = rest = None
    if c.tiles:
        channels, mdl = _colour_channels(c, model, device)
        colour = np.empty((c.height, c.width, channels), dtype=np.uint8)
        if mdl is not None:
            kernels.count(c.width * c.height)
        for i, ((x, y, tw, th), t) in enumerate(zip(boxes(c.width, c.height, c.tile_side), c.tiles)):
            if c.is_classical(i):
                colour[y : y + th, x : x + tw] = _decode_classical(t, tw, th, channels, progress)
            else:
                colour[y : y + th, x : x + tw] = _flowcode().decode_tile(
                    mdl, t, tw, th, device, c.adapted, c.version, progress
                )
    if c.rest is not None:
        rmode = rest_mode(c.mode) if c.tiles or c.mode in ("P", "PA") else c.mode
        rest = decode_rest(c.rest_method, c.rest, rmode, (c.width, c.height))
    if (bool(c.tiles) and c.mode in WITH_ALPHA) != (rest is not None and colour is not None) or (
        colour is None and rest is None
    ):
        raise CorruptFileError("the parts present do not match the image mode")
    im = merge(c.mode, (c.width, c.height), colour, rest)
    im = apply_meta(im, c.meta)
    if signature(im, c.meta or b"") != c.crc32:
        raise CorruptFileError(
            "CRC mismatch: decoded pixels differ from the original (corrupted file or non-reproducible decoding)"
        )
    return im


def _preview(c: Container, model, device: str, progress: Progress, k: int) -> Image.Image:
    size = (-(-c.width >> k), -(-c.height >> k))
    if not c.tiles:
        im = decompress(c.to_bytes())
        im = im.convert("RGBA" if "A" in im.getbands() else "L" if im.getbands() == ("L",) else "RGB")
        return im.reduce(1 << k)
    channels, mdl = _colour_channels(c, model, device)
    if mdl and not 1 <= k <= mdl.flow.config.levels:
        raise IdfzipError(f"preview must be 1..{mdl.flow.config.levels} for model {mdl.name}")
    colour = np.empty((size[1], size[0], channels), dtype=np.uint8)
    for i, ((x, y, tw, th), t) in enumerate(zip(boxes(c.width, c.height, c.tile_side), c.tiles)):
        if c.is_classical(i):  # decoded whole (it costs a small part of a flow tile's time) and box-averaged
            part = np.atleast_3d(
                np.asarray(colour_image(_decode_classical(t, tw, th, channels, progress)).reduce(1 << k))
            )
        else:
            part = _flowcode().decode_tile(mdl, t, tw, th, device, c.adapted, c.version, progress, preview=k)
        colour[y >> k : (y >> k) + part.shape[0], x >> k : (x >> k) + part.shape[1]] = part
    im = colour_image(colour)
    if c.mode in WITH_ALPHA and c.rest is not None:
        alpha = decode_rest(c.rest_method, c.rest, rest_mode(c.mode), (c.width, c.height)).reduce(1 << k)
        im.putalpha(alpha)
    return im


def _colour_channels(c: Container, model: str | Model | None, device: str) -> tuple[int, Model | None]:
    """(channels of a flow-coded container's colour part, the model its flow-coded tiles need: None if it has none,
    so a file whose every tile is classical decodes without the model)."""
    if c.flow_tiles:
        mdl = _flowcode().model_for(c, model, device)
        return mdl.flow.config.channels, mdl
    if c.mode not in FLOW_MODES:
        raise CorruptFileError(f"mode {c.mode} cannot have a flow-coded part")
    return FLOW_MODES[c.mode], None


def _flowcode():
    """idfzip.flowcode, imported where a tile needs the flow (it imports torch and the models)."""
    from . import flowcode

    return flowcode


def _decode_classical(data: bytes, w: int, h: int, channels: int, progress: Progress) -> np.ndarray:
    """One classically coded tile's pixels (h, w, channels) from its VP8L stream."""
    mode = "RGB" if channels == 3 else "L"
    x = np.atleast_3d(np.asarray(decode_vp8l(data, mode, (w, h))))
    if progress:
        progress(w * h)
    return x
