"""The colour part through the flow, tile by tile: each tile's latents, its segments' mixtures and its
entropy-coded stream (encode_tile, decode_tile), the encoder's fitting plan per effort, WebP's tries beside
the flow (encode_colour) and the models a part needs. It imports torch (itself and through adapt, coding,
priors and zoo); idfzip.codec imports it only for an image or a file that needs the flow, so a file whose every
tile is classical decodes without loading torch.

Invariant: tiles are coded independently (batch of one, the same tensor shapes when encoding and decoding),
each padded by edge replication to a multiple of 2**levels; a segment's mixture depends only on the segments
before it in ``schedule``, so encoder and decoder compute the same integers on any thread count.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from . import adapt, kernels
from .coding import Decoder, Encoder, max_symbols
from .container import FLOW_VERSION, MIXED, MODEL_HASH_BYTES, SPLIT, Container, boxes, layout, split_windows
from .errors import CorruptFileError, ModelMismatchError
from .planes import FLOW_MODES, colour_image, encode_vp8l
from .priors import FloatMixture, IntMixture
from .zoo import Model, default_model, load, load_by_hash, load_named, with_device

Progress = Callable[[float], None] | None  # called with the pixels done since the last call (fractions too)

FEW_OFFSETS = 1 << 16  # pixels: an image this small is also coded without offsets (efforts 5-9), the smaller kept
WEBP_QUICK = (4, 50)  # the WebP (method, quality) every tile is also coded with ...
WEBP_CLOSE = 1.1  # ... and at efforts 5-9 with method 6 too where that comes within this factor of the flow, at
WEBP_FULL_QUALITY = 80  # this quality (Pillow's lossless default): on 12 tiles of 256 of photos and graphics
# (examples/sample.png, the golden mixed and graphic, kodim05, kodim20) method 6 at quality 100 took 81 s for
# 0.55% fewer bytes than at 80 (4.3 s), and method 4 at quality 50 1.8 s, 0.27% more than at 100 (6.2 s)


@dataclass(frozen=True)
class FitPlan:
    """How the encoder fits a tile's adaptation (idfzip.adapt): the 4-parameter search on about ``symbols``
    symbols per stream (0: no adaptation); ``offsets`` > 0 also fits per-component offsets on about that many
    (format version 6); ``delta`` > 0 also output updates on about that many positions per slot (version 7)."""

    symbols: int
    offsets: int = 0
    steps: int = 0  # of the offsets' fit
    delta: int = 0
    delta_steps: int = 0
    gain: int = adapt.MIN_GAIN  # the search's least saving per step (idfzip.adapt._pattern) ...
    coarse: int = adapt.COARSE_STEPS  # ... and its steps on half the sample (idfzip.adapt._search)
    webp: int = 6  # the method also tried where the quick one comes close to the flow (WEBP_QUICK's: none; 0: no WebP)


def fit_plan(effort: int) -> FitPlan:
    """Effort 1: no adaptation (fastest encode); 2-3: the search on half the usual sample; 4: the usual search;
    5 (default) and 6: also offsets and gains fitted on 2**12 symbols per stream in 8 and 12 steps (format
    version 6's blocks); 7: the same in 16 steps, and output updates of the slots of at least
    adapt.DELTA_MIN_SYMBOLS * C / 3 symbols (format version 7), fitted on 2**15 positions in 20 damped
    Gauss-Newton steps; 8-9: offsets and gains on 2**14 symbols, updates in 40 and 80 steps. The search stops
    where a step saves less than 1/4 bit on its sample (adapt.MIN_GAIN), at efforts 7-9 about 1e-3 bits
    (adapt.FINE_GAIN); it runs on half its sample throughout, at efforts 7-9 its last two steps on all of it
    (adapt.COARSE_STEPS, FINE_COARSE_STEPS). Every tile is also coded with WebP's quick method (WEBP_QUICK), and
    at efforts 5-9 with its slowest where that comes close to the flow. Decoding costs about the same at every
    effort."""
    if effort == 1:
        return FitPlan(0, webp=WEBP_QUICK[0])
    if effort <= 3:
        return FitPlan(adapt.FIT_SYMBOLS // 2, webp=WEBP_QUICK[0])
    if effort == 4:
        return FitPlan(adapt.FIT_SYMBOLS, webp=WEBP_QUICK[0])
    if effort <= 6:
        return FitPlan(adapt.FIT_SYMBOLS, 1 << 12, 8 if effort == 5 else 12)
    fine = {"gain": adapt.FINE_GAIN, "coarse": adapt.FINE_COARSE_STEPS}
    offsets = 1 << 12 if effort == 7 else 1 << 14
    return FitPlan(adapt.FIT_SYMBOLS, offsets, 16, 1 << 15, adapt.DELTA_STEPS << (effort - 7), **fine)


def _pad(a: np.ndarray, m: int) -> np.ndarray:
    h, w = a.shape[:2]
    return np.pad(a, ((0, -h % m), (0, -w % m), (0, 0)), mode="edge")


def _gather(t: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, ch, h, w) -> (B, ch, 1, len(pos)): the positions of one pass of a slot (all of them if None)."""
    if pos is None:
        return t
    return t.flatten(2)[:, :, pos.to(t.device)].unsqueeze(2)


def _mixture(raws: list[torch.Tensor], p: torch.Tensor | None, K: int, portable: bool, delta=None):
    """One segment's mixture from per-channel network outputs raws[c] (B, 3K, ...), their adaptation
    p (len(raws), 4) or None and output updates' changes delta (len(raws), 3K, n) or None: integer (version 4)
    or, for older files, float."""
    if portable:
        return IntMixture(torch.cat(raws, 1), K, p, delta)
    return FloatMixture(torch.cat([adapt.apply(r, None if p is None else p[c], K) for c, r in enumerate(raws)], 1), K)


def _symbols(flow, H: int, W: int) -> int:
    """Symbols coded for an H x W (padded) tile: one per pixel and channel."""
    return flow.config.channels * H * W


@dataclass(frozen=True)
class Segment:
    """One coded segment of a tile: the top (``level`` = levels), or pass ``group`` of slot ``slot`` of level
    ``level``, restricted to channel ``channel`` with channel_ar (None: all of the slot's channels)."""

    level: int
    slot: int = 0
    group: int = 0
    channel: int | None = None


def schedule(flow) -> list[Segment]:
    """Every segment of a tile in decode order (docs/FORMAT.md): the top, then levels L-1 .. 0, slots 0, 1, 2,
    passes, channels. The decoder walks it forwards; the encoder walks it backwards (ANS is a stack)."""
    L, C = flow.config.levels, flow.config.channels
    steps = [Segment(L)]
    for level in reversed(range(L)):
        for j in range(3):
            for g in range(flow.passes):
                steps += [Segment(level, j, g, c) for c in range(C)] if flow.n_ar else [Segment(level, j, g)]
    return steps


class _Tile:
    """The latents of one padded H x W tile, complete (encoder) or filled in segment by segment (decoder), and
    the mixture of each segment. A segment's mixture depends only on segments before it in ``schedule``, so
    the encoder (which knows every latent) computes exactly the decoder's mixtures, in either direction."""

    def __init__(
        self, flow, H: int, W: int, device: str, version: int, params: adapt.Params, deltas: adapt.Deltas, fitting=False
    ):
        """``deltas``: output updates (version 7); ``fitting``: the encoder fits them (``fit``), so every slot's
        last hidden activations are kept."""
        self.flow, self.device, self.params, self.deltas, self.fitting = flow, device, params, deltas, fitting
        self.portable = version >= 4  # integer coding tables
        self.integer = version >= 5  # the networks' integer mode
        self.L, self.C, self.K = flow.config.levels, flow.config.channels, flow.config.mixtures
        shape = [(H >> (lv + 1), W >> (lv + 1)) for lv in range(self.L)]
        self.z = [torch.zeros((1, 3 * self.C) + s, dtype=torch.long, device=device) for s in shape]
        self.groups = [flow.groups(*s) for s in shape]
        self.kept: dict[int, torch.Tensor] = {}  # level -> its kept channels; kept[L - 1] is the top
        self.top_shape = (1, self.C) + shape[-1]
        self._slot: tuple[int, int] | None = None  # the slot whose passes' network outputs are cached
        self._raw: dict[int, torch.Tensor] = {}
        self._feat: dict[int, torch.Tensor] = {}  # and their last hidden activations (hidden, n), if needed
        self._dq: dict[int, np.ndarray] = {}  # and the changes of the slot's output updates (C, 3K, n)

    def encode(self, pixels: np.ndarray) -> None:
        """All latents of a tile's pixels (encoder)."""
        x = torch.from_numpy(_pad(pixels, self.flow.multiple).astype(np.int64)).permute(2, 0, 1)[None].contiguous()
        x = self.flow.color_encode(x.to(self.device), self.integer)
        for level in range(self.L):
            x, self.z[level] = self.flow.level_encode(level, x, self.integer)
            self.kept[level] = x

    def pixels(self) -> torch.Tensor:
        """The padded tile's pixels (1, C, H, W) once every segment is stored (decoder)."""
        return self.flow.color_decode(self.flow.level_decode(0, self._kept(0), self.z[0], self.integer), self.integer)

    def _kept(self, level: int) -> torch.Tensor:
        if level not in self.kept:  # decoder: level + 1 is complete by the time level is needed
            self.kept[level] = self.flow.level_decode(level + 1, self._kept(level + 1), self.z[level + 1], self.integer)
        return self.kept[level]

    def symbols(self, seg: Segment) -> torch.Tensor:
        if seg.level == self.L:
            return self.kept[self.L - 1]
        zg = _gather(self.z[seg.level][:, seg.slot * self.C : (seg.slot + 1) * self.C], self._pos(seg))
        return zg if seg.channel is None else zg[:, seg.channel : seg.channel + 1]

    def store(self, seg: Segment, values: torch.Tensor) -> None:
        values = values.to(self.device)
        if seg.level == self.L:
            self.kept[self.L - 1] = values.view(self.top_shape)
            return
        c0 = seg.slot * self.C + (seg.channel or 0)
        c1 = c0 + (1 if seg.channel is not None else self.C)
        z = self.z[seg.level]
        pos = self._pos(seg)
        if pos is None:
            z[:, c0:c1] = values.view((1, c1 - c0) + z.shape[2:])
        else:
            z.view(1, z.shape[1], -1)[:, c0:c1, pos.to(self.device)] = values.view(1, c1 - c0, -1)

    def _pos(self, seg: Segment) -> torch.Tensor | None:
        return self.groups[seg.level][seg.group]

    def channel_raws(self, level: int, j: int, g: int) -> list[torch.Tensor]:
        """Per channel of pass g of slot j, its network outputs (B, 3K, ...) before adaptation (with channel_ar
        channel c's needs the pass's channels < c, so the decoder asks for it only once they are stored)."""
        if self._slot != (level, j):
            self._slot, self._raw, self._feat, self._dq = (level, j), {}, {}, {}
        if g not in self._raw:
            C, z = self.C, self.z[level]
            ctx = torch.cat([self._kept(level), z[:, : j * C]], 1)
            feats = None
            pos = self.groups[level][g]
            if self.fitting or (level, j) in self.deltas:
                shape = (1, self.flow.config.prior_hidden) + (z.shape[2:] if pos is None else (1, len(pos)))
                feats = torch.empty(shape, dtype=torch.uint8, device=self.device)
            self._raw[g] = self.flow.prior_raw(level, j, ctx, z[:, j * C : (j + 1) * C], g, self.integer, feats, pos)
            if feats is not None:
                self._feat[g] = feats.flatten(2)[0]
        raw, K = self._raw[g], self.K
        if self.flow.n_ar:
            zg = self.symbols(Segment(level, j, g))
            return [self.flow.channel_raw(raw, c, zg[:, :c]) for c in range(self.C)]
        return [raw[:, c * 3 * K : (c + 1) * 3 * K] for c in range(self.C)]

    def mixture(self, seg: Segment):
        if seg.level == self.L:
            return _mixture([self.flow.top_raw(self.top_shape)], None, self.K, self.portable)
        raws = self.channel_raws(seg.level, seg.slot, seg.group)
        key, g = (seg.level, seg.slot), seg.group
        p = self.params.get(key)
        dq = None
        if key in self.deltas:
            if g not in self._dq:
                self._dq[g] = adapt.delta_q(self.deltas[key], self._feat[g])
            dq = self._dq[g]
        if seg.channel is not None:
            c = seg.channel
            part = None if dq is None else dq[c : c + 1]
            return _mixture([raws[c]], None if p is None else p[c : c + 1], self.K, self.portable, part)
        return _mixture(raws, p, self.K, self.portable, dq)

    def fit(self, level: int, j: int, plan: FitPlan) -> None:
        """Encoder: fit slot j of level l's adaptation to its passes (idfzip.adapt), stored in params, and with
        ``plan.delta`` its output updates where they pay for their bytes, stored in deltas."""
        passes = range(self.flow.passes)
        segments = [(self.symbols(Segment(level, j, g)), self.channel_raws(level, j, g)) for g in passes]
        fit = (plan.symbols, plan.offsets, plan.steps)
        p, saved = adapt.fit_slot(segments, self.C, self.K, *fit, gain=plan.gain, coarse=plan.coarse)
        if self.fitting and adapt.updates_may_pay(sum(z.numel() for z, _ in segments), self.C):
            f = torch.cat([self._feat[g] for g in passes], 1)
            D = adapt.fit_delta(segments, f, self.C, self.K, plan.delta, plan.delta_steps)
            if D.any():
                pd, by = adapt.fit_slot(segments, self.C, self.K, *fit, (D, f), gain=plan.gain, coarse=plan.coarse)
                by -= (8 * (len(adapt.rice_bytes(D)) + 2) + adapt.MARGIN_BITS) << 16
                if by > max(saved, 0):
                    p, self.deltas[level, j] = pd, D
                    self._dq = {}
        if p is not None:
            self.params[level, j] = p


@torch.no_grad()
def encode_tile(
    model: Model, pixels: np.ndarray, device: str, version: int, plan: FitPlan, progress: Progress = None
) -> tuple[adapt.Params, adapt.Deltas, bytes, float]:
    """(adaptation parameters, output updates, entropy-coded stream, its ideal length in bits); ``plan``: how to
    fit the adaptation. ``progress`` gets the tile's pixels in shares, segment by segment."""
    flow = model.flow
    m = flow.multiple
    H, W = -(-pixels.shape[0] // m) * m, -(-pixels.shape[1] // m) * m
    fitting = bool(plan.delta) and flow.config.prior_hidden > 0  # the updates need hidden layers (and version 7)
    tile = _Tile(flow, H, W, device, version, {}, {}, fitting)
    tile.encode(pixels)
    enc = Encoder(split=split_windows(version))
    fitted = set()
    share = pixels.shape[0] * pixels.shape[1] / _symbols(flow, H, W)
    for seg in reversed(schedule(flow)):
        if plan.symbols and seg.level < flow.config.levels and (seg.level, seg.slot) not in fitted:
            fitted.add((seg.level, seg.slot))
            tile.fit(seg.level, seg.slot, plan)
        z = tile.symbols(seg)
        enc.push(z, tile.mixture(seg))
        if progress:
            progress(z.numel() * share)
    return tile.params, tile.deltas, enc.finish(), enc.bits


@torch.no_grad()
def decode_tile(
    model: Model,
    data: bytes,
    w: int,
    h: int,
    device: str,
    adapted: bool,
    version: int,
    progress: Progress = None,
    preview: int = 0,
) -> np.ndarray:
    """One tile's pixels from its stream; ``adapted``: the stream starts with an adaptation block. ``progress``
    gets the tile's pixels in shares, segment by segment. ``preview`` K > 0: decode only the segments of levels
    K and coarser, give the finer levels' latents their likeliest values (each symbol's window centre, from the
    priors, without decoding), invert the flow and return the image box-averaged to 1/2**K scale (ceil(h /
    2**K) x ceil(w / 2**K); approximate, unchecked)."""
    flow = model.flow
    m = flow.multiple
    H, W = -(-h // m) * m, -(-w // m) * m
    params: adapt.Params = {}
    deltas: adapt.Deltas = {}
    if adapted:
        K = flow.config.mixtures
        width = 4 + 6 * K if layout(version) >= 6 else 4
        shape = (3 * K, flow.config.prior_hidden) if layout(version) >= 7 else None
        params, deltas, n = adapt.from_bytes(data, flow.config.levels, flow.config.channels, width, shape)
        data = data[n:]
    portable = version >= 4
    if portable and _symbols(flow, H, W) > max_symbols(len(data)):
        raise CorruptFileError("entropy-coded stream is too short for its tile")
    dec = Decoder(data, portable, split_windows(version))
    tile = _Tile(flow, H, W, device, version, params, deltas)
    share = w * h / _symbols(flow, H, W)
    for seg in schedule(flow):
        mix = tile.mixture(seg)
        # a preview gives the finer levels their likeliest values (each symbol's window centre), not decoded
        tile.store(seg, mix.windows()[0] if seg.level < preview else dec.pop(mix))
        if progress:
            progress(len(mix) * share)
    if preview:
        x = tile.pixels().clamp(0, 255).cpu()[0, :, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)
        return np.atleast_3d(np.asarray(colour_image(x).reduce(1 << preview)))
    x = tile.pixels().cpu()
    dec.check_end()
    if int(x.min()) < 0 or int(x.max()) > 255:
        raise CorruptFileError("decoded pixels out of range (corrupted data or wrong model)")
    return x[0, :, :h, :w].permute(1, 2, 0).numpy().astype(np.uint8)


@dataclass
class Coded:
    """A colour part coded tile by tile: the tile streams, which of them are classical (VP8L streams; empty: none),
    whether the flow's streams start with adaptation blocks, the format version they need, the flow's ideal
    code length in bits (of every tile, also those kept classical), and the bytes of every tile's VP8L stream
    (0 where WebP was not tried)."""

    tiles: list[bytes]
    classical: list[bool]
    adapted: bool
    version: int
    bits: float
    webp_bytes: int = 0

    @property
    def size(self) -> int:
        return sum(map(len, self.tiles))


def _classical_tile(pixels: np.ndarray, quick: bytes | None, flow_bytes: int, plan: FitPlan) -> bytes | None:
    """A tile's VP8L stream where it may be smaller than the flow's ``flow_bytes``: its stream by WebP's quick
    method (``quick``, WEBP_QUICK) decides whether its slowest (``plan.webp``) is worth trying."""
    if quick is None or len(quick) > WEBP_CLOSE * flow_bytes or plan.webp <= WEBP_QUICK[0]:
        return quick
    full = encode_vp8l(colour_image(pixels), plan.webp, WEBP_FULL_QUALITY)
    return full if full is not None and len(full) < len(quick) else quick


@contextmanager
def _beside():
    """A pool of threads, as many as torch has, for WebP's tries beside the flow: Pillow's WebP encoder releases
    the GIL, so they run while the flow codes tiles (whose every step gives the same integers on any thread
    count: the files are the same as with the tries after the flow; kodim05 at the default effort, in-process on
    the 2-core AMD EPYC: 9.16 s against 9.84, medians of 3). Tries not started when the block is left (an error)
    are dropped."""
    pool = ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="idfzip-webp")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_colour(
    model: Model,
    colour: np.ndarray,
    tile: int,
    device: str,
    version: int,
    plan: FitPlan,
    progress: Progress,
) -> Coded:
    """The colour part's tiles, each by the flow or classically (a VP8L stream), whichever is smaller, in format
    ``version``, or the one with layout 6 where the flow's adaptation blocks hold offsets, 7 where some also hold
    output updates (9 and 10 with split windows), and 11-13 (``MIXED`` more) where some tile is classical."""
    h, w = colour.shape[:2]
    kernels.count(h * w)
    C = model.flow.config.channels
    coded, bits = [], 0.0

    def streams(flow: list[bool]) -> tuple[list[bytes], bool, int]:
        """The flow's streams of the tiles marked in ``flow``, whether they have adaptation blocks, their layout:
        the blocks are stored only when some such tile is adapted; then every one has one (an unadapted: 1 byte)."""
        kept = [t for t, f in zip(coded, flow) if f]
        if not any(params or deltas for params, deltas, _ in kept):
            return [s for _, _, s in kept], False, layout(version)
        base = 7 if any(deltas for _, deltas, _ in kept) else 6 if plan.offsets else layout(version)
        return [adapt.to_bytes(params, C, deltas if base >= 7 else None) + s for params, deltas, s in kept], True, base

    pixels = [colour[y : y + th, x : x + tw] for x, y, tw, th in boxes(w, h, tile)]
    webp = version >= FLOW_VERSION and plan.webp  # (files of version 4 have no classical tiles)
    with _beside() as pool:
        quick = [pool.submit(lambda px: encode_vp8l(colour_image(px), *WEBP_QUICK), px) for px in pixels if webp]
        for px in pixels:
            params, deltas, s, b = encode_tile(model, px, device, version, plan, progress)
            coded.append((params, deltas, s))
            bits += b
        flow, adapted, base = streams([True] * len(coded))
        classical = [None] * len(coded)
        if webp:  # the slow method where it is worth trying, side by side
            tries = [
                pool.submit(_classical_tile, px, q.result(), len(f), plan) for px, q, f in zip(pixels, quick, flow)
            ]
            classical = [t.result() for t in tries]
    marks = [v is not None and len(v) < len(f) for v, f in zip(classical, flow)]
    if any(marks):
        flow, adapted, base = streams([not m for m in marks])
        kept = iter(flow)
        tiles = [classical[i] if m else next(kept) for i, m in enumerate(marks)]
    else:
        tiles, marks = flow, []
    out = Coded(
        tiles, marks, adapted, base + (SPLIT if split_windows(version) else 0) + (MIXED if any(marks) else 0), bits
    )
    if all(v is not None for v in classical):
        out.webp_bytes = sum(map(len, classical))
    if base == 6 and h * w <= FEW_OFFSETS:  # the offsets' bytes may outweigh what they save: try without
        plain = replace(plan, offsets=0, steps=0, delta=0, delta_steps=0)  # (so version 8's blocks)
        alt = encode_colour(model, colour, tile, device, version, plain, None)
        if alt.size < out.size:
            return alt
    return out


def _given(model: str | Model | None, channels: int | None, device: str) -> Model | None:
    """The model the user gave, if any and if it codes colour parts of ``channels`` channels (None: any); a
    model of the other kind leaves the image to its kind's model (a photo model given for a folder leaves its
    grey images to the grey model, a decoder given one the file's)."""
    mdl = model if isinstance(model, Model) else with_device(load(model), device) if model else None
    return mdl if mdl is not None and channels in (None, mdl.flow.config.channels) else None


def flow_model(model: str | Model | None, channels: int, device: str) -> Model:
    """The model for a colour part of ``channels`` channels: the given one, else the shipped default."""
    return _given(model, channels, device) or with_device(load(default_model(channels)), device)


def model_for(c: Container, model: str | Model | None, device: str) -> Model:
    """The model a flow-coded container needs: ``model`` if given (checked against the file), else the one
    the file names."""
    mdl = _given(model, FLOW_MODES.get(c.mode), device) or with_device(
        load_by_hash(c.model_hash) if c.by_hash else load_named(c.model_name, c.model_hash), device
    )
    if all(h[:MODEL_HASH_BYTES] != c.model_hash for h in mdl.hashes(c.version)):
        written = f"model {c.flow_model!r}" if c.flow_model else "a shipped model"
        raise ModelMismatchError(
            f"file was written with {written} ({c.model_hash.hex()}), "
            f"available model {mdl.name!r} is {mdl.sha256[:MODEL_HASH_BYTES].hex()}"
        )
    if c.tile % mdl.flow.multiple:
        raise CorruptFileError(f"tile size {c.tile} does not suit model {mdl.name}")
    if FLOW_MODES.get(c.mode) != mdl.flow.config.channels:  # a corrupted mode, or a shipped model of another kind
        raise CorruptFileError(f"mode {c.mode} cannot have a flow-coded part of {mdl.flow.config.channels} channels")
    return mdl
