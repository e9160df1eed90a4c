"""What the flows do not code: splitting images of every Pillow mode, and coding the rest losslessly.

An image is split into an optional 8-bit colour part (RGB of modes RGB and RGBA, coded by a 3-channel flow;
L of modes L and LA, by a 1-channel flow), a *rest* image (alpha, palette indices, 1-bit, 16-bit or float
data, any other mode) and *meta* (palette, transparency). An image whose colour part the encoder codes
classically after all (too small, one colour) is stored whole as the rest.
The rest is coded with whichever of these is smallest: a constant (a few bytes: an opaque alpha plane costs
almost nothing), PNG through Pillow (only when it reproduces the pixels exactly), or raw LZMA. So the rest
never costs more than Pillow's PNG of it. A whole image stored classically (and, from format version 11, a tile
of the colour part the flow would code in more bytes) may also be lossless WebP: its bare VP8L bitstream,
without the RIFF wrapper that the decoder rebuilds, checked to reproduce the pixels exactly before it is kept,
and its header's size checked before anything is decoded.

Memory: decoding, merging and hashing go through strips of whole rows (about _STRIP_BYTES each) and never
through ``tobytes()`` of a whole image, so a decoded plane costs about its own size: a file of a few bytes
declaring a 16384x16384 mode F constant plane costs 1 GiB until its CRC fails, not 3. A PNG-coded plane costs
two planes (Pillow decodes it whole, and Pillow refuses PNGs over 2 * MAX_IMAGE_PIXELS pixels).
"""

from __future__ import annotations

import io
import lzma
import struct
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from itertools import chain

import numpy as np
from PIL import Image

from .container import REST_CONSTANT, REST_LZMA, REST_PNG, REST_WEBP, Reader, write_varint
from .errors import CorruptFileError, IdfzipError, InputImageError

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
_PNG_MODES = {"1", "L", "LA", "I;16", "RGB", "RGBA"}
_PALETTE_RAWMODES = ("RGB", "RGBA")
_STRIP_BYTES = 1 << 24


def _rows_per_strip(width: int) -> int:
    return max(1, _STRIP_BYTES // (4 * width))  # no Pillow mode stores more than 4 bytes a pixel


def _strips(im: Image.Image) -> Iterator[bytes]:
    """``im.tobytes()`` in pieces of _rows_per_strip whole rows (the last may have fewer), without ever
    holding a copy of the whole image."""
    n = _rows_per_strip(im.width)
    for y in range(0, im.height, n):
        yield im.crop((0, y, im.width, min(y + n, im.height))).tobytes()


def _assemble(mode: str, size: tuple[int, int], strips: Iterable[bytes]) -> Image.Image:
    """The image whose ``tobytes()`` is the strips' concatenation, strips cut as :func:`_strips` cuts them;
    its only full-size allocation is the image itself."""
    w, h = size
    n = _rows_per_strip(w)
    im = Image.new(mode, size, None)  # not initialised: every row is pasted below
    y, last, piece = 0, None, None
    try:
        for strip in strips:
            if strip is not last:  # a constant plane repeats one strip object
                last, piece = strip, Image.frombytes(mode, (w, min(n, h - y)), strip)
            im.paste(piece, (0, y))
            y += n
    except (ValueError, OSError):
        raise CorruptFileError("plane does not match the image header") from None
    if y < h:
        raise CorruptFileError("plane does not match the image header")
    return im


def as_image(image) -> Image.Image:
    """A PIL image from a PIL image or a numpy array (H, W) / (H, W, 1|2|3|4) of uint8, (H, W) uint16."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.dtype == np.uint8 and (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (2, 3, 4))):
            mode = "L" if a.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[2]]
            return Image.frombytes(mode, (a.shape[1], a.shape[0]), np.ascontiguousarray(a).tobytes())
        if a.dtype == np.uint16 and a.ndim == 2:
            return Image.frombytes("I;16", (a.shape[1], a.shape[0]), np.ascontiguousarray(a, "<u2").tobytes())
        if a.dtype == np.bool_ and a.ndim == 2:
            return Image.fromarray(a)
        raise InputImageError(f"unsupported array of shape {a.shape} and dtype {a.dtype}")
    raise InputImageError(f"expected a PIL image or a numpy array, got {type(image).__name__}")


# ---------------------------------------------------------------------------------------------- meta
def encode_meta(im: Image.Image) -> bytes:
    """Palette, transparency, ICC profile and EXIF: what beyond the pixel bytes decides how an image looks."""
    out = bytearray()
    if im.mode in ("P", "PA") and im.palette is not None:
        rawmode = im.palette.mode if im.palette.mode in _PALETTE_RAWMODES else "RGB"
        pal = bytes(im.getpalette(rawmode) or [])
        out += bytes([1, _PALETTE_RAWMODES.index(rawmode)]) + write_varint(len(pal)) + pal
    t = im.info.get("transparency")
    if isinstance(t, int) and t >= 0:
        out += bytes([2]) + write_varint(t)
    elif isinstance(t, tuple) and all(isinstance(v, int) and v >= 0 for v in t) and len(t) < 256:
        out += bytes([3, len(t)]) + b"".join(write_varint(v) for v in t)
    elif isinstance(t, bytes):
        out += bytes([4]) + write_varint(len(t)) + t
    for tag, key in ((5, "icc_profile"), (6, "exif")):
        v = im.info.get(key)
        if isinstance(v, bytes) and v:
            out += bytes([tag]) + write_varint(len(v)) + v
    return bytes(out)


def apply_meta(im: Image.Image, meta: bytes | None) -> Image.Image:
    r = Reader(meta or b"", "image metadata")
    last = 0
    while r.remaining():
        tag = r.u8()
        if tag <= last:  # tags are written once each, in increasing order
            raise CorruptFileError("invalid image metadata")
        last = 4 if tag in (2, 3, 4) else tag  # 2, 3 and 4 are alternatives: one transparency
        if tag == 1:
            raw = r.u8()
            if raw >= len(_PALETTE_RAWMODES) or im.mode not in ("P", "PA"):
                raise CorruptFileError("invalid palette")
            pal = r.blob()
            if len(pal) % len(_PALETTE_RAWMODES[raw]) or len(pal) > 1024:
                raise CorruptFileError("invalid palette")
            im.putpalette(pal, _PALETTE_RAWMODES[raw])
        elif tag == 2:
            im.info["transparency"] = r.varint()
        elif tag == 3:
            im.info["transparency"] = tuple(r.varint() for _ in range(r.u8()))
        elif tag == 4:
            im.info["transparency"] = r.blob()
        elif tag == 5:
            im.info["icc_profile"] = r.blob()
        elif tag == 6:
            im.info["exif"] = r.blob()
        else:
            raise CorruptFileError("invalid image metadata")
    return im


def signature(im: Image.Image, meta: bytes) -> int:
    """CRC32 of everything that must come back: mode, size, pixel bytes, palette and transparency."""
    crc = zlib.crc32(f"{im.mode}|{im.width}x{im.height}|".encode())
    for strip in _strips(im):  # = zlib.crc32(im.tobytes(), crc), without a copy of the image
        crc = zlib.crc32(strip, crc)
    return zlib.crc32(meta, crc)


def same_image(a: Image.Image, b: Image.Image) -> bool:
    return encode_meta(a) == encode_meta(b) and _same_pixels(a, b)


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    """The same mode, size and pixels, compared strip by strip (no copy of either image)."""
    return a.mode == b.mode and a.size == b.size and all(x == y for x, y in zip(_strips(a), _strips(b)))


# ---------------------------------------------------------------------------------------------- split
FLOW_MODES = {"RGB": 3, "RGBA": 3, "L": 1, "LA": 1}  # the modes with a colour part, and its channels
WITH_ALPHA = ("RGBA", "LA")  # those whose alpha plane is the rest when the colour part goes through a flow


def rest_mode(mode: str) -> str:
    """Mode of the rest image of an image of ``mode`` whose colour part (if any) went through the flow."""
    return {"RGBA": "L", "LA": "L", "P": "L", "PA": "LA"}.get(mode, mode)


def split(im: Image.Image) -> tuple[np.ndarray | None, Image.Image | None]:
    """(colour part (H, W, FLOW_MODES[mode]) uint8 or None, rest image or None): RGB, or the L of L and LA,
    with the alpha plane as the rest."""
    if im.mode in FLOW_MODES:
        a = np.atleast_3d(np.asarray(im))
        C = FLOW_MODES[im.mode]
        alpha = Image.fromarray(np.ascontiguousarray(a[:, :, C]), "L") if a.shape[2] > C else None
        return np.ascontiguousarray(a[:, :, :C]), alpha
    if im.mode in ("P", "PA"):
        return None, Image.frombytes(rest_mode(im.mode), im.size, im.tobytes())
    return None, im


def colour_image(a: np.ndarray) -> Image.Image:
    """The RGB or L image of a colour part (H, W, 3 or 1)."""
    return Image.fromarray(a[:, :, 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


def merge(mode: str, size: tuple[int, int], colour: np.ndarray | None, rest: Image.Image | None) -> Image.Image:
    if colour is not None:
        im = colour_image(colour)
        if mode in WITH_ALPHA:
            im.putalpha(rest)
        return im
    if mode in ("P", "PA"):  # the rest holds the same bytes as L (LA)
        return _assemble(mode, size, _strips(rest))
    return rest


# ---------------------------------------------------------------------------------------------- rest coding
def _png(im: Image.Image) -> bytes | None:
    if im.mode not in _PNG_MODES:
        return None
    buf = io.BytesIO()
    try:
        im.save(buf, format="PNG", optimize=True)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            back.load()
            if not _same_pixels(back, im):
                return None
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- lossless WebP
WEBP_MODES = ("L", "LA", "RGB", "RGBA")  # what a VP8L stream holds exactly (L as R = G = B)
WEBP_MAX_SIDE = 1 << 14  # VP8L stores width - 1 and height - 1 in 14 bits
VP8L_SIGNATURE = 0x2F
WEBP_WHOLE = ((4, 50), (4, 100), (6, 80))  # the (method, quality) tried for a whole image: 4 and 50 is the
# encoder's quick try of each tile (flowcode.WEBP_QUICK, so the whole never loses to a tile of it); 6 and 80 is Pillow's
# lossless=True, method=6, whose file a VP8L stream without its 20 bytes of RIFF wrapper never exceeds (6 and
# 100 took 10 s on examples/sample.png, 12x (4, 100)'s time, for the same bytes)


@lru_cache(maxsize=1)
def _webp() -> bool:
    """Whether Pillow has WebP (PyPI's wheels do; a Pillow built without libwebp does not): asked once, not for
    every tile coded and checked."""
    from PIL import features

    return bool(features.check_module("webp"))


def _riff(vp8l: bytes) -> bytes:
    """The simple-format WebP file (RIFF, WEBP, one VP8L chunk, padded to an even length) around a VP8L stream."""
    pad = b"\0" * (len(vp8l) & 1)
    return (
        b"RIFF" + struct.pack("<I", 12 + len(vp8l) + len(pad)) + b"WEBPVP8L" + struct.pack("<I", len(vp8l)) + vp8l + pad
    )


def vp8l_size(vp8l: bytes) -> tuple[int, int]:
    """(width, height) from a VP8L stream's header; CorruptFileError if it has none."""
    if len(vp8l) < 5 or vp8l[0] != VP8L_SIGNATURE:
        raise CorruptFileError("invalid WebP plane")
    (bits,) = struct.unpack("<I", vp8l[1:5])
    if bits >> 29:  # the version field must be 0
        raise CorruptFileError("invalid WebP plane")
    return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1


def encode_vp8l(im: Image.Image, method: int = 6, quality: int = 100) -> bytes | None:
    """The VP8L stream of ``im`` (a mode of WEBP_MODES) as Pillow's lossless WebP writes it (``method`` 0-6 and
    ``quality`` 0-100: how hard it searches; colours under transparent pixels kept), or None where that is not
    possible or not exact."""
    if im.mode not in WEBP_MODES or max(im.size) > WEBP_MAX_SIDE or not _webp():
        return None
    buf = io.BytesIO()
    try:
        im.save(buf, format="WEBP", lossless=True, quality=quality, method=method, exact=True)
    except (OSError, ValueError, KeyError):
        return None
    data = buf.getvalue()
    n = struct.unpack("<I", data[16:20])[0] if len(data) >= 20 else -1
    vp8l = data[20 : 20 + n]
    if data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8L" or _riff(vp8l) != data:
        return None  # an extended file (VP8X), which Pillow writes for metadata: not what is stored
    try:
        return vp8l if _decodes_to(vp8l, im) else None
    except (CorruptFileError, OSError, ValueError, SyntaxError, EOFError):
        return None


def _decodes_to(vp8l: bytes, im: Image.Image) -> bool:
    """Whether a VP8L stream holds ``im``'s pixels: compared as decoded where that is ``im``'s mode (RGB, RGBA),
    strip by strip (no copy of a 24 MP image), else through ``decode_vp8l`` (WebP decodes to RGB or RGBA only:
    L and LA go there at once)."""
    if im.mode in ("RGB", "RGBA"):
        with Image.open(io.BytesIO(_riff(vp8l)), formats=["WEBP"]) as webp:
            webp.load()
            if webp.mode == im.mode:
                return _same_pixels(webp, im)
    return _same_pixels(decode_vp8l(vp8l, im.mode, im.size), im)


def decode_vp8l(vp8l: bytes, mode: str, size: tuple[int, int]) -> Image.Image:
    """The ``mode`` image (of WEBP_MODES) of ``size`` that a VP8L stream holds; CorruptFileError unless its header
    declares that size (checked before decoding) and it decodes."""
    if mode not in WEBP_MODES or vp8l_size(vp8l) != size:
        raise CorruptFileError("WebP plane does not match the header")
    if not _webp():
        raise IdfzipError("this file holds WebP-coded pixels, and this Pillow was built without WebP")
    try:
        with Image.open(io.BytesIO(_riff(vp8l)), formats=["WEBP"]) as webp:
            if webp.size != size:
                raise CorruptFileError("WebP plane does not match the header")
            webp.load()
            if mode in ("RGB", "RGBA"):
                return webp.convert(mode)  # (a copy where it is that mode already)
            rgba = webp.convert("RGBA")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise CorruptFileError("corrupted WebP plane") from None
    return rgba.getchannel("R") if mode == "L" else Image.merge("LA", (rgba.getchannel("R"), rgba.getchannel("A")))


SIDE_BY_SIDE = 1 << 22  # pixels: a plane up to this size tries its codings in threads at once (larger: in turn,
# so that a 24 MP plane holds one coding's memory at a time)
LZMA_MAX_DICT = 1 << 24  # bytes: LZMA's dictionary for the largest planes (preset 9's match finder grows with it:
# a 24 MP RGB plane of CLIC 2025 photos took 773 MiB more than before with 64 MiB, 313 MiB with 16 MiB, for
# 30,858,662 and 30,880,390 bytes; only data with repeats more than 16 MiB apart, as a mosaic of the same photos, loses)


def encode_rest(im: Image.Image, webp: bool = False) -> tuple[int, bytes]:
    """(method, bytes): the smallest exact coding of ``im`` among constant, PNG and LZMA, and with ``webp`` (format
    version 11 and later) lossless WebP."""
    npix = im.width * im.height
    size = _row_bytes(im.mode, im.width) * im.height
    if im.mode != "1" and npix and size % npix == 0:
        strips = _strips(im)
        top = next(strips)
        first = top[: size // npix]
        if all(strip == first * (len(strip) // len(first)) for strip in chain([top], strips)):
            return REST_CONSTANT, first
    # a dictionary no larger than the data compresses the same, without preset 9's 674 MiB of match-finder
    # tables (0.25 s for a 32x32 image); the reader's 64 MiB dictionary decodes any smaller one
    dict_size = min(LZMA_MAX_DICT, max(1 << 12, 1 << (size - 1).bit_length()))
    filters = [{**_LZMA_FILTERS[0], "dict_size": dict_size}]
    # the tries side by side up to SIDE_BY_SIDE pixels (LZMA, zlib and WebP release the GIL; Pillow's save sets
    # attributes of the image it saves: each has its own copy; larger planes, in turn, share it), the first
    # smallest kept; WebP's searches (WEBP_WHOLE) because neither always finds the smaller stream. LZMA reads
    # the image strip by strip (its stream is the same as from the whole bytes at once, with no copy of them)
    apart = npix <= SIDE_BY_SIDE
    own = im.copy if apart else lambda: im
    tries = [(REST_LZMA, partial(_lzma, im, filters))]
    tries += [(REST_PNG, lambda: _png(own()))]
    tries += [(REST_WEBP, lambda m=m, q=q: encode_vp8l(own(), m, q)) for m, q in WEBP_WHOLE if webp]
    with ThreadPoolExecutor(len(tries) if apart else 1, thread_name_prefix="idfzip-rest") as pool:
        done = [(method, pool.submit(fn)) for method, fn in tries]
        best = None
        for method, f in done:
            data = f.result()
            if data is not None and (best is None or len(data) < len(best[1])):
                best = (method, data)
    return best


def _lzma(im: Image.Image, filters: list) -> bytes:
    """Raw LZMA of ``im.tobytes()``, fed strip by strip."""
    enc = lzma.LZMACompressor(format=lzma.FORMAT_RAW, filters=filters)
    return b"".join([*(enc.compress(strip) for strip in _strips(im)), enc.flush()])


def _row_bytes(mode: str, width: int) -> int:
    try:
        return len(Image.new(mode, (width, 1)).tobytes())
    except (ValueError, OSError):
        raise CorruptFileError(f"unsupported image mode {mode!r}") from None


def _constant_strips(data: bytes, row: int, size: tuple[int, int]) -> Iterator[bytes]:
    """The strips of a plane whose bytes are ``data`` repeated (for mode 1 the pattern may run across rows)."""
    w, h = size
    n, p = _rows_per_strip(w), len(data)
    pattern = data * (row * min(n, h) // p + (2 if row % p else 0))  # whole rows: every full strip is pattern
    for y in range(0, h, n):
        start = row * y % p
        yield pattern[start : start + row * min(n, h - y)]


def _lzma_strips(data: bytes, row: int, size: tuple[int, int]) -> Iterator[bytearray]:
    """The strips of an LZMA-coded plane; CorruptFileError unless the stream holds exactly its bytes."""
    w, h = size
    n = _rows_per_strip(w)
    d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    try:
        for y in range(0, h, n):
            need, out = row * min(n, h - y), bytearray()
            while len(out) < need:
                chunk = d.decompress(data, max_length=need - len(out))
                data = b""  # all input went in with the first call; later calls drain the decoder
                if not chunk:
                    raise CorruptFileError("compressed plane has the wrong size")
                out += chunk
            yield out
        tail = b"" if d.eof else d.decompress(b"", max_length=1)
    except (lzma.LZMAError, EOFError):
        raise CorruptFileError("corrupted compressed plane") from None
    if tail or not d.eof or d.unused_data:
        raise CorruptFileError("compressed plane has the wrong size")


def _png_plane(data: bytes, mode: str, size: tuple[int, int]) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as png:
            if png.mode != mode or png.size != size:
                raise CorruptFileError("embedded PNG plane does not match the header")
            png.load()
            im = png.copy()  # a plain image; its info (gamma, dpi...) is the PNG's, not the image's
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise CorruptFileError("corrupted PNG plane") from None
    im.info.clear()
    return im


def decode_rest(method: int, data: bytes, mode: str, size: tuple[int, int]) -> Image.Image:
    row = _row_bytes(mode, size[0])
    n = row * size[1]
    if method == REST_CONSTANT:
        if not data or n % len(data) or (mode != "1" and n // len(data) != size[0] * size[1]):
            raise CorruptFileError("invalid constant plane")
        return _assemble(mode, size, _constant_strips(data, row, size))
    if method == REST_LZMA:
        return _assemble(mode, size, _lzma_strips(data, row, size))
    if method == REST_PNG:
        return _png_plane(data, mode, size)
    if method == REST_WEBP:
        return decode_vp8l(data, mode, size)
    raise CorruptFileError(f"invalid coding method {method}")


META_NAMES = {1: "palette", 2: "transparency", 3: "transparency", 4: "transparency", 5: "ICC profile", 6: "EXIF"}


def meta_parts(meta: bytes | None) -> list[str]:
    """What a meta part holds, by name (for ``idfzip info``); its format is checked by ``apply_meta``."""
    r, names = Reader(meta or b"", "image metadata"), []
    while r.remaining():
        tag = r.u8()
        if tag not in META_NAMES:
            raise CorruptFileError("invalid image metadata")
        names.append(META_NAMES[tag])
        if tag == 1:
            r.u8()
            r.blob()
        elif tag == 2:
            r.varint()
        elif tag == 3:
            for _ in range(r.u8()):
                r.varint()
        else:
            r.blob()
    return names
