"""idfzip: lossless image compression with integer discrete flows.

>>> import idfzip
>>> data = idfzip.compress(image)      # PIL image or numpy array -> .idfz bytes
>>> idfzip.decompress(data)            # -> PIL image, pixel-identical

Importing the package imports neither torch nor the codec: the codec loads on first use of a name from
idfzip.codec (module ``__getattr__``; ``inspect`` comes from idfzip.container), and torch only once an
image or a file needs the flow (idfzip.flowcode), so ``idfzip --help`` starts at once, a file stored
classically decodes without torch, and the command line handles Ctrl-C while torch loads. ``decompress`` and
``inspect`` accept bytes-like data only; anything else is a CorruptFileError, never a TypeError (and never
``bytes(n)``, n zero bytes). Importing it registers the .idfz format with Pillow (``pillow_plugin``).
"""

from __future__ import annotations

import importlib

from . import pillow_plugin
from .errors import CorruptFileError, IdfzipError, InputImageError, ModelMismatchError, ModelNotFoundError

pillow_plugin.register()  # Image.open("x.idfz") and im.save("x.idfz") (idfzip/pillow_plugin.py)

__version__ = "0.1.0"
__all__ = [
    "CorruptFileError",
    "IdfzipError",
    "InputImageError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "__version__",
    "compress",
    "compress_with_stats",
    "decompress",
    "inspect",
]
# lazy names and the module each comes from (inspect: the container alone, no torch)
_LAZY = {"compress": "codec", "compress_with_stats": "codec", "decompress": "codec", "inspect": "container"}
# submodules an eager ``from .codec import ...`` used to bind as attributes (``idfzip.codec.x`` after import idfzip)
_SUBMODULES = ("adapt", "codec", "coding", "container", "flowcode", "flows", "planes", "priors", "zoo")


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
