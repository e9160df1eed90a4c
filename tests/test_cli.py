"""The command line, through click's runner (fast) and a real subprocess (exit codes, no tracebacks)."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SHARED, assert_same, photo
from PIL import Image

import idfzip
from idfzip import registry
from idfzip.cli import cli
from idfzip.imagefile import MAX_INPUT_BYTES
from idfzip.planes import same_image


@pytest.fixture()
def run(tiny):
    def invoke(*args, model=True):
        pre = ["--model", tiny.path] if model else []
        return CliRunner().invoke(cli, [*pre, *map(str, args)], catch_exceptions=False)

    return invoke


def test_compress_decompress_identical(run, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(photo(80, 60)).save(src)  # over codec.SMALL_IMAGE pixels: the flow (only: the tiny model loses
    r = run("compress", "-v", "--flow-only", src)  # to WebP, test_webp_tiles_are_reported)
    assert r.exit_code == 0, r.output
    assert "bpd" in r.output and "model NLL" in r.output
    assert (tmp_path / "a.idfz").exists()
    (tmp_path / "a.png").rename(tmp_path / "orig.png")
    r = run("decompress", tmp_path / "a.idfz")
    assert r.exit_code == 0, r.output
    assert_same(Image.open(tmp_path / "orig.png"), Image.open(tmp_path / "a.png"))


def test_refuses_to_overwrite_without_force(run, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(photo(20, 20)).save(src)
    assert run("compress", src).exit_code == 0
    r = run("decompress", tmp_path / "a.idfz")
    assert r.exit_code == 1 and "already exists" in r.output
    assert run("decompress", "--force", tmp_path / "a.idfz").exit_code == 0
    r = run("compress", src)
    assert r.exit_code == 1 and "--force" in r.output


def test_output_options_and_formats(run, tmp_path):
    src = tmp_path / "a.png"
    im = Image.fromarray(photo(33, 17))
    im.save(src)
    assert run("compress", "-o", tmp_path / "x.idfz", src).exit_code == 0
    for suffix in (".png", ".tif", ".bmp", ".webp"):
        r = run("decompress", "-o", tmp_path / f"back{suffix}", tmp_path / "x.idfz")
        assert r.exit_code == 0, r.output
        assert Image.open(tmp_path / f"back{suffix}").tobytes() == im.tobytes()
    r = run("decompress", "-o", tmp_path / "back.jpg", tmp_path / "x.idfz")
    assert r.exit_code == 1 and "Error:" in r.output and not (tmp_path / "back.jpg").exists()


def test_several_inputs_bad_one_reported_and_skipped(run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(photo(20, 30)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    r = run("compress", "--out-dir", out, bad, good, tmp_path / "missing.png")
    assert r.exit_code == 1
    assert sum(line.startswith("Error: ") for line in r.output.splitlines()) == 2
    assert sorted(p.name for p in out.iterdir()) == ["good.idfz"]
    r = run("decompress", "--out-dir", tmp_path / "back", out / "good.idfz")
    assert r.exit_code == 0
    assert Image.open(tmp_path / "back" / "good.png").tobytes() == Image.open(good).tobytes()


def test_info(run, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.dstack([photo(96, 64), np.full((64, 96), 255, np.uint8)]), "RGBA").save(src)
    run("compress", "--flow-only", src)
    r = run("info", tmp_path / "a.idfz", model=False)
    assert r.exit_code == 0
    assert "96x64 RGBA" in r.output and "bits per sub-pixel" in r.output and "tiny" in r.output
    assert (
        "tiles:       1 (the whole image)" in r.output and "format:      .idfz version 9 (split windows)\n" in r.output
    )
    assert "adapted:     1 of 1 tiles" in r.output  # a random tiny model gains from adapting at this size
    legacy = Path(__file__).resolve().parent / "golden" / "legacy_v3.idfz"
    assert "version 3 (float coding tables" in run("info", legacy, model=False).output


def test_webp_tiles_are_reported(run, tmp_path):
    """compress -v and info say how many tiles went to WebP (golden/mixed.png, the shipped model: one of two);
    --flow-only codes them all by the model, a larger file."""
    src = tmp_path / "a.png"
    src.write_bytes((Path(__file__).resolve().parent / "golden" / "mixed.png").read_bytes())
    r = run("compress", "-v", "--tile", "128", src, model=False)
    assert r.exit_code == 0 and "flow:natural, 1 of 2 tiles WebP" in r.output, r.output
    info = run("info", tmp_path / "a.idfz", model=False).output
    assert "WebP tiles:  1 of 2" in info and "format:      .idfz version 12" in info, info
    mixed = (tmp_path / "a.idfz").stat().st_size
    assert run("compress", "-f", "--tile", "128", "--flow-only", src, model=False).exit_code == 0
    assert (tmp_path / "a.idfz").stat().st_size > mixed
    assert "WebP" not in run("info", tmp_path / "a.idfz", model=False).output


def test_corrupt_and_truncated_files_leave_no_output(run, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(photo(64, 64)).save(src)
    run("compress", src)
    data = (tmp_path / "a.idfz").read_bytes()
    cases = {
        "trunc.idfz": data[: len(data) // 2],
        "flip.idfz": data[:-30] + bytes([data[-30] ^ 0xFF]) + data[-29:],
        "empty.idfz": b"",
        "text.idfz": b"hello world, not a file",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        r = run("decompress", tmp_path / name)
        assert r.exit_code == 1, name
        assert r.output.startswith("Error: ") and len(r.output.strip().splitlines()) == 1, r.output
        assert not (tmp_path / name.replace(".idfz", ".png")).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_help_on_every_command():
    for cmd in ([], ["compress"], ["decompress"], ["info"], ["models"]):
        r = CliRunner().invoke(cli, [*cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output


def _idfzip(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "idfzip.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_subprocess_errors_are_one_line_without_traceback(tiny, tmp_path):
    (tmp_path / "x.idfz").write_bytes(b"IDZ\x01\x00\xff\xff\xff\xff\x0f\x01\x01")
    r = _idfzip("--model", tiny.path, "decompress", "x.idfz", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = _idfzip("--model", str(tmp_path / "nope.safetensors"), "compress", "x.png", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    src = tmp_path / "a.png"
    Image.fromarray(photo(16, 16)).save(src)
    r = _idfzip("--threads", "2", "--model", tiny.path, "compress", "a.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _idfzip("--model", tiny.path, "decompress", "-o", "b.png", "a.idfz", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "b.png").tobytes() == Image.open(src).tobytes()


PNGSUITE = SHARED / "pngsuite"


@pytest.mark.skipif(not PNGSUITE.is_dir(), reason="../shared/data/pngsuite not present")
def test_pngsuite_through_the_cli_with_the_shipped_model(tmp_path):
    """Every valid PngSuite file round-trips exactly; every corrupt one (x*.png) is a clean error."""
    files = sorted(PNGSUITE.glob("*.png"))
    valid = [f for f in files if not f.name.startswith("x")]
    corrupt = [f for f in files if f.name.startswith("x")]
    runner = CliRunner()
    r = runner.invoke(cli, ["compress", "-q", "--out-dir", str(tmp_path / "z"), *map(str, valid)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(
        cli, ["decompress", "--out-dir", str(tmp_path / "back"), *map(str, sorted((tmp_path / "z").iterdir()))]
    )
    assert r.exit_code == 0, r.output
    for f in valid:
        orig = Image.open(f)
        back = Image.open(tmp_path / "back" / (f.stem + ".png"))
        assert_same(orig, back)
    r = runner.invoke(cli, ["compress", "--out-dir", str(tmp_path / "bad"), *map(str, corrupt)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == len(corrupt) and all(line.startswith("Error: ") for line in lines)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_outputs_follow_the_umask(run, tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(photo(16, 16)).save(src)
    old = os.umask(0o022)
    try:
        assert run("compress", src).exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "a.idfz").stat().st_mode & 0o777 == 0o644


def test_every_mode_and_odd_size_through_the_cli(run, tmp_path):
    """Files of every mode (PNG where PNG holds it, else TIFF) and odd sizes round-trip through the CLI."""
    from test_codec import _modes

    src = tmp_path / "src"
    src.mkdir()
    originals = {}
    for name, im in _modes():
        suffix = ".png" if im.mode in ("1", "L", "LA", "P", "I;16", "RGB", "RGBA") else ".tif"
        path = src / (name.replace(";", "_") + suffix)
        im.save(path)
        originals[path] = Image.open(path)
    for w, h in [(1, 1), (1, 9), (9, 1), (65, 257)]:
        path = src / f"rgb_{w}x{h}.png"
        Image.fromarray(photo(w, h, seed=w + h)).save(path)
        originals[path] = Image.open(path)
    r = run("compress", "-q", "--out-dir", tmp_path / "z", *sorted(originals))
    assert r.exit_code == 0, r.output
    r = run("decompress", "--out-dir", tmp_path / "back", *sorted((tmp_path / "z").iterdir()))
    assert r.exit_code == 0, r.output
    for path, orig in originals.items():
        back = next((tmp_path / "back").glob(path.stem + ".*"))
        assert_same(orig, Image.open(back))


def test_review_cases_give_one_named_line_each(run, tmp_path):
    a, b = tmp_path / "x.png", tmp_path / "x.tif"
    Image.fromarray(photo(20, 20)).save(a)
    Image.fromarray(photo(20, 20, seed=2)).save(b)
    r = run("compress", "-f", a, b)  # same output name: the second is refused, not silently overwritten
    assert r.exit_code == 1 and "also the output of an earlier input" in r.output
    (tmp_path / "empty.idfz").write_bytes(b"")
    r = run("info", tmp_path / "empty.idfz")
    assert r.output.startswith(f"Error: {tmp_path / 'empty.idfz'}: ")
    big = tmp_path / "big.png"
    Image.fromarray(photo(80, 60)).save(big)
    r = run("compress", "-f", "--tile", "30", big, b)  # the tiny test model needs multiples of 4
    assert r.exit_code == 1 and "multiple of 4" in r.output and "internal" not in r.output
    assert (tmp_path / "x.idfz").exists()  # the other input still went on
    p = Image.fromarray(np.arange(600, dtype=np.uint8).reshape(20, 30) % 4).convert("P")
    p.putpalette([255, 0, 0, 0, 0, 255, 0, 128, 0, 0, 255, 255, 9, 9, 9, 10], "RGBA")
    p.save(tmp_path / "p.png")
    run("compress", "-o", tmp_path / "p.idfz", tmp_path / "p.png")
    r = run("decompress", "-o", tmp_path / "p.bmp", tmp_path / "p.idfz")
    assert r.exit_code == 1 and "use .png" in r.output and not (tmp_path / "p.bmp").exists()
    assert run("decompress", "-o", tmp_path / "p2.png", tmp_path / "p.idfz").exit_code == 0
    assert_same(Image.open(tmp_path / "p.png"), Image.open(tmp_path / "p2.png"))


def test_usage_errors_are_one_line(tmp_path):
    r = _idfzip("compress", "-o", "a.idfz", "--out-dir", "d", "x.png", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1


class Hung(Exception):
    """Not an OSError: the command's own error handling must not swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail instead of hanging (SIGALRM interrupts a blocking open of a FIFO)."""

    def expired(*_):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_devices_fifos_and_huge_files_are_refused_at_once(run, tmp_path):
    fifo = tmp_path / "pipe.idfz"
    os.mkfifo(fifo)  # no writer: opening it to read would wait forever
    huge = tmp_path / "huge.idfz"
    with open(huge, "wb") as f:
        f.truncate(MAX_INPUT_BYTES + 1)  # sparse: nothing is written
    expected = [
        "Error: /dev/zero: not a regular file",  # read without end before: 5 GB, then MemoryError
        f"Error: {fifo}: not a regular file",
        f"Error: {huge}: {MAX_INPUT_BYTES + 1} bytes, more than any input idfzip can use ({MAX_INPUT_BYTES})",
    ]
    t = time.perf_counter()
    with _deadline(20):
        for cmd in (["compress", "--out-dir", tmp_path / "z"], ["decompress", "--out-dir", tmp_path / "z"], ["info"]):
            r = run(*cmd, "/dev/zero", fifo, huge)
            assert r.exit_code == 1 and r.output.splitlines() == expected, r.output
    assert time.perf_counter() - t < 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.idfz", "pipe.idfz"]


def _wait_for_torch(pid: int, limit: float = 20) -> None:
    """Return once process ``pid`` has begun loading torch's libraries (or after 0.3 s without /proc)."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():
        time.sleep(0.3)
        return
    end = time.monotonic() + limit
    while time.monotonic() < end:
        with contextlib.suppress(OSError):
            if "libtorch" in maps.read_text():
                return
        time.sleep(0.01)


def test_ctrl_c_while_torch_loads_is_one_line_and_status_130(tmp_path):
    Image.fromarray(photo(64, 64)).save(tmp_path / "a.png")
    p = subprocess.Popen(
        [sys.executable, "-m", "idfzip.cli", "compress", "a.png"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job's children ignore it
    )
    _wait_for_torch(p.pid)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert "Traceback" not in err and err.strip() == "Error: interrupted" and out == "", err
    assert p.returncode == 130
    assert [f.name for f in tmp_path.iterdir()] == ["a.png"]


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["models"],
        ["info", "GOLDEN"],
        ["--threads", "1", "decompress", "-o", "OUT.png", "CLASSICAL"],
        ["compress", "-o", "OUT.idfz", "FLAT"],
    ],
)
def test_quick_commands_do_not_import_torch(args, tmp_path):
    """--help, --version, models and info answer without torch (1.5 s of start-up), and so do a file stored
    classically (golden/graphic.idfz: whole WebP) and an image of one colour (never given to the flow)."""
    Image.new("RGB", (300, 200), (10, 20, 30)).save(tmp_path / "flat.png")
    golden = Path(__file__).parent / "golden"
    names = {"GOLDEN": golden / "rgb.idfz", "CLASSICAL": golden / "graphic.idfz", "FLAT": tmp_path / "flat.png"}
    given = [str(names.get(a, tmp_path / a if a.startswith("OUT") else a)) for a in args]
    code = (
        "import sys, idfzip.cli as c\nsys.argv = ['idfzip', *sys.argv[1:]]\ntry:\n    c.main()\n"
        "except SystemExit:\n    pass\nprint('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code, *given], capture_output=True, text=True)
    lines = r.stdout.splitlines()
    said = len(lines) > 1 or "->" in r.stderr  # help, lists and info on stdout; compress and decompress on stderr
    assert r.returncode == 0 and said and lines[-1] == "False", (r.stdout, r.stderr)
    if "CLASSICAL" in args:
        assert same_image(Image.open(tmp_path / "OUT.png"), Image.open(golden / "graphic.png"))
    if "FLAT" in args:
        assert idfzip.decompress((tmp_path / "OUT.idfz").read_bytes()).tobytes() == Image.open(names["FLAT"]).tobytes()
    from idfzip import cli as cli_module
    from idfzip import codec, compress

    assert compress is codec.compress  # the lazy names are the codec's
    assert (cli_module.DEFAULT_TILE, cli_module.LARGE_TILE) == (codec.DEFAULT_TILE, codec.LARGE_TILE)
    assert cli_module.DEFAULT_EFFORT == codec.DEFAULT_EFFORT


def test_shared_options_go_before_or_after_the_subcommand(tiny, tmp_path):
    """--threads, --model and --device are accepted after the subcommand as before it (as bench and train take
    them); the value after wins."""
    import torch

    src = tmp_path / "a.png"
    Image.fromarray(photo(80, 60)).save(src)
    n = torch.get_num_threads()
    try:
        r = CliRunner().invoke(
            cli,
            [
                "--model",
                "no-such-model",
                "compress",
                "--threads",
                "1",
                "--model",
                tiny.path,
                "--device",
                "cpu",
                "-v",
                "--flow-only",
                str(src),
            ],
        )
        assert r.exit_code == 0 and f"flow:{tiny.name}" in r.output, r.output
        assert torch.get_num_threads() == 1
        r = CliRunner().invoke(
            cli,
            [
                "decompress",
                "--threads",
                "2",
                "--model",
                tiny.path,
                "-o",
                str(tmp_path / "b.png"),
                str(tmp_path / "a.idfz"),
            ],
        )
        assert r.exit_code == 0 and torch.get_num_threads() == 2, r.output
        assert_same(Image.open(tmp_path / "b.png"), Image.open(src))
    finally:
        torch.set_num_threads(n)


def test_models_lists_what_loading_finds():
    from idfzip import zoo

    r = CliRunner().invoke(cli, ["models"])
    head, *rows, foot = r.output.splitlines()
    assert r.exit_code == 0 and head.split()[:4] == ["model", "sha256", "parameters", "for"] and "default" in foot
    assert [row.split()[0].rstrip("*") for row in rows] == zoo.available()
    for row in rows:
        name, sha, params, *_, path = row.split()
        m = zoo.load(name.rstrip("*"))
        assert (sha, params, path) == (m.sha256.hex()[:16], f"{m.flow.num_parameters():,}", m.path)
        assert name.endswith("*") == (m.name in ("natural", "grey")) and registry.PURPOSES[m.name] in row


def _grey(path: Path) -> Path:
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(path)  # mode L: no model needed
    return path


def test_dangling_symlink_output_is_kept_without_force(run, tmp_path):
    src = _grey(tmp_path / "a.png")
    link = tmp_path / "a.idfz"
    link.symlink_to(tmp_path / "nowhere")
    r = run("compress", src)
    assert r.exit_code == 1 and "already exists" in r.output
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()
    assert run("compress", "--force", src).exit_code == 0
    assert not link.is_symlink() and link.is_file()


def test_unwritable_output_folder_is_named_not_a_temporary_file(run, tmp_path, monkeypatch):
    src = _grey(tmp_path / "a.png")
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    r = run("compress", "-o", blocker / "a.idfz", src)
    assert r.exit_code == 1 and r.output == f"Error: {blocker / 'a.idfz'}: cannot write into {blocker}: not a folder\n"
    out = tmp_path / "out"
    out.mkdir()

    def refuse(*args, dir=None, **kwargs):  # what a read-only folder does, also for root
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".idfzip-never-made.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    r = run("compress", "-o", out / "a.idfz", src)
    assert r.exit_code == 1 and r.output == f"Error: {out / 'a.idfz'}: cannot write into {out}: Permission denied\n"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(run, tmp_path):
    src = _grey(tmp_path / "a.png")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        r = run("compress", "-o", out / "a.idfz", src)
    finally:
        out.chmod(0o755)
    assert r.exit_code == 1 and r.output == f"Error: {out / 'a.idfz'}: cannot write into {out}: Permission denied\n"


def test_jobs_give_the_same_files_and_messages_in_input_order(run, tmp_path):
    """-j 2 codes inputs in two worker processes: the same files as -j 1, each input's line in input order, a
    bad input reported and the others written (exit status 1), as one at a time."""
    srcs = []
    for i in range(3):
        srcs.append(tmp_path / f"{i}.png")
        Image.fromarray(photo(64 + 16 * i, 48, seed=i)).save(srcs[-1])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    outs = {}
    for j in (1, 2):
        r = run("compress", "-j", j, "--flow-only", "--out-dir", tmp_path / f"j{j}", srcs[0], bad, *srcs[1:])
        lines = r.output.splitlines()
        assert r.exit_code == 1 and len(lines) == 4 and lines[1].startswith(f"Error: {bad}"), r.output
        assert [line.split(" ->")[0] for line in lines[::2] + lines[3:]] == [str(srcs[0]), str(srcs[1]), str(srcs[2])]
        outs[j] = {p.name: p.read_bytes() for p in (tmp_path / f"j{j}").iterdir()}
    assert outs[1] == outs[2] and len(outs[1]) == 3
    r = run("decompress", "-j", 2, "--out-dir", tmp_path / "back", *sorted((tmp_path / "j2").iterdir()))
    assert r.exit_code == 0 and len(r.output.splitlines()) == 3, r.output
    for s in srcs:
        assert_same(Image.open(s), Image.open(tmp_path / "back" / s.name))
    r = run("decompress", "-j", 2, "-t", *sorted((tmp_path / "j2").iterdir()))
    assert r.exit_code == 0 and r.output.count(": OK") == 3
