"""Reading input images: Pillow, plus the checks a careful archiver wants (PNG chunk CRCs, one frame)."""

from __future__ import annotations

import functools
import io
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .errors import InputImageError

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


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode a single-frame image; any failure is one InputImageError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputImageError(f"{path}: is a directory") from None
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
            return self.path.read_bytes()
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
