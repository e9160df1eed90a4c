"""Reading input images: Pillow, plus the checks a careful archiver wants (PNG chunk CRCs, one frame)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

from PIL import Image

from .errors import InputImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
    try:
        if data.startswith(PNG_SIGNATURE):
            check_png_chunks(data)
        im = Image.open(io.BytesIO(data))
        if getattr(im, "n_frames", 1) > 1:
            raise InputImageError(f"has {im.n_frames} frames; only single-frame images are supported")
        im.load()
        return im
    except InputImageError as e:
        raise InputImageError(f"{path}: {e}") from None
    except Image.DecompressionBombError as e:
        raise InputImageError(f"{path}: {e}") from None
    except Image.UnidentifiedImageError:
        raise InputImageError(f"{path}: not an image in a format Pillow reads") from None
    except Exception as e:  # Pillow raises many kinds of errors on broken files
        raise InputImageError(f"{path}: not a readable image ({e})") from None
