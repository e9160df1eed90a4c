"""Typed errors. The CLI turns each into one line ``Error: ...`` and a non-zero exit."""


class IdfzipError(Exception):
    """Base class of every error idfzip raises on purpose."""


class CorruptFileError(IdfzipError):
    """The .idfz bytes are truncated, corrupted, or not an .idfz file at all."""


class UnsupportedVersionError(CorruptFileError):
    """The container declares a format version this build cannot read."""


class ModelMismatchError(IdfzipError):
    """The file was written with a different model than the one available."""


class ModelNotFoundError(IdfzipError):
    """No model of that name or path exists."""


class InputFileError(IdfzipError):
    """An input path is no file idfzip reads: a folder, device, FIFO or socket, or a file over the size limit."""


class InputImageError(IdfzipError):
    """The input is not an image this build can read."""
