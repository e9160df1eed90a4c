"""Files that must decode on every machine: committed golden files, the instruction-set matrix, and files
that ask for work they cannot pay for.

Golden files (tests/golden, written by scripts/make_golden.py with the shipped models) change only
with a new container version: a failure here means files people already have would no longer decode, or
that this build writes different bytes than the one that made them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from make_golden import FILES as CURRENT  # scripts/, on the path through conftest
from make_golden import GOLDEN, write
from PIL import Image

import idfzip
from idfzip import adapt
from idfzip.container import REST_WEBP, Container, layout
from idfzip.errors import CorruptFileError, ModelMismatchError
from idfzip.zoo import load_shipped


def _source(name: str) -> Image.Image:
    return Image.open(GOLDEN / f"{name.split('_')[0]}.png")


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_golden_files_decode_and_are_reproduced(name):
    """Files with offsets (versions 9 and 10) are re-encoded with their own float-fitted integers (make_golden's
    ``fitted_as``: another kind of CPU may fit others), and all that follows from them must be reproduced. Every
    kind decodes every file, test_instruction_set_matrix."""
    source = _source(name)
    data = (GOLDEN / f"{name}.idfz").read_bytes()
    c = Container.from_bytes(data)
    # tiled's 32-pixel tiles are too small to adapt; la's offsets would not pay for their bytes (so the encoder
    # keeps its file without them, flowcode.FEW_OFFSETS)
    assert c.version == {"tiled": 8, "la": 8, "rgb_e8": 10, "mixed": 12, "graphic": 11}.get(name, 9)
    assert bool(c.tiles) != (name == "graphic") and any(c.classical) == (name == "mixed")
    assert idfzip.decompress(data).tobytes() == source.tobytes()
    fitted = None
    if layout(c.version) >= 6:
        cfg = load_shipped("natural").flow.config
        K = cfg.mixtures
        shape = (3 * K, cfg.prior_hidden) if layout(c.version) == 7 else None
        fitted = adapt.from_bytes(c.flow_tiles[0], cfg.levels, cfg.channels, 4 + 6 * K, shape)[:2]
        assert len(c.flow_tiles) == 1 and fitted[0] and (layout(c.version) == 6 or fitted[1])
    assert write(name, fitted) == data


def test_golden_files_cover_adaptation_tiles_and_alpha():
    info = {name: idfzip.inspect((GOLDEN / f"{name}.idfz").read_bytes()) for name in CURRENT}
    assert info["rgb"]["adapted_tiles"] == 1 and info["rgb_e7"]["adapted_slots"] >= 1
    assert info["rgb_e8"]["updated_slots"] >= 1 and info["rgb_e8"]["adaptation_bytes"] > 0
    assert info["tiled"]["tiles"] == 6
    assert info["rgba"]["rest"] is not None and info["rgba"]["mode"] == "RGBA"
    assert info["la"]["rest"] is not None and info["la"]["mode"] == "LA" and info["la"]["model"] == "grey"
    assert info["mixed"]["classical_tiles"] == 1 and info["mixed"]["tiles"] == 2 and info["mixed"]["adapted_tiles"] == 1
    assert info["graphic"]["rest"]["method"] == REST_WEBP and info["graphic"]["tiles"] == 0


@pytest.mark.parametrize("name", ["rgb_v5", "rgba_v5", "tiled_v5", "rgb_e7_v6", "rgb_e8_v7"])
def test_versions_5_to_7_still_decode(name):
    """Written by commit df9838d (one-step windows; versions 6 and 7 at efforts 7 and 8, as make_golden
    writes them) on an AVX-512 machine: the layouts of versions 8-10 without split windows."""
    data = (GOLDEN / f"{name}.idfz").read_bytes()
    info = idfzip.inspect(data)
    assert info["version"] == info["layout"] == int(name[-1]) and not info["split_windows"]
    assert idfzip.decompress(data).tobytes() == _source(name).tobytes()


def test_default_files_of_version_8_still_decode():
    """rgb_v8.idfz: the default effort's file until effort 5 fitted offsets (written by commit 3a01e4e, AVX-512),
    version 8 with adaptation, as most files written before 2026-12-07 are; efforts 2-4 still write this."""
    data = (GOLDEN / "rgb_v8.idfz").read_bytes()
    info = idfzip.inspect(data)
    assert info["version"] == 8 and info["layout"] == 5 and info["split_windows"] and info["adapted_tiles"] == 1
    assert idfzip.decompress(data).tobytes() == _source("rgb").tobytes()
    assert idfzip.compress(_source("rgb"), "natural", effort=4, flow_only=True) == data


@pytest.mark.parametrize("name", ["rgb", "rgba", "tiled"])
def test_version_4_files_still_decode(name):
    """Written by the float64-network build (commit 88ca5f9) with the shipped `natural` model (now shipped as
    `natural-v1`) before its calibration: that file's hash names the calibrated model (its ``calibrated_from``),
    whose float weights are the same, and its networks run in the float64 mode."""
    data = (GOLDEN / f"{name}_v4.idfz").read_bytes()
    assert idfzip.inspect(data)["version"] == 4 and idfzip.inspect(data)["model"] == "natural-v1"
    assert idfzip.decompress(data).tobytes() == Image.open(GOLDEN / f"{name}.png").tobytes()


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_versions_decode_or_are_refused(version):
    """Written by the float-table build (commit b7424ea) on an AVX-512 machine; version 3 with adaptation.
    Their tables used float sigmoid/exp, whose last bits depend on the CPU: on the writer's kind of machine
    they decode exactly; on another (an AVX2-only CPU gives other tables for versions 1 and 2) the decoder
    may go astray, and must then refuse the file (stream checks, CRC), never return other pixels."""
    data = (GOLDEN / f"legacy_v{version}.idfz").read_bytes()
    # written with the first `natural`, now shipped as natural-v1; version 1 named it "natural", the hash decides
    assert idfzip.inspect(data)["version"] == version and idfzip.inspect(data)["model"] == "natural-v1"
    with pytest.raises(ModelMismatchError, match="with model 'natural-v1' "):  # not the name it holds
        idfzip.decompress(data, "natural")
    try:
        pixels = idfzip.decompress(data).tobytes()
    except CorruptFileError as e:
        assert torch.backends.cpu.get_cpu_capability() != "AVX512"
        assert "kind of CPU that wrote the file" in str(e)  # says why, and where it decodes
        return
    assert pixels == Image.open(GOLDEN / "legacy.png").tobytes()


def _capabilities() -> tuple[str, ...]:
    """torch's CPU kernel sets this CPU can run (ATEN_CPU_CAPABILITY above the CPU's own crashes, SIGILL)."""
    order = ("default", "avx2", "avx512")
    top = torch.backends.cpu.get_cpu_capability().lower()
    return order[: order.index(top) + 1] if top in order else ("default",)


CAPABILITIES = _capabilities()
WRITER = """
import sys, torch, idfzip
from PIL import Image
print(torch.backends.cpu.get_cpu_capability())
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):  # mixed.png: a flow tile and a WebP tile; others: the flow
    kw = {"tile": 128} if src.endswith("mixed.png") else {"flow_only": True}
    open(dst, "wb").write(idfzip.compress(Image.open(src), "natural", **kw))
"""
READER = """
import sys, json, torch, idfzip
print(torch.backends.cpu.get_cpu_capability())
out = {}
for path in sys.argv[1:]:
    try:
        out[path] = idfzip.decompress(open(path, "rb").read()).tobytes().hex()
    except Exception as e:
        out[path] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""


def _run(code: str, capability: str, *args: str) -> list[str]:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_instruction_set_matrix(tmp_path):
    """Written under each of torch's CPU kernel sets this CPU runs (avx512, avx2, default) and read under each
    other: 3 images x writers x readers exact, and the writers' files byte-identical (the float tables of
    version 3 failed this). Each reader also decodes the golden effort-7 files (versions 9 and 6, adaptation
    offsets), written on an AVX-512 machine with int8 products (test_flows checks that the float32 products of
    CPUs without VNNI give the same integers), and the effort-8 files (versions 10 and 7, output updates;
    AVX-512, int8 products). mixed.png is written with a flow tile and a WebP tile (version 12), and each reader
    also decodes the golden mixed.idfz and graphic.idfz (version 11, stored whole as WebP)."""
    if len(CAPABILITIES) < 2:
        pytest.skip(f"torch runs only one CPU kernel set here ({torch.backends.cpu.get_cpu_capability()})")
    grey = tmp_path / "grey.png"
    Image.open(GOLDEN / "tiled.png").convert("L").save(grey)
    sources = [GOLDEN / "rgb.png", GOLDEN / "rgba.png", grey, GOLDEN / "mixed.png"]
    files = {}
    for cap in CAPABILITIES:
        args = []
        for src in sources:
            files[cap, src.stem] = tmp_path / f"{cap}-{src.stem}.idfz"
            args += [str(src), str(files[cap, src.stem])]
        active = _run(WRITER, cap, *args)[0]
        if active.lower() != cap and cap != "default":
            pytest.skip(f"this CPU cannot run torch's {cap} kernels (got {active})")
    for src in sources:
        assert len({files[cap, src.stem].read_bytes() for cap in CAPABILITIES}) == 1, src.stem
        assert Container.from_bytes(files["default", src.stem].read_bytes()).tiles  # the grey one by the grey model
    assert Container.from_bytes(files["default", "mixed"].read_bytes()).version == 12
    for name in ("rgb_e7", "rgb_e8", "rgb_e7_v6", "rgb_e8_v7"):
        files[name, "rgb"] = GOLDEN / f"{name}.idfz"
    files["golden", "mixed"] = GOLDEN / "mixed.idfz"
    sources.append(GOLDEN / "graphic.png")
    files["golden", "graphic"] = GOLDEN / "graphic.idfz"
    for cap in CAPABILITIES:
        decoded = json.loads(_run(READER, cap, *map(str, files.values()))[1])
        for (_, stem), path in files.items():
            src = next(s for s in sources if s.stem == stem)
            assert decoded[str(path)] == Image.open(src).tobytes().hex(), (cap, path.name)


def test_thread_count_does_not_change_the_natural_models_bits():
    im = Image.open(GOLDEN / "rgb.png")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = idfzip.compress(im, "natural")
        torch.set_num_threads(2)
        assert idfzip.compress(im, "natural") == one
    finally:
        torch.set_num_threads(n)


BOMB = """
import resource, sys, time
import idfzip
from idfzip.container import MODEL_HASH_BYTES, Container
from idfzip.errors import CorruptFileError
from idfzip.zoo import load_shipped
model = load_shipped(sys.argv[3])
side, stream, mode = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), {"natural": "RGB", "grey": "L"}[sys.argv[3]]
c = Container(mode, side, side, crc32=0, model_name="", model_hash=model.sha256[:MODEL_HASH_BYTES], tile=0,
              tiles=[stream])
data = c.to_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    idfzip.decompress(data)
    print("decoded")
except CorruptFileError as e:
    print("error", len(data), time.perf_counter() - t,
          (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, e)
"""


@pytest.mark.parametrize(
    "side,stream,model",
    [(2048, b"", "natural"), (16384, b"", "natural"), (2048, bytes(range(64)) * 4, "natural"), (16384, b"", "grey")],
)
def test_a_stream_too_short_for_its_tile_fails_at_once(side, stream, model):
    """A tiny container declaring a huge tile (a shipped model's hash, an empty or short stream) fails within
    2 s and 300 MB instead of decoding millions of symbols out of nothing."""
    cmd = [sys.executable, "-c", BOMB, str(side), stream.hex(), model]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    word, size, seconds, megabytes, *_ = r.stdout.split(maxsplit=4)
    assert word == "error" and int(size) <= 300
    assert float(seconds) < 2.0 and float(megabytes) < 300


def test_a_constant_image_is_tiny_and_decodes():
    im = Image.new("RGB", (2048, 1536), (12, 200, 7))
    data = idfzip.compress(im, "natural")
    assert len(data) < 40
    assert idfzip.decompress(data).tobytes() == im.tobytes()


def test_a_nearly_constant_image_pays_the_minimum_and_decodes():
    """Flow-coded symbols cost at least coding.MIN_SYMBOL_BITS each, so the decoder can bound its work."""
    a = np.full((256, 256, 3), 90, dtype=np.uint8)
    a[100, 100] = 91
    data = idfzip.compress(Image.fromarray(a), load_shipped("natural"), flow_only=True)  # (WebP: 98 bytes)
    assert Container.from_bytes(data).tiles
    assert idfzip.decompress(data).tobytes() == a.tobytes()


def test_short_streams_are_refused_before_any_network_runs(monkeypatch):
    calls = []
    model = load_shipped("natural")
    monkeypatch.setattr(model.flow, "prior_raw", lambda *a, **k: calls.append(1))
    c = Container.from_bytes((GOLDEN / "rgb.png").with_suffix(".idfz").read_bytes())
    c.tiles = [b"\0\1\0\0\0"]  # an empty adaptation block and one word for 128 x 128 x 3 symbols
    with pytest.raises(CorruptFileError, match="too short"):
        idfzip.decompress(c.to_bytes(), model)
    assert not calls
