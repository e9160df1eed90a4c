"""Models: a model is one safetensors file holding its weights and its config (JSON metadata); this module
loads (cached) and saves them. Which files exist, by name and by hash, is idfzip.registry's (no torch).

A model is named by its file stem (``natural`` -> ``natural.safetensors``) and identified in .idfz files by
that name and the first bytes of the sha256 of the file. Shipped models live in the repository's models/
folder, installed as the package ``idfzip._models``; a user's models in the model store (idfzip.registry,
``idfzip models add``). ``--model`` accepts a shipped or installed name, or a path.
"""

from __future__ import annotations

import hashlib
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
from .registry import (  # noqa: F401 (the registry's names, as zoo has always offered them)
    DEFAULT_MODEL,
    FORMAT,
    FORMAT_VERSION,
    available,
    default_model,
    install_hint,
    installed,
    installed_path,
    models_dir,
    resolve,
    shipped,
    shipped_hashes,
    shipped_name,
)


@dataclass
class Model:
    name: str
    sha256: bytes  # of the whole file
    path: str
    flow: HierarchicalIDF
    metadata: dict
    # the sha256 of the file this one was calibrated from (metadata ``calibrated_from``): the same float
    # weights, so files of versions 1-4 written with that file decode with this one
    previous: bytes = b""

    def hashes(self, version: int) -> list[bytes]:
        """The file hashes a container of format ``version`` may name this model by."""
        return [self.sha256] + ([self.previous] if self.previous and version <= 4 else [])


def is_shipped(model: Model) -> bool:
    """Whether ``model`` is the shipped model of its name (so that files can name it by its hash alone)."""
    return shipped_hashes().get(model.sha256) == model.name


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
        flow.load_weights(tensors)  # a model never calibrated writes version 4 files
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"{path or name}: weights do not match the config ({detail})") from None
    flow.eval()
    for mod in flow.modules():
        if hasattr(mod, "freeze"):
            mod.freeze()
    try:
        previous = bytes.fromhex(meta.get("calibrated_from", ""))
    except ValueError:
        raise ModelNotFoundError(f"{path or name}: invalid calibrated_from in the metadata") from None
    return Model(name, hashlib.sha256(data).digest(), path, flow, meta, previous)


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


def load_named(name: str, prefix: bytes) -> Model:
    """The model a file names (``name``, its sha256 starting with ``prefix``): the shipped model of that name, else
    the installed one; ModelNotFoundError saying how to install it where neither is here (the caller checks the
    hash)."""
    if name in available():
        return load_shipped(name)
    p = installed_path(name)
    if p is None:
        raise ModelNotFoundError(install_hint(name, prefix))
    return _load_cached(str(p.resolve()), p.stat().st_mtime)


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
