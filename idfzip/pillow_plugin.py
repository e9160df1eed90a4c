"""Pillow plugin: after ``import idfzip``, ``Image.open("x.idfz")`` gives the image back and
``im.save("x.idfz")`` (or ``format="IDFZ"``) writes one, registered as Pillow registers its own formats.

Opening reads the header only (size and mode, without torch); the pixels are decoded on ``load()``, by
``idfzip.decompress``, so they are exactly the ones compressed: mode, size, palette, transparency, ICC and EXIF
included. Save parameters: ``model`` (a name or .safetensors path), ``tile``, ``device``. A damaged file is
an OSError, as Pillow's own formats report one.
"""

from __future__ import annotations

from PIL import Image, ImageFile

from .container import MAGIC, inspect
from .errors import IdfzipError

FORMAT = "IDFZ"


def _accept(prefix: bytes) -> bool:
    return prefix[:3] == MAGIC


class IdfzImageFile(ImageFile.ImageFile):
    format = FORMAT
    format_description = "idfzip lossless image (integer discrete flow)"

    def _open(self) -> None:
        data = self.fp.read()
        try:
            facts = inspect(data)  # every declared length checked: a cut file fails here, as Pillow's do, OSError
        except IdfzipError as e:
            raise OSError(f"idfzip: {e}") from None
        self._data = data
        self._mode = facts["mode"]
        self._size = (facts["width"], facts["height"])
        self.tile = []

    def load(self):
        if getattr(self, "_data", None) is not None:
            from .codec import decompress

            try:
                im = decompress(self._data)
            except IdfzipError as e:
                raise OSError(f"idfzip: {e}") from None
            self._data = None
            self.im = im.im
            self._mode = im.mode
            if im.mode in ("P", "PA"):
                self.palette = im.palette
            self.info.update(im.info)
        return Image.Image.load(self)


def _save(im: Image.Image, fp, filename) -> None:
    from .codec import DEFAULT_EFFORT, compress

    opts = im.encoderinfo
    tile, effort = opts.get("tile"), opts.get("effort", DEFAULT_EFFORT)
    device, flow_only = opts.get("device", "cpu"), opts.get("flow_only", False)
    fp.write(compress(im, opts.get("model"), tile=tile, device=device, effort=effort, flow_only=flow_only))


def register() -> None:
    Image.register_open(FORMAT, IdfzImageFile, _accept)
    Image.register_save(FORMAT, _save)
    Image.register_extension(FORMAT, ".idfz")
    Image.register_mime(FORMAT, "image/x-idfz")
