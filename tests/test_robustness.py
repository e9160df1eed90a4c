"""Hostile and odd inputs to the library: decompression bombs cost one plane, strip-wise decoding and hashing
give exactly what whole-image code gives, and anything that is not .idfz bytes is a CorruptFileError."""

import lzma
import re
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

import idfzip
import idfzip.codec  # noqa: F401 (torch and the codec load before any clock starts)
from idfzip import planes
from idfzip.container import REST_CONSTANT, REST_LZMA, REST_PNG, Container
from idfzip.errors import CorruptFileError

CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1 << 20


def _status_mb(key: str) -> float:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024


def _peak_extra_mb(fn) -> float:
    """The most resident memory ``fn()`` adds to this process, in MB: Linux keeps the peak (VmHWM), and writing
    5 to clear_refs resets it to the present size, so the peak is measured for ``fn`` alone."""
    CLEAR_REFS.write_text("5")
    base = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - base


needs_peak = pytest.mark.skipif(
    not CLEAR_REFS.exists() or not Path("/proc/self/status").exists(), reason="needs Linux /proc to measure peak RSS"
)


def _fails_on_crc(data: bytes) -> float:
    """Decode ``data`` (a bomb with a wrong CRC), check it fails on the CRC, and return the seconds it took."""
    t = time.perf_counter()
    with pytest.raises(CorruptFileError, match="CRC mismatch"):  # the whole plane was decoded, then refused
        idfzip.decompress(data)
    return time.perf_counter() - t


@needs_peak
def test_constant_plane_bomb_costs_one_plane():
    """22 bytes declaring a 16384x16384 float image: it must decode to one 1 GiB plane (the image a valid file
    of this kind returns; the codec checks the CRC only on the decoded image), not three (3.3 GB). The memory
    bound is the check; the time bound only catches a hang (one plane takes 1.5-2.5 s alone here, and took 6.3 s
    in CI beside the other tests, so a tight bound would time the machine, not the decoder)."""
    data = Container("F", 16384, 16384, crc32=0, rest_method=REST_CONSTANT, rest=struct.pack("<f", 1.5)).to_bytes()
    assert len(data) == 22
    plane = 16384 * 16384 * 4 / MB
    seconds = []
    extra = _peak_extra_mb(lambda: seconds.append(_fails_on_crc(data)))
    assert extra < plane + 300, f"{extra:.0f} MB for a {plane:.0f} MB plane"
    assert seconds[0] < 60  # writing 1 GiB of fresh pages once, and one CRC pass over it


@needs_peak
def test_lzma_plane_bomb_costs_one_plane():
    """150 kB of LZMA declaring a 16384x8192 RGBA image: one 512 MiB plane (plus the decoder's 64 MiB window)."""
    strip = lzma.compress(b"\x07\x08\x09\xff" * (1 << 22), format=lzma.FORMAT_RAW, filters=[{"id": 0x21, "preset": 0}])
    stream = strip[:-1] * 32 + b"\0"  # 32 LZMA2 chunk runs, each resetting the dictionary, then the end marker
    data = Container("RGBA", 16384, 8192, crc32=0, rest_method=REST_LZMA, rest=stream).to_bytes()
    plane = 16384 * 8192 * 4 / MB
    extra = _peak_extra_mb(lambda: _fails_on_crc(data))
    assert extra < plane + 300, f"{extra:.0f} MB for a {plane:.0f} MB plane"


def _images():
    rng = np.random.default_rng(3)
    g = rng.integers(0, 256, (37, 29), dtype=np.uint8)
    yield Image.fromarray(g > 128)
    yield Image.fromarray(g)
    yield Image.fromarray(np.dstack([g, g[::-1]]), "LA")
    yield Image.frombytes("I;16", (29, 37), rng.integers(0, 65536, (37, 29), dtype="<u2").tobytes())
    yield Image.fromarray(rng.normal(size=(37, 29)).astype(np.float32), "F")
    yield Image.fromarray(np.dstack([photo(29, 37), g]), "RGBA")
    yield Image.fromarray(photo(29, 37)).convert("CMYK")


def _lzma(raw: bytes) -> bytes:
    return lzma.compress(raw, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": 1 << 16}])


@pytest.mark.parametrize("strip_bytes", [1, 300, 1 << 24])  # one row a strip, two (37 rows: a short last), all
def test_strips_give_what_whole_images_give(monkeypatch, strip_bytes):
    monkeypatch.setattr(planes, "_STRIP_BYTES", strip_bytes)
    for im in _images():
        raw = im.tobytes()
        assert planes.signature(im, b"m") == zlib.crc32(b"m", zlib.crc32(raw, zlib.crc32(f"{im.mode}|29x37|".encode())))
        codings = [(REST_LZMA, _lzma(raw))] + ([(REST_PNG, planes._png(im))] if planes._png(im) else [])
        for method, coded in codings:
            back = planes.decode_rest(method, coded, im.mode, im.size)
            assert back.tobytes() == raw and back.info == {} and planes.same_image(back, im), (im.mode, method)
        for bad in (_lzma(raw[:-1]), _lzma(raw + b"\0"), _lzma(raw) + b"\0", _lzma(raw)[:-3]):
            with pytest.raises(CorruptFileError):
                planes.decode_rest(REST_LZMA, bad, im.mode, im.size)
        pixel = raw[: len(raw) // (29 * 37)] if im.mode != "1" else b"\xff"
        const = planes.decode_rest(REST_CONSTANT, pixel, im.mode, im.size)
        assert const.tobytes() == Image.frombytes(im.mode, im.size, pixel * (len(raw) // len(pixel))).tobytes()
    other = Image.fromarray(photo(29, 37, seed=1)).convert("CMYK")
    assert not planes.same_image(other, im) and planes.same_image(im, im.copy())


def test_large_planes_try_their_codings_in_turn_with_a_bounded_dictionary(monkeypatch):
    """Above SIDE_BY_SIDE pixels the tries run one at a time on the image itself, and give the coding the
    side-by-side tries give; LZMA's dictionary is at most LZMA_MAX_DICT (repeats farther apart are not found),
    and the plane decodes exactly either way."""
    noise = np.random.default_rng(7).integers(0, 256, (64, 384, 3), dtype=np.uint8)  # 72 KiB of noise ...
    im = Image.fromarray(np.concatenate([noise, noise]))  # ... twice: a repeat 72 KiB back
    apart = [planes.encode_rest(im, webp) for webp in (False, True)]  # (LZMA and PNG; and WebP)
    monkeypatch.setattr(planes, "SIDE_BY_SIDE", 0)
    near = planes.encode_rest(im)
    assert [near, planes.encode_rest(im, True)] == apart and near[0] == REST_LZMA and len(near[1]) < 80_000
    monkeypatch.setattr(planes, "LZMA_MAX_DICT", 1 << 16)  # 64 KiB: the repeat is out of its reach
    far = planes.encode_rest(im)
    assert far[0] == REST_LZMA and len(far[1]) > 140_000
    for method, data in (near, far, apart[1]):
        assert planes.decode_rest(method, data, "RGB", im.size).tobytes() == im.tobytes()


@pytest.mark.parametrize("strip_bytes", [1, 1 << 24])
def test_mode_1_constant_pattern_across_rows_and_palette_merge(monkeypatch, strip_bytes):
    monkeypatch.setattr(planes, "_STRIP_BYTES", strip_bytes)
    im = planes.decode_rest(REST_CONSTANT, b"\x01\x02\x03", "1", (12, 3))  # rows of 2 bytes, a 3-byte pattern
    assert im.tobytes() == Image.frombytes("1", (12, 3), b"\x01\x02\x03" * 2).tobytes()
    indices = Image.fromarray(np.arange(37 * 29, dtype=np.uint8).reshape(37, 29) % 7)
    p = planes.merge("P", (29, 37), None, indices)
    assert p.mode == "P" and p.tobytes() == indices.tobytes()
    la = Image.fromarray(np.dstack([np.asarray(indices), np.asarray(indices)[::-1]]), "LA")
    assert planes.merge("PA", (29, 37), None, la).tobytes() == la.tobytes()


def test_palette_and_float_images_round_trip_through_strips(monkeypatch):
    monkeypatch.setattr(planes, "_STRIP_BYTES", 300)
    p = Image.fromarray(np.arange(37 * 29, dtype=np.uint8).reshape(37, 29) % 16).convert("P")
    p.putpalette(list(range(48)))
    p.info["transparency"] = 3
    others = [im for im in _images() if im.mode != "RGBA"]  # no RGB part: no model, no flow
    for im in (p, Image.frombytes("PA", (29, 37), bytes(range(256)) * 8 + bytes(98)), *others):
        back = idfzip.decompress(idfzip.compress(im))
        assert planes.same_image(back, im), im.mode


def test_decompress_refuses_what_is_not_bytes():
    t = time.perf_counter()
    for junk in (5, 10**12, None, "IDZ", 1.5, [73, 68, 90]):  # 10**12: never bytes(10**12), a terabyte of zeros
        with pytest.raises(CorruptFileError, match="not .idfz data"):
            idfzip.decompress(junk)
        with pytest.raises(CorruptFileError, match="not .idfz data"):
            idfzip.inspect(junk)
    assert time.perf_counter() - t < 1
    im = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    data = idfzip.compress(im)
    for view in (bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        assert planes.same_image(idfzip.decompress(view), im)
        assert idfzip.inspect(view)["bytes"] == len(data)
