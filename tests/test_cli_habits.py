"""The command line as users of gzip, zstd and cjxl expect it: pipes, -c, --rm/-k, -t, -r, -q/-v, info that
checks structure, clear messages for the rough edges new users hit."""

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import assert_same, photo
from PIL import Image

import idfzip
from idfzip import cli as cli_module
from idfzip.cli import cli


@pytest.fixture()
def run(tiny):
    def invoke(*args):
        return CliRunner().invoke(cli, ["--model", tiny.path, *map(str, args)], catch_exceptions=False)

    return invoke


def _rgb(path: Path, w: int = 40, h: int = 24) -> Path:
    Image.fromarray(photo(w, h)).save(path)
    return path


def _pipe(tiny, *args, stdin: bytes = b"", cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "idfzip.cli", "--model", tiny.path, *map(str, args)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, cwd=cwd, timeout=120, check=False)


def test_pipes_stdin_to_stdout_and_dash_output(tiny, tmp_path):
    src = _rgb(tmp_path / "a.png")
    r = _pipe(tiny, "compress", "-", stdin=src.read_bytes(), cwd=tmp_path)  # cat a.png | idfzip compress - > x
    assert r.returncode == 0 and r.stdout.startswith(b"IDZ"), r.stderr
    assert b"stdin -> stdout" in r.stderr and not list(tmp_path.glob("-*"))
    packed = r.stdout
    r = _pipe(tiny, "decompress", "-o", "-", "-", stdin=packed, cwd=tmp_path)  # -o -: stdout, not a file '-'
    assert r.returncode == 0 and r.stdout.startswith(b"\x89PNG"), r.stderr
    (tmp_path / "back.png").write_bytes(r.stdout)
    assert_same(Image.open(src), Image.open(tmp_path / "back.png"))
    assert not (tmp_path / "-").exists()


def test_stdout_flag_and_dash_output_in_process(run, tmp_path, capsysbinary):
    src = _rgb(tmp_path / "a.png")
    assert run("compress", "-c", src).exit_code == 0
    assert not (tmp_path / "a.idfz").exists()  # -c writes nothing beside the input
    r = run("compress", "-o", "-", src)
    assert r.exit_code == 0 and not (tmp_path / "-").exists()
    for bad in (["-c", "-o", tmp_path / "x.idfz"], ["-c", "--out-dir", tmp_path], ["-c", src]):
        assert run("compress", *bad, src).exit_code == 2  # usage errors exit with 2


def test_keep_is_the_default_and_rm_removes_inputs_once_written(run, tmp_path):
    src = _rgb(tmp_path / "a.png")
    assert run("compress", "-k", src).exit_code == 0 and src.exists()
    r = run("compress", "-f", "--rm", src)
    assert r.exit_code == 0 and not src.exists() and (tmp_path / "a.idfz").exists()
    r = run("decompress", "--rm", tmp_path / "a.idfz")
    assert r.exit_code == 0 and src.exists() and not (tmp_path / "a.idfz").exists()
    assert run("compress", "-k", "--rm", src).exit_code == 2
    assert run("compress", "-c", "--rm", src).exit_code == 2
    (tmp_path / "b.idfz").write_bytes(b"IDZ\x05")  # a failed input is never removed
    assert run("decompress", "--rm", tmp_path / "b.idfz").exit_code == 1 and (tmp_path / "b.idfz").exists()


def test_test_mode_decodes_checks_and_writes_nothing(run, tmp_path):
    src = _rgb(tmp_path / "a.png")
    assert run("compress", src).exit_code == 0
    src.unlink()
    r = run("decompress", "-t", tmp_path / "a.idfz")
    assert r.exit_code == 0 and "a.idfz: OK" in r.output and not src.exists()
    data = (tmp_path / "a.idfz").read_bytes()
    (tmp_path / "cut.idfz").write_bytes(data[: len(data) // 2])
    r = run("decompress", "-t", tmp_path / "a.idfz", tmp_path / "cut.idfz")
    assert r.exit_code == 1 and "cut.idfz: file is truncated" in r.output and "a.idfz: OK" in r.output
    assert run("decompress", "-t", "-o", tmp_path / "x.png", tmp_path / "a.idfz").exit_code == 2


def test_recursive_folders(run, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    a, b = _rgb(tmp_path / "d" / "a.png"), _rgb(tmp_path / "d" / "sub" / "b.png", 20, 20)
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    assert run("compress", tmp_path / "d").exit_code == 1  # a folder without -r is an error, named
    r = run("compress", "-r", tmp_path / "d")
    assert r.exit_code == 0 and (tmp_path / "d" / "a.idfz").exists() and (tmp_path / "d" / "sub" / "b.idfz").exists()
    a.unlink()
    b.unlink()
    r = run("decompress", "-r", "-q", tmp_path / "d")
    assert r.exit_code == 0 and r.output == "" and a.exists() and b.exists()


def test_quiet_and_verbose_everywhere(run, tmp_path, monkeypatch):
    src = _rgb(tmp_path / "a.png")
    assert run("compress", "-q", src).output == ""
    r = run("decompress", "-f", tmp_path / "a.idfz")
    assert r.exit_code == 0 and "a.idfz -> " in r.output  # decompress reports like compress
    assert run("decompress", "-q", "-f", tmp_path / "a.idfz").output == ""
    assert run("info", "-q", tmp_path / "a.idfz").output == ""
    monkeypatch.setattr(cli_module, "PROGRESS_PERIOD", 0.0)  # not a terminal: -v gives plain progress lines
    r = run("compress", "-v", "-f", src)
    assert r.exit_code == 0 and "%" in r.output and "a.png: 100%" in r.output


def test_info_checks_structure_and_says_truncated(run, tmp_path):
    src = _rgb(tmp_path / "a.png", 70, 50)
    assert run("compress", src).exit_code == 0
    data = (tmp_path / "a.idfz").read_bytes()
    for n in (20, 100, len(data) // 2, len(data) - 1):
        (tmp_path / "t.idfz").write_bytes(data[:n])
        r = run("info", tmp_path / "t.idfz")
        assert r.exit_code == 1 and r.output.strip() == f"Error: {tmp_path / 't.idfz'}: file is truncated"
    (tmp_path / "t.idfz").write_bytes(data + b"\0")
    r = run("info", tmp_path / "t.idfz")
    assert r.exit_code == 1 and "unexpected bytes" in r.output
    r = run("info", tmp_path / "a.idfz", tmp_path / "a.idfz")
    assert r.exit_code == 0 and r.output.count("\n\nfile:") == 1  # one block per file, blank line between
    r = run("info", "--json", tmp_path / "a.idfz")
    d = json.loads(r.output)
    assert d["width"] == 70 and d["bytes"] == len(data) and d["metadata"] == []


def test_info_names_the_metadata_present(run, tmp_path):
    im = Image.new("P", (8, 8))
    im.putpalette([0, 0, 0, 255, 255, 255])
    im.info["transparency"] = 1
    im.save(tmp_path / "p.png")
    assert run("compress", tmp_path / "p.png").exit_code == 0
    r = run("info", tmp_path / "p.idfz")
    assert "(palette, transparency)" in r.output and "ICC" not in r.output


def test_wrong_kind_of_input_is_named(run, tmp_path):
    src = _rgb(tmp_path / "g.png")
    assert run("compress", src).exit_code == 0
    r = run("compress", tmp_path / "g.idfz")
    assert r.exit_code == 1 and "already an .idfz file" in r.output
    (tmp_path / "text.png").write_text("hello")
    r = run("decompress", tmp_path / "text.png")
    assert r.exit_code == 1 and "text.png: not an .idfz file" in r.output
    r = run("decompress", src)
    assert r.exit_code == 1 and "not an .idfz file (compress it?)" in r.output
    for cmd in ("compress", "decompress", "info"):
        r = run(cmd, tmp_path / "missing.png")
        assert r.exit_code == 1 and r.output.strip().endswith("missing.png: no such file")


def test_tiff_refusal_names_the_exif(run, tmp_path):
    im = Image.fromarray(photo(24, 16))
    exif = Image.Exif()
    exif[0x010F] = "Camera"
    im.save(tmp_path / "e.jpg", exif=exif.tobytes(), quality=90)
    r = run("compress", tmp_path / "e.jpg")
    assert r.exit_code == 0 and "JPEG input: its decoded pixels are stored losslessly" in r.output
    r = run("decompress", "-o", tmp_path / "e.tif", tmp_path / "e.idfz")
    assert r.exit_code == 1 and "cannot hold this RGB image's EXIF exactly (use .png)" in r.output
    assert run("decompress", "-o", tmp_path / "e.png", tmp_path / "e.idfz").exit_code == 0


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_palette_indices_past_the_palette_round_trip_through_files(run, tmp_path):
    """A PNG whose 8-bit indices reach past its 2-entry palette (Pillow reads it): compress accepts it, so
    decompress must give it back as a PNG that reads to the same indices and palette."""
    w, h = 4, 3
    rows = b"".join(b"\0" + bytes((x + 3 * y) % 7 for x in range(w)) for y in range(h))
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0))
    png += _png_chunk(b"PLTE", bytes([255, 0, 0, 0, 255, 0])) + _png_chunk(b"IDAT", zlib.compress(rows))
    (tmp_path / "f.png").write_bytes(png + _png_chunk(b"IEND", b""))
    assert run("compress", tmp_path / "f.png").exit_code == 0
    r = run("decompress", "-o", tmp_path / "back.png", tmp_path / "f.idfz")
    assert r.exit_code == 0, r.output
    a, b = Image.open(tmp_path / "f.png"), Image.open(tmp_path / "back.png")
    assert max(a.tobytes()) == 6 and len(a.getpalette()) == 6
    assert_same(a, b)


def test_a_tiny_image_coded_classically_never_loads_the_model(tmp_path):
    im = Image.fromarray(photo(1, 1))
    data = idfzip.compress(im, model=str(tmp_path / "no-such-model.safetensors"))  # loading it would fail
    assert idfzip.inspect(data)["tiles"] == 0 and idfzip.decompress(data).tobytes() == im.tobytes()


def test_training_says_why_it_needs_more_images_and_takes_an_override(tmp_path):
    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / f"{i}.png")
    cfg = tmp_path / "c.json"
    model = {"levels": 2, "prior_hidden": 8, "mixtures": 2}
    cfg.write_text(json.dumps({"model": model, "train": {"crop": 16, "batch": 2, "steps": 1, "val_images": 8}}))
    args = ["train", str(tmp_path), "--config", str(cfg), "--out", str(tmp_path / "m.safetensors")]
    r = CliRunner().invoke(cli, args)  # main() prints the IdfzipError as one line
    assert r.exit_code == 1 and "val_images" in str(r.exception) and "--val-images" in str(r.exception)
    r = CliRunner().invoke(cli, [*args, "--val-images", "1"])
    assert r.exit_code == 0 and "2 training images, 1 validation images" in r.output, r.output


def test_preview_is_close_to_the_box_downsampled_image(tmp_path):
    """--preview K for K = 1 .. levels (shipped model, a 128x96 photo crop): the picture is the image 2**K
    times smaller per side, within a few grey levels of its box average, for RGB and (grey model) L; RGBA and
    LA keep their alpha plane averaged, and an image coded classically is previewed from its whole decode."""
    rgb = Image.open(Path(__file__).resolve().parent.parent / "examples" / "sample.png").convert("RGB")
    im = rgb.crop((0, 0, 128, 94))
    data = idfzip.compress(im, flow_only=True)  # (WebP would take these small crops whole)
    levels = 5
    for k in range(1, levels + 1):
        p = idfzip.decompress(data, preview=k)
        ref = im.reduce(1 << k)
        assert p.mode == "RGB" and p.size == ref.size == (-(-128 >> k), -(-94 >> k))
        err = np.abs(np.asarray(p, dtype=int) - np.asarray(ref, dtype=int)).mean()
        assert err < 8, (k, err)
    with pytest.raises(idfzip.IdfzipError, match="preview must be 1..5"):
        idfzip.decompress(data, preview=levels + 1)
    rgba = im.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    p = idfzip.decompress(idfzip.compress(rgba, flow_only=True), preview=2)
    assert p.mode == "RGBA" and p.getchannel("A").tobytes() == rgba.getchannel("A").reduce(4).tobytes()
    grey = im.convert("L")  # through the grey model: L, and LA with its alpha plane averaged
    p = idfzip.decompress(idfzip.compress(grey, flow_only=True), preview=1)
    assert p.mode == "L" and np.abs(np.asarray(p, dtype=int) - np.asarray(grey.reduce(2), dtype=int)).mean() < 8
    grey.putalpha(Image.linear_gradient("L").resize(im.size))
    p = idfzip.decompress(idfzip.compress(grey, flow_only=True), preview=2)
    assert p.mode == "LA" and p.getchannel("A").tobytes() == grey.getchannel("A").reduce(4).tobytes()
    pal = im.convert("P")  # coded classically
    assert idfzip.decompress(idfzip.compress(pal), preview=1).tobytes() == pal.convert("RGB").reduce(2).tobytes()
    (tmp_path / "s.idfz").write_bytes(data)
    r = CliRunner().invoke(cli, ["decompress", "--preview", "3", str(tmp_path / "s.idfz")])
    assert r.exit_code == 0 and Image.open(tmp_path / "s.preview-3.png").size == (16, 12)


def test_quiet_and_verbose_on_info_models_bench_and_train(run, tiny, tmp_path):
    src = _rgb(tmp_path / "a.png", 96, 72)  # over codec.SMALL_IMAGE pixels: the flow, in 3 x 3 tiles of 32
    assert run("compress", "--tile", 32, "--flow-only", src).exit_code == 0
    r = run("info", "-v", tmp_path / "a.idfz")
    assert "tile bytes:" in r.output and len(r.output.split("tile bytes:")[1].split("(")[0].split()) == 9
    r = CliRunner().invoke(cli, ["models", "-q"])
    assert r.output.split() == idfzip.zoo.available()
    r = CliRunner().invoke(cli, ["models", "-v"])
    assert r.output.count("config {") == len(idfzip.zoo.available())
    args = ["bench", str(src), "--model", str(tiny.path), "--compare", "png", "--process", "0"]
    r = CliRunner().invoke(cli, [*args, "-v"], catch_exceptions=False)
    assert r.exit_code == 0 and f"{src}: " in r.output and " bpd, encode " in r.output
    r = CliRunner().invoke(cli, [*args, "-q"], catch_exceptions=False)
    assert r.exit_code == 0 and f"{src}: " not in r.output and "idfzip" in r.output
    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / f"t{i}.png")
    cfg = tmp_path / "c.json"
    train_cfg = {"crop": 16, "batch": 2, "steps": 2, "val_every": 2, "val_images": 1}
    cfg.write_text(json.dumps({"model": {"levels": 2, "prior_hidden": 8, "mixtures": 2}, "train": train_cfg}))
    pngs = [str(tmp_path / f"t{i}.png") for i in range(3)]
    base = ["train", *pngs, "--config", str(cfg)]
    r = CliRunner().invoke(cli, [*base, "--out", str(tmp_path / "q.safetensors"), "-q"], catch_exceptions=False)
    assert r.exit_code == 0 and r.output.splitlines() == [r.output.strip()] and "validation" in r.output


def test_a_resumed_run_reports_its_step_first(tmp_path):
    from idfzip.flows import IDFConfig
    from idfzip.train import TrainConfig, train

    for i in range(3):
        Image.fromarray(photo(40, 36, seed=i)).save(tmp_path / f"{i}.png")
    model = IDFConfig.from_dict({"levels": 2, "prior_hidden": 8, "mixtures": 2})
    out = tmp_path / "m.safetensors"
    tc = TrainConfig(crop=16, batch=2, steps=3, val_every=3, val_images=1)
    train(model, tc, [tmp_path], out, "m", log=lambda line: None)
    seen = []
    tc = TrainConfig(crop=16, batch=2, steps=5, val_every=5, val_images=1)
    train(
        model,
        tc,
        [tmp_path],
        out,
        "m",
        resume=str(out) + ".ckpt",
        log=lambda line: None,
        progress=lambda step, bpd, val: seen.append((step, bpd, val)),
    )
    assert seen[0] == (3, None, None) and [s for s, _, v in seen[1:] if v is None] == [
        4,
        5,
    ]  # starts at the resumed step
    assert [s for s, _, v in seen[1:] if v is not None] == [5]  # and hears of each validation


def test_binary_output_never_goes_to_a_terminal(tiny, tmp_path):
    import pty

    grey = tmp_path / "g.png"
    Image.fromarray(photo(8, 8)[:, :, 0]).save(grey)
    master, slave = pty.openpty()
    try:
        cmd = [sys.executable, "-m", "idfzip.cli", "compress", "-c", str(grey)]
        r = subprocess.run(cmd, stdout=slave, stderr=subprocess.PIPE, timeout=120, check=False)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 1 and b"stdout is a terminal" in r.stderr


def test_effort_option_and_info(run, tmp_path):
    """-e/--effort 1..9 on compress (1: no adaptation; 7: version 9 with offsets, named by info); out of range
    is a usage error."""
    src = tmp_path / "p.png"
    Image.fromarray(photo(128, 96, seed=6)).save(src)
    sizes = {}
    for e in (1, 7):
        r = run("compress", "-e", e, "--flow-only", "-o", tmp_path / f"e{e}.idfz", src)
        assert r.exit_code == 0, r.output
        sizes[e] = (tmp_path / f"e{e}.idfz").stat().st_size
        r = run("decompress", "-t", tmp_path / f"e{e}.idfz")
        assert r.exit_code == 0, r.output
    assert sizes[7] < sizes[1]
    r = run("info", tmp_path / "e7.idfz")
    assert (
        "version 9 (split windows)" in r.output
        and "per-component offsets" in r.output
        and "effort:      5-9" in r.output
    )
    r = run("info", tmp_path / "e1.idfz")
    assert "adapted" not in r.output and "effort:      1," in r.output
    r = run("info", Path(__file__).parent / "golden" / "rgb_e8.idfz")  # version 10: output updates
    assert "version 10" in r.output and "effort:      7-9" in r.output
    assert re.search(r"updated:     \d+ slots' network output layers; \d+ bytes of fitted parameters", r.output)
    r = run("compress", "--effort", "10", src)
    assert r.exit_code == 2 and "10 is not in the range 1<=x<=9" in r.output
