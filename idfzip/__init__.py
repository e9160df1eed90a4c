"""idfzip: lossless image compression with integer discrete flows.

>>> import idfzip
>>> data = idfzip.compress(image)      # PIL image or numpy array -> .idfz bytes
>>> idfzip.decompress(data)            # -> PIL image, pixel-identical
"""

from .codec import compress, compress_with_stats, decompress, inspect
from .errors import CorruptFileError, IdfzipError, InputImageError, ModelMismatchError, ModelNotFoundError

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
