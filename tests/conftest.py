"""Shared fixtures: tiny random models, one round-trip helper, the shared data folder when present."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import idfzip
from idfzip.flows import HierarchicalIDF, IDFConfig
from idfzip.planes import encode_meta
from idfzip.zoo import load, save_model

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# the model store of every test (and of the processes tests start) is a fresh folder, never the user's
os.environ["IDFZIP_MODELS"] = tempfile.mkdtemp(prefix="idfzip-test-models-")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # make_golden's writers, for the tests


def make_model(tmp_path: Path, name: str = "tiny", calibrated: bool = True, **cfg) -> object:
    """A small randomly initialised model (random prior weights) saved and loaded like a shipped one;
    ``calibrated``: for the integer mode, on four smooth random images (its files are version 8, else 4)."""
    torch.manual_seed(1)
    config = IDFConfig(**{"levels": 2, "prior_hidden": 8, "mixtures": 2, **cfg})
    flow = HierarchicalIDF(config)
    with torch.no_grad():  # perturb the lifting filters so the flow is not a plain wavelet
        for p in flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if calibrated:
        flow.calibrate([torch.from_numpy(np.stack([photo(32, 32, s) for s in range(4)])).permute(0, 3, 1, 2)])
    path = tmp_path / f"{name}.safetensors"
    save_model(flow, path, name)
    return load(str(path))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_ar(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"), "tinyar", channel_ar=True)


@pytest.fixture(scope="session")
def tiny_cb(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("models"), "tinycb", channel_ar=True, context="checkerboard")


@pytest.fixture(scope="session")
def tiny_bipartite(tmp_path_factory):
    return make_model(
        tmp_path_factory.mktemp("models"), "tinybi", coupling="bipartite", init="identity", coupling_hidden=4, steps=2
    )


def assert_same(a: Image.Image, b: Image.Image) -> None:
    assert a.mode == b.mode
    assert a.size == b.size
    assert a.tobytes() == b.tobytes()
    assert encode_meta(a) == encode_meta(b)


def roundtrip(im: Image.Image, model, **kw) -> bytes:
    """Compress, decompress, assert identical; return the bytes. By default without WebP (``flow_only=True``):
    these tests are of the flow, and the tiny random models lose most tiles to WebP (test_codec tests that path)."""
    data = idfzip.compress(im, model, **{"flow_only": True, **kw})
    assert_same(im, idfzip.decompress(data, model))
    return data


def photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (low-pass noise), more photo-like than white noise."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3)).astype(np.float64)
    big = np.kron(small, np.ones((8, 8, 1)))[:h, :w]
    noise = rng.normal(0, 4, (h, w, 3))
    return np.clip(big + noise, 0, 255).astype(np.uint8)
