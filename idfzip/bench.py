"""Benchmark: idfzip against classical lossless codecs on the same pixels, every codec verified exact.

Figures: bits = whole file bytes x 8; bpd = bits / (width x height x channels); totals are sums over images
(total bpd = total bits / total sub-pixels). The NLL is the models' ideal code length of the colour parts (also
where the classical coding came out smaller and was kept), without header: of RGB by the given model, of L
(grey images) by the grey model unless the given model codes one channel (the summary names both). Times are
in-process wall seconds per image (the model is loaded once, before timing). Speeds are in MB/s of raw 8-bit sub-pixels. With
``process`` > 0 the first images are also coded by whole ``idfzip compress`` / ``decompress`` processes (start-up,
model loading, PNG reading and writing included: what a user waits for), whose files must be the in-process
bytes and whose output the image.

Every image is benchmarked as its 8-bit pixels: L, LA, RGB or RGBA (palette and 1-bit images are expanded to
those first, so that all codecs see the same sub-pixels). Images with more than 8 bits per sample are skipped.

Baselines (``pip install idfzip[bench]``): PNG (Pillow, optimize, level 9), WebP lossless (Pillow, method 6),
JPEG 2000 reversible 5/3 with the reversible colour transform (imagecodecs/OpenJPEG), JPEG-LS (imagecodecs/
CharLS), JPEG-XL lossless at effort 7 (imagecodecs/libjxl), and when asked for (``jpegxl9``) at effort 9. A codec
this machine lacks is reported as skipped. idfzip's row is the product as a user gets it (tiles where WebP is smaller
coded as WebP, format version 11); the summary says how many tiles took each path.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from . import codec
from .errors import IdfzipError, InputImageError
from .imagefile import Source, find_images
from .planes import same_image
from .zoo import Model

CODECS = ("png", "webp", "jpeg2000", "jpegls", "jpegxl", "jpegxl9")
DEFAULT_COMPARE = CODECS[:5]  # jpegxl9 only when asked for: it is slow
PATHS = ("flow_tiles", "webp_tiles", "whole_images")  # tiles the flow coded, tiles WebP coded, images stored whole
JPEGXL_EFFORT = 7
JPEGXL_MAX_EFFORT = 9  # jpegxl9's
LABELS = {
    "idfzip": "idfzip",
    "png": "PNG (level 9)",
    "webp": "WebP lossless (m6)",
    "jpeg2000": "JPEG 2000 (5/3)",
    "jpegls": "JPEG-LS",
    "jpegxl": f"JPEG-XL (e{JPEGXL_EFFORT})",
    "jpegxl9": f"JPEG-XL (e{JPEGXL_MAX_EFFORT})",
}
BENCH_MODES = {"L", "LA", "RGB", "RGBA"}


def bench_image(im: Image.Image) -> Image.Image:
    """The 8-bit L/LA/RGB/RGBA image every codec is given; InputImageError if the image has deeper samples."""
    if im.mode in BENCH_MODES:
        return im
    if im.mode == "P":
        return im.convert("RGBA" if "transparency" in im.info or im.palette.mode == "RGBA" else "RGB")
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("PA",):
        return im.convert("RGBA")
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return im.convert("RGB")
    raise InputImageError(f"mode {im.mode}: the benchmark compares 8-bit images only")


# ---------------------------------------------------------------------------------------------- baselines
def _pillow(fmt: str, **params):
    def encode(a: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format=fmt, **params)
        return buf.getvalue()

    def decode(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)

    return encode, decode


def _imagecodecs(name: str):
    import imagecodecs

    if name == "jpeg2000":

        def encode(a):
            return imagecodecs.jpeg2k_encode(a, level=0, reversible=True, mct=a.ndim == 3 and a.shape[2] >= 3)

        return encode, imagecodecs.jpeg2k_decode
    if name == "jpegls":
        return (lambda a: imagecodecs.jpegls_encode(a, level=0)), imagecodecs.jpegls_decode
    if name in ("jpegxl", "jpegxl9"):
        effort = JPEGXL_EFFORT if name == "jpegxl" else JPEGXL_MAX_EFFORT

        def encode(a):
            return imagecodecs.jpegxl_encode(a, lossless=True, effort=effort, numthreads=1)

        return encode, imagecodecs.jpegxl_decode
    raise ValueError(name)


def baseline(name: str):
    """(encode(array) -> bytes, decode(bytes) -> array) for a codec name; raises if it is unavailable."""
    if name == "png":
        return _pillow("PNG", optimize=True, compress_level=9)
    if name == "webp":
        from PIL import features

        if not features.check("webp"):
            raise RuntimeError("Pillow was built without WebP")
        return _pillow("WEBP", lossless=True, quality=100, method=6, exact=True)
    if name in ("jpeg2000", "jpegls", "jpegxl", "jpegxl9"):
        return _imagecodecs(name)
    raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")


def _same(a: np.ndarray, b) -> bool:
    """b decodes to exactly a (a grey image may come back as RGB(A) with equal colour channels: WebP)."""
    b = np.asarray(b)
    if b.ndim == 3 and b.shape[2] in (3, 4) and (a.ndim == 2 or a.shape[2] == 2) and b.shape[:2] == a.shape[:2]:
        grey = a if a.ndim == 2 else a[..., 0]
        a = np.stack([grey] * 3 + ([a[..., 1]] if a.ndim == 3 else []), 2)
    return b.dtype == a.dtype and b.size == a.size and np.array_equal(a, b.reshape(a.shape))


def _probe(name: str):
    """The codec's functions after a round trip of a tiny image, or the reason it cannot run here."""
    try:
        enc, dec = baseline(name)
        a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
        if not _same(a, dec(enc(a))):
            return None, "does not round-trip exactly on this machine"
        return (enc, dec), None
    except ImportError as e:
        return None, f"not installed ({e.name or e}); pip install idfzip[bench]"
    except Exception as e:  # a codec library missing a part, or failing in its own way
        return None, f"unavailable ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------------------------- results
@dataclass
class Totals:
    bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    exact: bool = True


@dataclass
class Result:
    model_name: str
    model_sha256: str
    effort: int = codec.DEFAULT_EFFORT
    flow_only: bool = False
    images: list[dict] = field(default_factory=list)
    subpixels: int = 0
    nll_bits: float = 0.0
    ours: Totals = field(default_factory=Totals)
    process: Totals = field(default_factory=Totals)  # whole processes, on the first images
    baselines: dict[str, Totals] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    skipped_images: dict[str, str] = field(default_factory=dict)
    others: dict[str, str] = field(default_factory=dict)  # name -> sha256 of the models that coded other kinds
    paths: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PATHS, 0))  # how idfzip coded the pixels
    _files: dict[int, tuple] = field(default_factory=dict, repr=False)  # image index -> (source, idfzip's bytes)
    _keep: int = field(default=0, repr=False)  # how many images' files to keep in _files
    jobs: tuple[int, int] = (1, 0)  # (images at once, torch threads of each job; 0: this process's)

    @property
    def process_images(self) -> list[dict]:
        """The records of the images also timed as whole processes."""
        return [i for i in self.images if "process_encode_s" in i]

    @property
    def process_subpixels(self) -> int:
        return sum(i["width"] * i["height"] * i["channels"] for i in self.process_images)

    def bpd(self, nbytes: int) -> float:
        return 8.0 * nbytes / max(1, self.subpixels)

    def to_json(self) -> dict:
        o = self.ours
        return {
            "model": {"name": self.model_name, "sha256": self.model_sha256},
            "other_models": {name: {"sha256": sha} for name, sha in self.others.items()},
            "effort": self.effort,
            "flow_only": self.flow_only,
            "jobs": self.jobs[0],
            "threads_per_job": self.jobs[1],
            "images": self.images,
            "total": {
                "images": len(self.images),
                "subpixels": self.subpixels,
                "bytes": o.bytes,
                "bpd": self.bpd(o.bytes),
                "nll_bpd": self.nll_bits / max(1, self.subpixels),
                "encode_s": o.encode_s,
                "decode_s": o.decode_s,
                "process": {
                    "images": len(self.process_images),
                    "subpixels": self.process_subpixels,
                    "encode_s": self.process.encode_s,
                    "decode_s": self.process.decode_s,
                    "exact": self.process.exact,
                },
            },
            "baselines": {
                k: {
                    "bytes": t.bytes,
                    "bpd": self.bpd(t.bytes),
                    "encode_s": t.encode_s,
                    "decode_s": t.decode_s,
                    "exact": t.exact,
                }
                for k, t in self.baselines.items()
            },
            "skipped": {"codecs": self.skipped, "images": self.skipped_images},
            "paths": self.paths,
        }

    def rows(self) -> list[tuple[str, float, float | None, float, float, bool]]:
        """(codec, bpd, ratio to PNG, encode MB/s, decode MB/s, exact) for idfzip and each baseline."""
        mb = self.subpixels / 1e6
        png = self.baselines.get("png")
        out = []
        for name, t in [("idfzip", self.ours), *self.baselines.items()]:
            ratio = t.bytes / png.bytes if png and png.bytes else None
            out.append(
                (name, self.bpd(t.bytes), ratio, mb / max(t.encode_s, 1e-9), mb / max(t.decode_s, 1e-9), t.exact)
            )
        return out

    def table(self) -> str:
        lines = [f"{'codec':<20} {'bpd':>7} {'vs PNG':>7} {'enc MB/s':>9} {'dec MB/s':>9}  exact"]
        for name, bpd, ratio, enc, dec, exact in self.rows():
            r = f"{ratio:7.3f}" if ratio is not None else f"{'-':>7}"
            lines.append(f"{LABELS[name]:<20} {bpd:7.3f} {r} {enc:9.3f} {dec:9.3f}  {'yes' if exact else 'NO'}")
        j, t = self.jobs
        jobs = f"{j} jobs of {t} thread{'s' * (t != 1)} (times per image in its job), " if j > 1 else ""
        lines.append(
            f"{len(self.images)} images, {self.subpixels:,} sub-pixels; model {self.model_name} "
            f"({self.model_sha256[:16]}){''.join(f', {n} ({h[:16]})' for n, h in self.others.items())}, "
            f"effort {self.effort}{', flow only' if self.flow_only else ''}, {jobs}"
            f"NLL {self.nll_bits / max(1, self.subpixels):.4f} bpd"
        )
        p = self.paths
        lines.append(
            f"idfzip's paths: {p['flow_tiles']} tiles by the flow, {p['webp_tiles']} as WebP; "
            f"{p['whole_images']} image{'s' * (p['whole_images'] != 1)} stored whole classically"
        )
        if self.process_subpixels:
            mb, p = self.process_subpixels / 1e6, self.process
            n = len(self.process_images)
            first = f"first {n} image{'s' * (n != 1)}"
            lines.append(
                f"idfzip as whole processes ({first}): enc {mb / max(p.encode_s, 1e-9):.3f} MB/s "
                f"({p.encode_s / n:.2f} s per image), dec {mb / max(p.decode_s, 1e-9):.3f} MB/s "
                f"({p.decode_s / n:.2f} s per image), {'exact' if p.exact else 'NOT EXACT'}"
            )
        for name, why in self.skipped.items():
            lines.append(f"skipped {name}: {why}")
        for name, why in self.skipped_images.items():
            lines.append(f"skipped image {name}: {why}")
        return "\n".join(lines)


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def run(
    sources: Iterable[Source],
    model: Model,
    compare: Iterable[str] = DEFAULT_COMPARE,
    device: str = "cpu",
    progress: Callable[[dict | None], None] | None = None,
    process: int = 0,
    effort: int = codec.DEFAULT_EFFORT,
    flow_only: bool = False,
    jobs: int = 1,
    threads: int = 0,
) -> Result:
    """Benchmark ``sources`` (see :func:`idfzip.imagefile.find_images`) with ``model`` at ``effort`` and the
    baselines; the first ``process`` images also as whole CLI processes. ``progress`` gets each image's record
    once it is done (None for an image skipped). ``flow_only``: idfzip codes every tile by the model, never WebP
    (a measure of the model, not of the product). ``jobs`` > 1: that many images at once in worker processes of
    ``threads`` torch threads each (their times are each image's own, in its job); the whole processes run
    after them, one at a time."""
    res = Result(model.name, model.sha256.hex(), effort, flow_only, _keep=process, jobs=(jobs, threads))
    names = []
    for name in compare:
        fns, why = _probe(name)
        if fns is None:
            res.skipped[name] = why
        else:
            names.append(name)
            res.baselines[name] = Totals()
    sources = list(sources)
    args = (model.path if jobs > 1 else model, names, device, effort, flow_only)
    if jobs > 1:
        import concurrent.futures as cf
        import multiprocessing

        with cf.ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_job_start, initargs=(threads,)
        ) as pool:
            for src, out in zip(sources, pool.map(_measure, sources, *[[a] * len(sources) for a in args])):
                _add(res, src, out, progress)
    else:
        for src in sources:
            _add(res, src, _measure(src, *args), progress)
    for record in res.images[:process]:
        _whole_processes(res, record, model, device, effort, flow_only)
    return res


def _job_start(threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


def _measure(src: Source, model: Model | str, names: list[str], device: str, effort: int, flow_only: bool):
    """One image: (its record, the sha256 of the model that coded it) or the reason it was skipped (str)."""
    if isinstance(model, str):
        from . import zoo

        model = zoo.with_device(zoo.load(model), device)
    try:
        im = bench_image(src.open())
    except IdfzipError as e:
        return str(e).removeprefix(src.name + ": ")
    (data, stats), enc_s = _timed(codec.compress_with_stats, im, model, None, device, None, effort, flow_only)
    try:
        back, dec_s = _timed(codec.decompress, data, model, device)
        exact = same_image(back, im)
    except IdfzipError:
        dec_s, exact = 0.0, False
    n = stats.subpixels
    nll = stats.nll_bits or 8.0 * len(data)  # an image without colour part has no model: its file is its code
    record = {
        "file": src.name,
        "width": im.width,
        "height": im.height,
        "channels": len(im.getbands()),
        "bytes": len(data),
        "bpd": 8.0 * len(data) / n,
        "nll_bpd": nll / n,
        "tiles": stats.tiles,
        "webp_tiles": stats.classical_tiles,
        "encode_s": enc_s,
        "decode_s": dec_s,
        "exact": exact,
        "baselines": {},
    }
    a = np.asarray(im)
    for name in names:
        enc, dec = baseline(name)
        blob, e_s = _timed(enc, a)
        out, d_s = _timed(dec, blob)
        record["baselines"][name] = {"bytes": len(blob), "bpd": 8.0 * len(blob) / n, "encode_s": e_s}
        record["baselines"][name].update(decode_s=d_s, exact=_same(a, out))
    other = stats.model_sha256 if stats.model_sha256 and stats.model_sha256 != model.sha256 else None
    return record, (stats.method.removeprefix("flow:"), other, nll), data


def _add(res: Result, src: Source, out, progress) -> None:
    """Add one image's measurement (``_measure``) to ``res``."""
    if isinstance(out, str):
        res.skipped_images[src.name] = out
        if progress:
            progress(None)
        return
    record, (method, other, nll), data = out
    if other:  # grey images: the grey model
        res.others[method] = other.hex()
    n = record["width"] * record["height"] * record["channels"]
    res.subpixels += n
    res.nll_bits += nll
    res.paths["flow_tiles"] += record["tiles"] - record["webp_tiles"]
    res.paths["webp_tiles"] += record["webp_tiles"]
    res.paths["whole_images"] += not record["tiles"]
    o = res.ours
    o.bytes += record["bytes"]
    o.encode_s += record["encode_s"]
    o.decode_s += record["decode_s"]
    o.exact &= record["exact"]
    for name, b in record["baselines"].items():
        t = res.baselines[name]
        t.bytes += b["bytes"]
        t.encode_s += b["encode_s"]
        t.decode_s += b["decode_s"]
        t.exact &= b["exact"]
    res.images.append(record)
    if len(res.images) <= res._keep:  # for the whole processes
        res._files[len(res.images) - 1] = (src, data)
    if progress:
        progress(record)


def saving_report(
    sources: list[Source],
    new: Model,
    old: Model,
    compare: Iterable[str] = ("png", "jpegxl"),
    device: str = "cpu",
    effort: int = codec.DEFAULT_EFFORT,
) -> tuple[str, dict]:
    """What a trained model saves: ``sources`` (held-out files) coded as whole files at ``effort`` by ``new`` and
    by ``old`` (the model it would replace), beside the classical codecs of ``compare`` that are installed.
    Returns (the lines a user reads, the figures); IdfzipError if any file does not decode exactly."""
    mine = run(sources, new, compare, device, effort=effort)
    theirs = run(sources, old, (), device, effort=effort)
    if not (mine.ours.exact and theirs.ours.exact and all(t.exact for t in mine.baselines.values())):
        raise IdfzipError("a held-out file did not decode exactly: the model is not usable")
    rows = [(f"{new.name} (new)", mine.ours.bytes), (f"{old.name} (before)", theirs.ours.bytes)]
    rows += [(LABELS[k], t.bytes) for k, t in mine.baselines.items()]
    n = len(mine.images)
    names = ", ".join(Path(i["file"]).name for i in mine.images[:8]) + (", ..." if n > 8 else "")
    lines = [f"What it saves on the {n} held-out file{'s' * (n != 1)} ({names}), coded whole at effort {effort}:"]
    width = max(len(r[0]) for r in rows)
    for label, nbytes in rows:
        lines.append(f"  {label:<{width}} {nbytes:>12,} bytes {mine.bpd(nbytes):7.3f} bpd")
    figures = {
        "files": [i["file"] for i in mine.images],
        "subpixels": mine.subpixels,
        "effort": effort,
        "new": {
            "name": new.name,
            "sha256": new.sha256.hex(),
            "bytes": mine.ours.bytes,
            "bpd": mine.bpd(mine.ours.bytes),
        },
        "before": {"name": old.name, "bytes": theirs.ours.bytes, "bpd": mine.bpd(theirs.ours.bytes)},
        "baselines": {k: {"bytes": t.bytes, "bpd": mine.bpd(t.bytes)} for k, t in mine.baselines.items()},
    }
    saving = 100.0 * (1.0 - mine.ours.bytes / max(1, theirs.ours.bytes))
    figures["saving_percent"] = saving
    verdict = f"{new.name} is {abs(saving):.1f}% {'smaller' if saving >= 0 else 'LARGER'} than {old.name}"
    for k, t in mine.baselines.items():
        verdict += f", {mine.ours.bytes / max(1, t.bytes):.3f}x {LABELS[k]}"
    lines.append(f"  {verdict}; every file exact" + "".join(f"\n  ({k} skipped: {w})" for k, w in mine.skipped.items()))
    return "\n".join(lines), figures


def _whole_processes(res: Result, record: dict, model: Model, device: str, effort: int, flow_only: bool) -> None:
    """Time ``idfzip compress`` and ``idfzip decompress`` of the image of ``record`` as new processes (same
    model, device and thread count) and check them against the in-process file; adds to ``record``."""
    import torch

    src, data = res._files[res.images.index(record)]
    im = bench_image(src.open())

    shared = ["--threads", str(torch.get_num_threads()), "--model", model.path, "--device", device, "-f"]
    with tempfile.TemporaryDirectory(prefix="idfzip-bench-") as d:
        src, packed, back = Path(d, "in.png"), Path(d, "in.idfz"), Path(d, "back.png")
        im.save(src)
        times = []
        compress = ["compress", *shared, "-e", str(effort), *["--flow-only"] * flow_only, "-q", "-o", packed, src]
        for args in (compress, ["decompress", *shared, "-o", back, packed]):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "idfzip.cli", *map(str, args)], capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if r.returncode:
                raise IdfzipError(f"whole-process {args[0]} failed: {r.stderr.strip()[-300:]}")
        exact = packed.read_bytes() == data and same_image(Image.open(back), im)
    p = res.process
    p.encode_s += times[0]
    p.decode_s += times[1]
    p.exact &= exact
    record.update(process_encode_s=times[0], process_decode_s=times[1], process_exact=exact)


def plot(res: Result, path: str) -> None:
    """A PNG chart: bpd per codec (lower is better) beside encode and decode speed (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(res.rows(), key=lambda r: r[1])
    names = [LABELS[r[0]] for r in rows]
    colors = ["#d62728" if r[0] == "idfzip" else "#7f7f7f" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 2), sharey=True)
    y = np.arange(len(rows))
    ax1.barh(y, [r[1] for r in rows], color=colors)
    for i, r in enumerate(rows):
        ax1.text(r[1], i, f" {r[1]:.3f}", va="center")
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlabel("bits per sub-pixel (lower is better)")
    ax1.set_xlim(0, max(r[1] for r in rows) * 1.2)
    h = 0.38
    ax2.barh(y - h / 2, [r[3] for r in rows], h, label="encode", color="#1f77b4")
    ax2.barh(y + h / 2, [r[4] for r in rows], h, label="decode", color="#ff7f0e")
    ax2.set_xscale("log")
    ax2.set_xlabel("MB/s of raw pixels (higher is better, log scale)")
    ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.suptitle(
        f"{len(res.images)} images, {res.subpixels:,} sub-pixels, model {res.model_name}; every codec verified lossless"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["CODECS", "Result", "bench_image", "baseline", "find_images", "plot", "run", "saving_report"]
