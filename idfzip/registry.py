"""Where models are and what they are, without torch: shipped models by name and by hash, the user's installed
models (the model store) by name, model files by path, and a model file's facts read from its safetensors
header. ``idfzip models`` and ``idfzip info`` use only this, so they answer at once; loading weights is zoo's.

The store is a folder (``$IDFZIP_MODELS``, else ``$XDG_DATA_HOME/idfzip/models``, else
``~/.local/share/idfzip/models``) of ``NAME.safetensors`` files put there by ``idfzip models add``: a file written
with an installed model names it (its name and hash prefix), and decodes without ``--model``. A name is never both
shipped and installed, and an installed name holds one model (another is refused unless replaced on purpose).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from functools import lru_cache
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL = "natural"  # for RGB (and the RGB of RGBA)
GREY_MODEL = "grey"  # for L (and the L of LA)
PURPOSES = {
    "natural": "photos and other natural images",
    "natural-v1": "the first natural model (to 2026-12), kept so that the files it wrote decode",
    "grey": "greyscale photos (L and LA images)",
    "cifar10": "tiny 32x32 images (CIFAR-10)",
    "histology": "H&E-stained histology tiles (brightfield microscopy slides)",
}
FORMAT = "idfzip-model"
FORMAT_VERSION = "1"
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # parameters; integer tensors are buffers (permutations)


def models_dir() -> Path | None:
    """Where shipped models are: the installed ``idfzip._models`` package, else the repository's models/."""
    try:
        spec = importlib.util.find_spec("idfzip._models")
    except (ModuleNotFoundError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if Path(loc).is_dir():
            return Path(loc)
    p = Path(__file__).resolve().parent.parent / "models"
    return p if p.is_dir() else None


def available() -> list[str]:
    d = models_dir()
    return sorted(p.stem for p in d.glob("*.safetensors")) if d else []


def store_dir() -> Path:
    """The model store (see the module's docstring); it need not exist."""
    if os.environ.get("IDFZIP_MODELS"):
        return Path(os.environ["IDFZIP_MODELS"]).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "idfzip" / "models"


def installed() -> list[str]:
    """The names of the models in the store."""
    d = store_dir()
    return sorted(p.stem for p in d.glob("*.safetensors") if valid_name(p.stem)) if d.is_dir() else []


def valid_name(name: str) -> bool:
    """Whether ``name`` may name an installed model: letters, digits, '-', '_' and '.', not starting with '.'."""
    return bool(name) and name.replace("-", "").replace("_", "").replace(".", "").isalnum() and name[0] != "."


def installed_path(name: str) -> Path | None:
    """The store's file of model ``name`` (a bare name, never a path: names come from files being decoded)."""
    p = store_dir() / f"{name}.safetensors"
    return p if valid_name(name) and p.is_file() else None


def install_hint(name: str, prefix: bytes) -> str:
    """What a user reads when a file needs model ``name`` (sha256 starting with ``prefix``) that is not here."""
    return (
        f"the file was written with model {name!r} (sha256 {prefix.hex()}...), which is not installed: install its "
        f"file with 'idfzip models add {name}.safetensors' (the store: {store_dir()}), or give it with --model PATH"
    )


def shipped(name: str) -> Path:
    """The shipped model called ``name`` (a bare name, never a path: names come from files being decoded)."""
    d = models_dir()
    if name and name.replace("-", "").replace("_", "").isalnum() and d is not None:
        p = d / f"{name}.safetensors"
        if p.is_file():
            return p
    raise ModelNotFoundError(
        f"no shipped model named {name!r} (shipped: {', '.join(available()) or 'none'}); "
        "give the model file with --model"
    )


@lru_cache(maxsize=1)
def _shipped_hashes(folder: str, stamp: tuple) -> dict[bytes, str]:
    out, previous = {}, {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        try:
            info = describe(p)
            out[bytes.fromhex(info["sha256"])] = p.stem
            previous[bytes.fromhex(info["metadata"].get("calibrated_from", ""))] = p.stem
        except (ModelNotFoundError, ValueError, AttributeError):
            continue
    previous.pop(b"", None)
    return {**previous, **out}


def shipped_hashes() -> dict[bytes, str]:
    """sha256 -> name of every shipped model, also the sha256 of the file each was calibrated from (its files
    of versions 1-4 name that one; zoo.Model.hashes)."""
    d = models_dir()
    if d is None:
        return {}
    files = sorted(d.glob("*.safetensors"))
    return _shipped_hashes(str(d), tuple((p.name, p.stat().st_mtime, p.stat().st_size) for p in files))


def shipped_name(prefix: bytes) -> str | None:
    """The name of the shipped model whose sha256 starts with ``prefix``, if there is one."""
    return next((n for h, n in shipped_hashes().items() if h.startswith(prefix)), None)


def default_model(channels: int) -> str:
    """The shipped model for colour parts of ``channels`` channels (3: RGB, 1: L)."""
    return GREY_MODEL if channels == 1 else DEFAULT_MODEL


def resolve(name_or_path: str | None) -> Path:
    """A model file by path, or by name: shipped, else installed in the store."""
    name_or_path = name_or_path or DEFAULT_MODEL
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or os.sep in name_or_path or p.is_file():
        if not p.is_file():
            raise ModelNotFoundError(f"model file not found: {name_or_path}")
        return p
    mine = installed_path(name_or_path)
    if mine is not None and name_or_path not in available():
        return mine
    try:
        return shipped(name_or_path)
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"no model named {name_or_path!r} (shipped: {', '.join(available()) or 'none'}; installed: "
            f"{', '.join(installed()) or 'none'}, in {store_dir()}); install one with 'idfzip models add FILE', or "
            "give the model file with --model PATH"
        ) from None


def describe(path: Path) -> dict:
    """sha256 (hex), parameter count (float tensors) and metadata of the model file at ``path``, from its
    safetensors header (8-byte length, then JSON) without loading the weights."""
    data = path.read_bytes()
    try:
        (n,) = struct.unpack_from("<Q", data)
        header = json.loads(data[8 : 8 + n])
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        params = sum(_numel(v["shape"]) for v in tensors if v["dtype"] in _FLOAT_DTYPES)
    except (struct.error, ValueError, KeyError, TypeError, AttributeError):
        raise ModelNotFoundError(f"{path}: not a valid safetensors model file") from None
    meta = header.get("__metadata__", {})
    return {"sha256": hashlib.sha256(data).hexdigest(), "parameters": params, "metadata": meta}


def _numel(shape: list) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out
