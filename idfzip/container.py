"""The .idfz byte layout (docs/FORMAT.md is its specification): one dataclass, to_bytes / from_bytes.

Parsing checks every length against the bytes present and every dimension against fixed limits before
anything is allocated, so truncated, corrupted or hostile files fail with :class:`CorruptFileError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from PIL import Image

from .errors import CorruptFileError, UnsupportedVersionError
from .registry import shipped_name

MAGIC = b"IDZ"
VERSION = 5  # what writers write without a flow part (the same layout as 8); flow-coded files are FLOW_VERSION
FLOW_VERSION = 8  # (4 with a model never calibrated; 9 at efforts that send adaptation offsets, 10 where they
# also send output updates)
READ_VERSIONS = tuple(range(1, 14))  # what readers read
SPLIT = 3  # versions 8, 9 and 10 are versions 5, 6 and 7 with split windows (idfzip.coding)
MIXED = 3  # versions 11, 12 and 13 are versions 8, 9 and 10 with classical tiles and the WebP rest method
# (written only where a file has one or the other: files that have neither keep their version)


def layout(version: int) -> int:
    """The version whose layout a file of ``version`` follows apart from split windows and classical tiles
    (8-10 and 11-13: 5-7)."""
    return version - SPLIT - MIXED if mixed(version) else version - SPLIT if version >= 5 + SPLIT else version


def split_windows(version: int) -> bool:
    """Whether a file of ``version`` codes its wide windows in two steps (idfzip.coding)."""
    return version >= 5 + SPLIT


def mixed(version: int) -> bool:
    """Whether a file of ``version`` may code tiles classically (a tile-method map after the flow header) and its
    rest as WebP."""
    return version >= 5 + SPLIT + MIXED


MAX_SIDE = 1 << 20
MAX_PIXELS = 1 << 28
MAX_TILE = 1 << 14
MODEL_HASH_BYTES = 4

FLAG_FLOW, FLAG_REST, FLAG_META, FLAG_ADAPTED = 1, 2, 4, 8

# Mode codes: never renumber, only append (a code is the byte written in every existing file).
MODES = (
    "RGB",
    "RGBA",
    "L",
    "LA",
    "P",
    "PA",
    "1",
    "I;16",
    "I",
    "F",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "RGBX",
    "I;16B",
    "I;16L",
    "I;16N",
    "La",
    "RGBa",
)
MODE_OTHER = 255

# Codings of the rest part (anything not coded by the flow).
REST_CONSTANT, REST_PNG, REST_LZMA, REST_WEBP = 0, 1, 2, 3  # WebP (a bare VP8L stream): versions 11-13 only
REST_METHODS = {REST_CONSTANT: "constant", REST_PNG: "png", REST_LZMA: "lzma", REST_WEBP: "webp"}


def boxes(width: int, height: int, tile: int):
    """The tiles of a width x height image on a grid of ``tile``-sided squares, in file order (row-major):
    (x, y, w, h) each."""
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            yield x, y, min(tile, width - x), min(tile, height - y)


def write_varint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def as_bytes(data) -> bytes:
    """The bytes of bytes-like ``data`` (bytes, bytearray, memoryview, mmap, array); anything else is not a file
    (``bytes(5)`` would be five zero bytes, ``bytes(10**12)`` a terabyte)."""
    if isinstance(data, bytes):
        return data
    try:
        m = memoryview(data)
    except TypeError:
        raise CorruptFileError(f"not .idfz data (expected bytes, got {type(data).__name__})") from None
    return m.tobytes()


class Reader:
    """Bounds-checked reading of a byte string; every failure is a CorruptFileError."""

    def __init__(self, data: bytes, what: str = "file"):
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptFileError(f"{self.what} is truncated")
        b = self.data[self.pos : self.pos + n]
        self.pos += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self, max_bytes: int = 5) -> int:
        n = shift = 0
        for i in range(max_bytes):
            b = self.u8()
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise CorruptFileError(f"{self.what} has a non-minimal length field")
                return n
        raise CorruptFileError(f"{self.what} has an invalid length field")

    def blob(self) -> bytes:
        return self.take(self.varint())

    def remaining(self) -> int:
        return len(self.data) - self.pos


@dataclass
class Container:
    mode: str
    width: int
    height: int
    crc32: int = 0
    model_name: str | None = None  # "" (version 2): a shipped model, known by its hash
    model_hash: bytes | None = None  # first MODEL_HASH_BYTES of the model file's sha256
    tile: int = 0  # tile side in pixels (flow part); 0 (version 2): one tile, the whole image
    tiles: list[bytes] = field(default_factory=list)  # one entropy-coded stream per tile, row-major
    rest_method: int | None = None
    rest: bytes | None = None
    meta: bytes | None = None
    adapted: bool = False  # version 3: every flow-coded tile stream starts with an adaptation block (idfzip.adapt)
    version: int = VERSION
    classical: list[bool] = field(default_factory=list)  # version 11: which tiles are VP8L streams (empty: none)

    def is_classical(self, i: int) -> bool:
        """Whether tile ``i`` is coded classically (a VP8L stream of its colour channels), not by the flow."""
        return bool(self.classical) and self.classical[i]

    @property
    def flow_tiles(self) -> list[bytes]:
        """The tile streams the flow codes."""
        return [t for i, t in enumerate(self.tiles) if not self.is_classical(i)]

    @property
    def by_hash(self) -> bool:
        """Whether the flow's model is found by its hash: files of version 2 on name only user models, and a
        version-1 file named shipped models by name too, whose models may since have been retrained and their
        first files shipped under other names (natural -> natural-v1), so there a shipped hash decides."""
        return not self.model_name or (
            self.version == 1 and self.model_hash is not None and shipped_name(self.model_hash) is not None
        )

    @property
    def flow_model(self) -> str | None:
        """The name of the model the flow needs: the stored name, or where ``by_hash`` the shipped model with
        the stored hash (None where this installation has none)."""
        if self.by_hash:
            return shipped_name(self.model_hash) if self.model_hash else None
        return self.model_name

    @property
    def tile_side(self) -> int:
        """The side of the tile grid's squares: ``tile``, or for one tile the image's longer side."""
        return self.tile or max(self.width, self.height)

    @property
    def tiles_x(self) -> int:
        return -(-self.width // self.tile_side)

    @property
    def tiles_y(self) -> int:
        return -(-self.height // self.tile_side)

    def to_bytes(self) -> bytes:
        """The file's bytes in format ``version`` (readers of this build read every version they may be)."""
        if self.version not in READ_VERSIONS:
            raise ValueError(f"unknown format version {self.version}")
        v1 = self.version == 1
        out = bytearray(MAGIC)
        out.append(self.version)
        if self.mode in MODES:
            out.append(MODES.index(self.mode))
        else:
            m = self.mode.encode("ascii")
            out += bytes([MODE_OTHER, len(m)]) + m
        out += write_varint(self.width) + write_varint(self.height)
        flags = (
            (FLAG_FLOW if self.tiles else 0)
            | (FLAG_REST if self.rest is not None else 0)
            | (FLAG_META if self.meta else 0)
            | (FLAG_ADAPTED if self.adapted else 0)
        )
        if self.adapted and (self.version < 3 or not self.tiles):
            raise ValueError("adaptation blocks need format version 3 and a flow-coded part")
        out.append(flags)
        if self.tiles:
            name = self.model_name.encode("utf-8")
            if len(self.tiles) != self.tiles_x * self.tiles_y:
                raise ValueError("tile count does not match the tiling")
            if v1 and not (name and self.tile):
                raise ValueError("version 1 needs a model name and a tile side")
            out += bytes([len(name)]) + name + self.model_hash[:MODEL_HASH_BYTES] + write_varint(self.tile)
            if mixed(self.version):  # the tile-method map: bit i % 8 of byte i // 8 set for a classical tile i
                marks = [self.is_classical(i) for i in range(len(self.tiles))]
                out += bytes(sum(m << b for b, m in enumerate(marks[i : i + 8])) for i in range(0, len(marks), 8))
            elif any(self.classical):
                raise ValueError(f"classical tiles need format version {5 + SPLIT + MIXED} or later")
            if v1:  # version 1: the tile streams come here, each with its length
                for t in self.tiles:
                    out += write_varint(len(t)) + t
        if self.rest is not None:
            if self.rest_method == REST_WEBP and not mixed(self.version):
                raise ValueError(f"a WebP rest needs format version {5 + SPLIT + MIXED} or later")
            out.append(self.rest_method)
            out += write_varint(len(self.rest)) + self.rest
        if self.meta:
            out += write_varint(len(self.meta)) + self.meta
        if self.tiles and not v1:  # since version 2 they come last; versions 2-4: the last runs up to the CRC
            for t in self.tiles[:-1]:
                out += write_varint(len(t)) + t
            out += (write_varint(len(self.tiles[-1])) if self.version >= 5 else b"") + self.tiles[-1]
        out += struct.pack("<I", self.crc32)
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Container:
        data = as_bytes(data)
        r = Reader(data)
        if len(data) < 4 or data[:3] != MAGIC:
            raise CorruptFileError("not an .idfz file (bad magic bytes)")
        r.take(3)
        version = r.u8()
        if version not in READ_VERSIONS:
            raise UnsupportedVersionError(
                f"unsupported .idfz format version {version} (this build reads {', '.join(map(str, READ_VERSIONS))})"
            )
        code = r.u8()
        if code == MODE_OTHER:
            try:
                mode = r.take(r.u8()).decode("ascii")
            except UnicodeDecodeError:
                raise CorruptFileError("invalid image mode") from None
            if mode in MODES or not mode:
                raise CorruptFileError("invalid image mode")
        elif code < len(MODES):
            mode = MODES[code]
        else:
            raise CorruptFileError(f"invalid image mode code {code}")
        width, height = r.varint(), r.varint()
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE) or width * height > MAX_PIXELS:
            raise CorruptFileError(f"image dimensions {width}x{height} are out of range")
        c = cls(mode, width, height, version=version)
        flags = r.u8()
        known = FLAG_FLOW | FLAG_REST | FLAG_META | (FLAG_ADAPTED if version >= 3 else 0)
        if flags & ~known or not flags & (FLAG_FLOW | FLAG_REST) or (flags & FLAG_ADAPTED and not flags & FLAG_FLOW):
            raise CorruptFileError("invalid flags")
        c.adapted = bool(flags & FLAG_ADAPTED)
        if flags & FLAG_FLOW:
            try:
                c.model_name = r.take(r.u8()).decode("utf-8")
            except UnicodeDecodeError:
                raise CorruptFileError("invalid model name") from None
            c.model_hash = r.take(MODEL_HASH_BYTES)
            c.tile = r.varint()
            if version == 1 and not c.model_name:
                raise CorruptFileError("empty model name")
            if not (1 if version == 1 else 0) <= c.tile <= MAX_TILE or c.tile_side > MAX_TILE:
                raise CorruptFileError(f"invalid tile size {c.tile}")
            n = c.tiles_x * c.tiles_y
            if n > r.remaining():  # each tile needs at least its length byte
                raise CorruptFileError("file is truncated")
            if mixed(version):
                bits = r.take(-(-n // 8))
                marks = [bool(bits[i >> 3] >> (i & 7) & 1) for i in range(n)]
                c.classical = marks if any(marks) else []
                if bits[-1] >> ((n - 1) % 8 + 1):
                    raise CorruptFileError("invalid tile-method map (padding bits set)")
            if version == 1:
                c.tiles = [r.blob() for _ in range(n)]
        if flags & FLAG_REST:
            c.rest_method = r.u8()
            if c.rest_method not in REST_METHODS or (c.rest_method == REST_WEBP and not mixed(version)):
                raise CorruptFileError(f"invalid coding method {c.rest_method}")
            c.rest = r.blob()
        if flags & FLAG_META:
            c.meta = r.blob()
            if not c.meta:
                raise CorruptFileError("empty metadata section")
        if flags & FLAG_FLOW and version >= 5:  # every tile stream with its length: a cut file is "truncated"
            c.tiles = [r.blob() for _ in range(n)]
        elif flags & FLAG_FLOW and version != 1:
            c.tiles = [r.blob() for _ in range(n - 1)]
            c.tiles.append(r.take(r.remaining() - 4))
        (c.crc32,) = struct.unpack("<I", r.take(4))
        if r.remaining():
            raise CorruptFileError(f"{r.remaining()} unexpected bytes after the end of the data")
        return c


def _block_facts(stream: bytes) -> tuple[int, int, int]:
    """(adapted slots, updated slots, bytes) of the version 7 (and 10) adaptation block that starts a tile stream (its
    two masks and byte count come first, idfzip.adapt)."""
    r = Reader(stream, "tile stream")
    adapted, updated, size = r.varint(), r.varint(), r.varint()
    return bin(adapted).count("1"), bin(updated).count("1"), r.pos + size


def _adaptation(c: Container) -> dict:
    """inspect's facts of the tiles' adaptation blocks (idfzip.adapt): the tiles and slots adapted, and from
    version 7 the slots whose networks' output layers are updated and the blocks' bytes (earlier blocks' size
    depends on the model)."""
    if not c.adapted:
        return {"adapted_tiles": 0, "adapted_slots": 0}
    tiles = c.flow_tiles
    if layout(c.version) < 7:
        return {
            "adapted_tiles": sum(1 for t in tiles if t[:1] != b"\0"),  # mask varint 0: not adapted
            "adapted_slots": sum(bin(Reader(t, "tile stream").varint()).count("1") for t in tiles),
        }
    facts = [_block_facts(t) for t in tiles]
    return {
        "adapted_tiles": sum(1 for a, u, _ in facts if a or u),
        "adapted_slots": sum(a for a, _, _ in facts),
        "updated_slots": sum(u for _, u, _ in facts),
        "adaptation_bytes": sum(n for _, _, n in facts),
    }


def inspect(data: bytes) -> dict:
    """Header facts of .idfz bytes, without decoding."""
    data = as_bytes(data)
    c = Container.from_bytes(data)
    try:
        bands = len(Image.new(c.mode, (1, 1)).getbands())
    except (ValueError, OSError):
        bands = 1
    n = c.width * c.height * bands
    return {
        "version": c.version,
        "layout": layout(c.version),
        "split_windows": split_windows(c.version),
        "mode": c.mode,
        "width": c.width,
        "height": c.height,
        "bytes": len(data),
        "bpd": 8.0 * len(data) / n,
        "model": c.flow_model,
        "model_sha256_prefix": c.model_hash.hex() if c.model_hash else None,
        "tile": c.tile_side if c.tiles else None,
        "tiles": len(c.tiles),
        "classical_tiles": sum(c.classical),
        "flow_bytes": sum(len(t) for t in c.flow_tiles),
        "classical_bytes": sum(len(t) for i, t in enumerate(c.tiles) if c.is_classical(i)),
        **_adaptation(c),
        "rest": None if c.rest is None else {"method": c.rest_method, "bytes": len(c.rest)},
        "meta_bytes": len(c.meta or b""),
        "crc32": f"{c.crc32:08x}",
    }
