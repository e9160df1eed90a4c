"""Model registry: a model is one safetensors file holding its weights and its config (JSON metadata).

A model is named by its file stem (``natural`` -> ``natural.safetensors``) and identified in .idfz files by
that name and the first bytes of the sha256 of the file. Shipped models live in the repository's models/
folder, installed as the package ``idfzip._models``. ``--model`` accepts a shipped name or a path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ModelNotFoundError
from .flows import HierarchicalIDF, IDFConfig

DEFAULT_MODEL = "natural"
FORMAT = "idfzip-model"
FORMAT_VERSION = "1"


@dataclass
class Model:
    name: str
    sha256: bytes  # of the whole file
    path: str
    flow: HierarchicalIDF
    metadata: dict


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
    return {hashlib.sha256(p.read_bytes()).digest(): p.stem for p in sorted(Path(folder).glob("*.safetensors"))}


def shipped_hashes() -> dict[bytes, str]:
    """sha256 -> name of every shipped model."""
    d = models_dir()
    if d is None:
        return {}
    files = sorted(d.glob("*.safetensors"))
    return _shipped_hashes(str(d), tuple((p.name, p.stat().st_mtime, p.stat().st_size) for p in files))


def shipped_name(prefix: bytes) -> str | None:
    """The name of the shipped model whose sha256 starts with ``prefix``, if there is one."""
    return next((n for h, n in shipped_hashes().items() if h.startswith(prefix)), None)


def is_shipped(model: Model) -> bool:
    """Whether ``model`` is the shipped model of its name (so that files can name it by its hash alone)."""
    return shipped_hashes().get(model.sha256) == model.name


def resolve(name_or_path: str | None) -> Path:
    name_or_path = name_or_path or DEFAULT_MODEL
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or os.sep in name_or_path or p.is_file():
        if not p.is_file():
            raise ModelNotFoundError(f"model file not found: {name_or_path}")
        return p
    return shipped(name_or_path)


def save_model(flow: HierarchicalIDF, path: str | Path, name: str, extra: dict | None = None) -> bytes:
    """Write ``flow`` as a safetensors file (atomically); return its sha256."""
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "config": json.dumps(flow.config.to_dict(), sort_keys=True),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in flow.state_dict().items()}
    data = st_save(tensors, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)
    return hashlib.sha256(data).digest()


def model_from_bytes(data: bytes, name: str, path: str = "") -> Model:
    try:
        # metadata lives in the header: 8-byte little-endian length, then JSON
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + n]).get("__metadata__") or {}
        tensors = st_load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
        raise ModelNotFoundError(f"{path or name}: not a valid safetensors model file") from None
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ModelNotFoundError(f"{path or name}: not an idfzip model file of format version {FORMAT_VERSION}")
    try:
        flow = HierarchicalIDF(IDFConfig.from_dict(json.loads(meta["config"])))
        flow.load_state_dict(tensors, strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"{path or name}: weights do not match the config ({detail})") from None
    flow.eval()
    for mod in flow.modules():
        if hasattr(mod, "freeze"):
            mod.freeze()
    return Model(name, hashlib.sha256(data).digest(), path, flow, meta)


def load_shipped(name: str) -> Model:
    """The shipped model ``name``; for the empty name (a version 2 file's "shipped model, by hash"), see
    ``load_by_hash``."""
    p = shipped(name)
    return _load_cached(str(p.resolve()), p.stat().st_mtime)


def load_by_hash(prefix: bytes) -> Model:
    """The shipped model whose sha256 starts with ``prefix``."""
    name = shipped_name(prefix)
    if name is None:
        raise ModelNotFoundError(
            f"the file was written with a shipped model ({prefix.hex()}) that this installation does not have "
            f"(shipped: {', '.join(available()) or 'none'}); give the model file with --model"
        )
    return load_shipped(name)


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> Model:
    return model_from_bytes(Path(path).read_bytes(), Path(path).stem, path)


def load(name_or_path: str | None = None) -> Model:
    """Load a shipped model by name or a model file by path (cached). Its name is the file's stem."""
    p = resolve(name_or_path)
    return _load_cached(str(p.resolve()), p.stat().st_mtime)


def with_device(model: Model, device: str) -> Model:
    if device != "cpu":
        if device.startswith("cuda") and not torch.cuda.is_available():
            from .errors import IdfzipError

            raise IdfzipError("--device cuda requested but no CUDA device is available")
        model.flow.to(device)
    return model
