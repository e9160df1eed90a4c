"""Reading input files and images: Pillow, plus the checks a careful archiver wants (PNG chunk CRCs, one frame).

Inputs are read only from regular files and only up to MAX_INPUT_BYTES: a device (/dev/zero), FIFO or folder
is refused at once, without a read that never ends or never returns.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .container import MAX_PIXELS
from .errors import InputFileError, InputImageError

# No input idfzip can use is larger: an image file of MAX_PIXELS pixels of 8 bytes (16-bit RGBA, uncompressed),
# or an .idfz file (its planes hold at most 4 bytes a pixel, which no coding here doubles); 64 MiB more for
# metadata (ICC, EXIF, other chunks).
MAX_INPUT_BYTES = 8 * MAX_PIXELS + (64 << 20)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = {".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jpg", ".jpeg", ".gif"}


def check_png_chunks(data: bytes) -> None:
    """Raise InputImageError unless every chunk of PNG ``data`` is complete and its CRC32 is right.

    Pillow does not verify the CRC of IDAT chunks, so a damaged PNG can decode to wrong pixels silently;
    compressing those losslessly would preserve the damage without anyone noticing.
    """
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 12 > len(data):
            raise InputImageError("PNG is truncated")
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        end = pos + 12 + n
        if end > len(data):
            raise InputImageError("PNG is truncated")
        kind = data[pos + 4 : pos + 8]
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise InputImageError(f"PNG chunk {kind.decode('latin-1')!r} has a bad CRC (damaged file)")
        pos = end
        if kind == b"IEND":
            return
    raise InputImageError("PNG has no IEND chunk (truncated)")


def read_input(path: str | Path, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of the regular file ``path``: InputFileError at once for anything else (folder, device, FIFO,
    socket) and for a file of more than ``limit`` bytes or one that grows while read; OSError if unreadable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputFileError(f"{path}: is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise InputFileError(f"{path}: not a regular file")
        if st.st_size > limit:
            raise InputFileError(f"{path}: {st.st_size} bytes, more than any input idfzip can use ({limit})")
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise InputFileError(f"{path}: the file grew while it was read")
    return data


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode a single-frame image; any failure is one InputImageError."""
    path = Path(path)
    try:
        data = read_input(path)
    except InputFileError as e:
        raise InputImageError(str(e)) from None
    except FileNotFoundError:
        raise InputImageError(f"{path}: no such file") from None
    except OSError as e:
        raise InputImageError(f"{path}: {e.strerror or e}") from None
    return decode_image(data, str(path))


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode the bytes of a single-frame image file called ``name``; any failure is one InputImageError."""
    try:
        if data.startswith(PNG_SIGNATURE):
            check_png_chunks(data)
        im = Image.open(io.BytesIO(data))
        if getattr(im, "n_frames", 1) > 1:
            raise InputImageError(f"has {im.n_frames} frames; only single-frame images are supported")
        im.load()
        return im
    except InputImageError as e:
        raise InputImageError(f"{name}: {e}") from None
    except Image.DecompressionBombError as e:
        raise InputImageError(f"{name}: {e}") from None
    except Image.UnidentifiedImageError:
        raise InputImageError(f"{name}: not an image in a format Pillow reads") from None
    except Exception as e:  # Pillow raises many kinds of errors on broken files
        raise InputImageError(f"{name}: not a readable image ({e})") from None


@functools.lru_cache(maxsize=4)
def _zip(path: Path) -> zipfile.ZipFile:
    return zipfile.ZipFile(path)


@dataclass(frozen=True)
class Source:
    """One image to read: a file, or a ``member`` of a zip file at ``path``."""

    path: Path
    member: str | None = None

    @property
    def name(self) -> str:
        return f"{self.path}/{self.member}" if self.member else str(self.path)

    def read(self) -> bytes:
        if self.member is None:
            return read_input(self.path)
        return _zip(self.path).read(self.member)

    def open(self) -> Image.Image:
        if self.member is None:
            return open_image(self.path)
        try:
            data = self.read()
        except (OSError, zipfile.BadZipFile, KeyError) as e:
            raise InputImageError(f"{self.name}: cannot be read from the zip ({e})") from None
        return decode_image(data, self.name)


def find_images(paths) -> list[Source]:
    """The images under ``paths``: folders (recursively, image suffixes only, sorted), zips of images (their
    image entries, sorted) and single files, in the order given."""
    out: list[Source] = []
    for src in paths:
        p = Path(src)
        if p.is_dir():
            out += [Source(q) for q in sorted(p.rglob("*")) if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()]
        elif p.suffix.lower() == ".zip":
            try:
                names = _zip(p).namelist()
            except (OSError, zipfile.BadZipFile) as e:
                raise InputImageError(f"{p}: not a readable zip file ({e})") from None
            out += [Source(p, n) for n in sorted(names) if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        elif p.is_file():
            out.append(Source(p))
        else:
            raise InputImageError(f"{p}: no such file or folder")
    return out
