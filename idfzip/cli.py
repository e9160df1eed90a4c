"""Command line: the only place click and tqdm appear. Parses, calls the library, reports one line per error.

Importing this module imports neither torch nor the codec (each command imports what it uses), so
``idfzip --help`` and ``--version`` start at once, and Ctrl-C while torch loads is the one line
``Error: interrupted`` (exit 130) like Ctrl-C anywhere else: no traceback, no partial output. Inputs are read
only from regular files or from stdin ('-'), and an existing output, a dangling symlink included, is kept
unless ``--force``; stdout gets an output only once it is complete, and binary data never goes to a terminal.
Exit status: 0 all inputs done, 1 some failed (one ``Error:`` line each; the rest go on), 2 usage, 130 Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import click
from PIL import Image

from . import registry
from .container import MAGIC, REST_METHODS, Container, inspect
from .errors import IdfzipError, ModelNotFoundError
from .imagefile import IMAGE_SUFFIXES, MAX_INPUT_BYTES, decode_image, read_input

DEFAULT_TILE, LARGE_TILE = 256, 1024  # = codec's (which imports numpy): a test checks they agree
DEFAULT_EFFORT = 5  # = codec.DEFAULT_EFFORT, likewise
PNG_MODES = {"1", "L", "LA", "P", "I;16", "RGB", "RGBA"}
LOSSLESS_SUFFIXES = {
    ".png": "PNG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".ppm": "PPM",
    ".pgm": "PPM",
    ".pbm": "PPM",
}


class Failure(Exception):
    """One input failed; the message is printed as ``Error: ...`` and the next input goes on."""


PROGRESS_PERIOD = 10.0  # seconds between plain progress lines (stderr not a terminal, -v)


class _Lines:
    """Progress as a plain line on stderr every PROGRESS_PERIOD seconds, for logs (stderr not a terminal)."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done = max(total, 1), desc, 0.0
        self.start = self.last = time.monotonic()

    def update(self, n: float) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= PROGRESS_PERIOD:
            self.last = now
            click.echo(f"{self.desc}: {100 * self.done / self.total:.0f}% ({now - self.start:.0f} s)", err=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress(total: int, desc: str, verbose: bool = False):
    """A bar on a terminal; elsewhere, with ``verbose``, periodic plain lines; else nothing."""
    from tqdm import tqdm

    if not sys.stderr.isatty() and verbose:
        return _Lines(total, desc)
    return tqdm(
        total=total,
        desc=desc,
        unit="px",
        unit_scale=True,
        leave=False,
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
    )


def _label(pairs) -> dict[Path, str]:
    """Progress labels: the input's name, with its place among several ("[2/5] b.png")."""
    n = len(pairs)
    return {src: (f"[{i}/{n}] " if n > 1 else "") + _name(src) for i, (src, _) in enumerate(pairs, 1)}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the target folder, then rename: no partial output, ever. An OSError
    names ``path`` (never the temporary file, which the user did not ask for and which is gone)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".idfzip-", suffix=".tmp")
    except OSError as e:
        why = "not a folder" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        raise OSError(e.errno, f"cannot write into {path.parent}: {why}", str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a new file should follow the umask
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


STDIO = Path("-")  # an input read from stdin, an output written to stdout


def _expand(inputs: tuple[str, ...], recursive: bool, suffixes: set[str]) -> list[str]:
    """The inputs, with each folder replaced by the files under it whose suffix is in ``suffixes`` (sorted)
    when ``recursive``; without it a folder stays, to be reported as one."""
    out = []
    for i in inputs:
        if recursive and i != "-" and os.path.isdir(i):
            found = sorted(p for p in Path(i).rglob("*") if p.suffix.lower() in suffixes and p.is_file())
            if not found:
                raise click.UsageError(f"{i}: no {' or '.join(sorted(suffixes))} files in this folder")
            out += [str(p) for p in found]
        else:
            out.append(i)
    return out


def _targets(
    inputs: list[str], output: str | None, out_dir: str | None, stdout: bool, suffix
) -> list[tuple[Path, Path]]:
    """(input, output) pairs; STDIO for stdin and stdout. stdin goes to stdout unless -o names a file."""
    if output and out_dir:
        raise click.UsageError("give -o/--output or --out-dir, not both")
    if stdout and (out_dir or (output and output != "-")):
        raise click.UsageError("-c/--stdout writes to stdout: it takes neither -o FILE nor --out-dir")
    if (output or stdout) and len(inputs) != 1:
        raise click.UsageError("-o/--output and -c/--stdout need exactly one input; use --out-dir for several")
    if inputs.count("-") > 1:
        raise click.UsageError("stdin ('-') can be read only once")
    pairs = []
    for i in inputs:
        src = Path(i)
        if stdout or output == "-" or (i == "-" and not output):
            if i == "-" and out_dir:
                raise click.UsageError("stdin has no name to put in --out-dir: use -o FILE")
            dst = STDIO
        elif output:
            dst = Path(output)
        else:
            dst = (Path(out_dir) if out_dir else src.parent) / (src.stem + suffix(src))
        pairs.append((src, dst))
    return pairs


def _read(src: Path) -> bytes:
    """The bytes of an input file, or of stdin for '-'; InputFileError / OSError as ``read_input``."""
    if src != STDIO:
        try:
            return read_input(src)
        except FileNotFoundError:
            raise Failure(f"{src}: no such file") from None
    data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise Failure(f"stdin: more than any input idfzip can use ({MAX_INPUT_BYTES} bytes)")
    return data


def _write(dst: Path, data: bytes, force: bool) -> None:
    """All of ``data`` to the file ``dst`` (atomically) or to stdout; never binary data onto a terminal."""
    if dst != STDIO:
        _atomic_write(dst, lambda f: f.write(data))
        return
    if sys.stdout.isatty() and not force:
        raise Failure("stdout is a terminal: redirect it, or give -o FILE (--force writes anyway)")
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _effort(d: dict) -> str:
    """The efforts that write what ``inspect`` found (a file does not record its effort)."""
    if d["layout"] >= 7:
        return "7-9 (adaptation with offsets and output-layer updates; 8-9 only before 2026-12-07)"
    if d["layout"] == 6:
        return "5-9 (adaptation with offsets)"
    if d["adapted_tiles"]:
        return (
            "2-4 (adaptation; 5-6 too before 2026-12-07)"
            if d["version"] >= 4
            else "adapted (written before efforts existed)"
        )
    return "1, or no slot large enough to adapt" if d["version"] >= 5 else "unadapted"


def _name(p: Path, output: bool = False) -> str:
    return ("stdout" if output else "stdin") if p == STDIO else str(p)


def _remove_input(src: Path, rm: bool) -> None:
    if rm and src != STDIO:
        os.unlink(src)


def _encode_for(im: Image.Image, fmt: str) -> bytes | None:
    """The image written as ``fmt``, or None unless reading it back gives the same image (pixels, mode,
    palette, transparency, ICC, EXIF)."""
    from .planes import same_image

    params = {"format": fmt}
    if fmt == "WEBP":
        params.update(lossless=True, quality=100, exact=True)
    for key in ("icc_profile", "exif", "transparency"):
        if key in im.info and fmt in ("PNG", "TIFF", "WEBP"):
            params[key] = im.info[key]
    buf = io.BytesIO()
    tries = [lambda: im.save(buf, **params)]
    if fmt == "PNG" and im.mode == "P":
        tries.append(lambda: buf.write(_indexed_png(im)))
    for write in tries:
        buf.seek(0)
        buf.truncate()
        try:
            write()
            with Image.open(io.BytesIO(buf.getvalue())) as back:
                back.load()
                if same_image(back, im):
                    return buf.getvalue()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    return None


def _indexed_png(im: Image.Image) -> bytes:
    """A P image as an 8-bit indexed PNG with its palette as it is: Pillow's writer cuts the index depth to
    the palette's size (or pads the palette), which changes an image whose indices reach past its palette
    (Pillow reads such files). Transparency goes in tRNS; no other chunks."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    pal = bytes(im.getpalette("RGB") or b"")
    if not 3 <= len(pal) <= 768:
        raise ValueError("no palette for a PLTE chunk")
    w, h = im.size
    raw = im.tobytes()
    rows = b"".join(b"\0" + raw[y * w : (y + 1) * w] for y in range(h))
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)) + chunk(b"PLTE", pal)
    t = im.info.get("transparency")
    if isinstance(t, int):
        out += chunk(b"tRNS", b"\xff" * t + b"\0")
    elif isinstance(t, bytes):
        out += chunk(b"tRNS", t)
    return out + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")


def _image_bytes(im: Image.Image, path: Path) -> bytes:
    """The image as a file of the format ``path``'s suffix names (stdout: PNG, or TIFF for modes PNG lacks),
    checked to read back as the same image; else a Failure that names what the format cannot hold."""
    if path == STDIO:
        fmt = "PNG" if im.mode in PNG_MODES else "TIFF"
    else:
        fmt = LOSSLESS_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise Failure(
            f"{path}: unsupported output format {path.suffix!r} (lossless formats: "
            f"{', '.join(sorted(LOSSLESS_SUFFIXES))})"
        )
    data = _encode_for(im, fmt)
    if data is None:
        others = [s for s, f in ((".png", "PNG"), (".tif", "TIFF")) if f != fmt and _encode_for(im, f) is not None]
        hint = f"use {others[0]}" if others else "no image file format here holds it; use idfzip.decompress in Python"
        what = f"this {im.mode} image"
        for key, name in (("exif", "EXIF"), ("icc_profile", "ICC profile"), ("transparency", "transparency")):
            if key in im.info:  # is that what the format cannot keep?
                bare = im.copy()
                bare.info = {k: v for k, v in im.info.items() if k != key}
                if _encode_for(bare, fmt) is not None:
                    what = f"this {im.mode} image's {name}"
                    break
        raise Failure(f"{_name(path, True)}: a {fmt} file cannot hold {what} exactly ({hint})")
    return data


def _check_target(dst: Path | None, force: bool, src: Path) -> None:
    if dst is None or dst == STDIO:
        return
    if src != STDIO and dst.resolve() == src.resolve():
        raise Failure(f"{dst}: output would overwrite the input")
    if os.path.lexists(dst) and not force:  # a dangling symlink too: writing would replace it
        raise Failure(f"{dst}: already exists (use --force to overwrite)")


def _run_each(pairs, fn, jobs: int | None = 1) -> None:
    """``fn(src, dst)`` for each pair, an ``Error:`` line for each that fails (the others go on), exit status 1
    if any failed. ``jobs`` > 1 (None: one per core): as many inputs at once in worker processes, each of
    cores/jobs threads (or --threads); the files are the same, and each input's messages come in input order."""
    refused, outputs = {}, set()
    for i, (src, dst) in enumerate(pairs):
        if dst is not None:
            key = dst.resolve()
            if key in outputs:
                refused[i] = f"{src}: its output {dst} is also the output of an earlier input; skipped"
            outputs.add(key)
    jobs = min(jobs or _cores(), len(pairs) - len(refused))
    if jobs > 1:
        failed = _in_jobs(pairs, fn, jobs, refused)
    else:
        failed = sum(_one_input(fn, src, dst, refused.get(i)) for i, (src, dst) in enumerate(pairs))
    if failed:
        sys.exit(1)


def _one_input(fn, src: Path, dst: Path | None, refused: str | None = None) -> bool:
    """Run ``fn(src, dst)``; print its error, if any, as one line. Whether it failed."""
    try:
        if refused:
            raise Failure(refused)
        fn(src, dst)
        return False
    except (Failure, IdfzipError) as e:
        msg, name = str(e), _name(src)
        click.echo(f"Error: {msg if msg.startswith(name) else f'{name}: {msg}'}", err=True)
    except OSError as e:
        click.echo(f"Error: {e.filename or _name(src)}: {e.strerror or e}", err=True)
    return True


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _in_jobs(pairs, fn, jobs: int, refused: dict) -> int:
    """The inputs in ``jobs`` worker processes (spawned: nothing of this process's torch state is shared);
    their messages are printed in input order. Ctrl-C stops the workers (no partial outputs: their writes are
    atomic) and is reported by main(). Returns how many failed."""
    import concurrent.futures as cf
    import multiprocessing

    threads = click.get_current_context().find_root().obj.get("threads") or max(1, _cores() // jobs)
    pool = cf.ProcessPoolExecutor(
        jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_job_start, initargs=(threads,)
    )
    failed = 0
    try:
        futures = [None if i in refused else pool.submit(_job, fn, src, dst) for i, (src, dst) in enumerate(pairs)]
        for i, ((src, dst), future) in enumerate(zip(pairs, futures)):
            if future is None:
                failed += _one_input(fn, src, dst, refused[i])
                continue
            bad, out, err = future.result()
            click.echo(out, nl=False)
            click.echo(err, nl=False, err=True)
            failed += bad
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            with contextlib.suppress(OSError):
                proc.terminate()  # SIGTERM: _job_start makes it unwind (an atomic write in progress is removed)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return failed


def _job_start(threads: int) -> None:
    """A worker process of ``-j``: its thread count (torch, when an input needs it, sizes its pool by these);
    Ctrl-C is the parent's to handle, SIGTERM unwinds."""
    import signal

    _torch_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _job_stop)


def _job_stop(*_) -> None:
    raise SystemExit(130)


def _job(fn, src: Path, dst: Path | None) -> tuple[bool, str, str]:
    """One input in a worker: (failed, its stdout text, its stderr text)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        bad = _one_input(fn, src, dst)
    return bad, out.getvalue(), err.getvalue()


def _torch_threads(threads: int) -> None:
    """torch's thread count: set now if torch is loaded, else where it will look when it loads (a file stored
    classically is decoded without loading torch at all)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)


def _set_threads(ctx, _param, threads: int | None) -> None:
    if threads:
        ctx.find_root().ensure_object(dict)["threads"] = threads
        _torch_threads(threads)


def _set_obj(ctx, param, value) -> None:
    if value is not None:
        ctx.ensure_object(dict)[param.name] = value


_SHARED = {
    "threads": click.option(
        "--threads",
        type=click.IntRange(1, 1024),
        default=None,
        expose_value=False,
        callback=_set_threads,
        help="CPU threads (default: all cores).",
    ),
    "model": click.option(
        "--model",
        default=None,
        metavar="NAME_OR_PATH",
        expose_value=False,
        callback=_set_obj,
        help="Model name or .safetensors path, for the images of its kind (RGB, RGBA: default "
        f"{registry.DEFAULT_MODEL}; L, LA: default {registry.GREY_MODEL}); decompress: the file's.",
    ),
    "device": click.option(
        "--device",
        type=click.Choice(["cpu", "cuda"]),
        default=None,
        expose_value=False,
        callback=_set_obj,
        help="Where the networks run (their arithmetic is exact fixed point, so the file does not depend on it). "
        "[default: cpu]",
    ),
}


def _shared(*names: str):
    """The options --threads, --model, --device, accepted before the subcommand and after it alike."""

    def decorate(f):
        for name in reversed(names):
            f = _SHARED[name](f)
        return f

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="idfzip")
@_shared("threads", "model", "device")
@click.pass_context
def cli(ctx):
    """idfzip: lossless image compression with integer discrete flows."""
    ctx.ensure_object(dict)
    ctx.obj.setdefault("model", None)
    ctx.obj.setdefault("device", "cpu")


_FILE_OPTIONS = (
    click.option("-o", "--output", help="Output file, '-' for stdout (one input only)."),
    click.option("--out-dir", type=click.Path(file_okay=False), help="Write outputs into this folder."),
    click.option("-c", "--stdout", "to_stdout", is_flag=True, help="Write to stdout (one input only)."),
    click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs (and write onto a terminal)."),
    click.option("-k", "--keep", is_flag=True, help="Keep the input files (the default)."),
    click.option("--rm", is_flag=True, help="Remove each input once its output is written."),
    click.option("-r", "--recursive", is_flag=True, help="Go into folders given as inputs."),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
    click.option(
        "-j",
        "--jobs",
        type=click.IntRange(1, 256),
        default=None,
        help="Inputs coded at once, each job a process of cores/jobs threads (default: one job per core).",
    ),
)


def _file_options(f):
    """The options compress and decompress share: outputs, stdin/stdout, keeping inputs, folders, quiet, jobs."""
    for option in reversed(_FILE_OPTIONS):
        f = option(f)
    return f


def _check_rm(keep: bool, rm: bool, pairs) -> None:
    if keep and rm:
        raise click.UsageError("give -k/--keep or --rm, not both")
    if rm and any(dst == STDIO for _, dst in pairs):
        raise click.UsageError("--rm needs output files (not stdout)")


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@_file_options
@click.option(
    "--tile",
    type=click.IntRange(1, 1 << 14),
    default=None,
    help=f"Tile side in pixels (a multiple of the model's 2**levels); default {DEFAULT_TILE}, and at efforts 7-9 "
    f"also {LARGE_TILE} (large enough for output updates), the smaller file kept.",
)
@click.option(
    "-e",
    "--effort",
    type=click.IntRange(1, 9),
    default=DEFAULT_EFFORT,
    show_default=True,
    help="1 fastest .. 9 smallest: how hard the encoder fits the model to each image (decoding costs the same).",
)
@click.option(
    "--flow-only",
    is_flag=True,
    help="Code every tile with the model, also where lossless WebP would be smaller (to measure the model).",
)
@click.option("--verify", is_flag=True, help="Decode the result and confirm it is identical before writing it.")
@click.option("-v", "--verbose", is_flag=True, help="Also print the coding method, model NLL and time.")
@_shared("threads", "model", "device")
@click.pass_context
def compress(
    ctx,
    inputs,
    output,
    out_dir,
    to_stdout,
    force,
    keep,
    rm,
    recursive,
    quiet,
    jobs,
    tile,
    effort,
    flow_only,
    verify,
    verbose,
):
    """Compress images to .idfz (INPUT.png -> INPUT.idfz; '-': stdin to stdout)."""
    pairs = _targets(_expand(inputs, recursive, IMAGE_SUFFIXES), output, out_dir, to_stdout, lambda s: ".idfz")
    _check_rm(keep, rm, pairs)
    opts = dict(ctx.obj, force=force, rm=rm, quiet=quiet, tile=tile, effort=effort, flow_only=flow_only)
    opts.update(verify=verify, verbose=verbose, labels=_label(pairs))
    _run_each(pairs, functools.partial(_compress_one, opts), jobs)


def _compress_one(o: dict, src: Path, dst: Path) -> None:
    """compress one input to ``dst``, with the command's options ``o`` (a plain dict: jobs get it pickled)."""
    data = _read(src)
    if data.startswith(MAGIC):
        raise Failure(f"{_name(src)}: already an .idfz file (decompress it)")
    _check_target(dst, o["force"], src)
    im = decode_image(data, _name(src))
    from . import codec  # after the checks: a bad input is refused without waiting for torch
    from .planes import same_image

    t0 = time.perf_counter()
    with _progress(im.width * im.height, o["labels"][src], o["verbose"]) as bar:
        out, st = codec.compress_with_stats(
            im, o["model"], o["tile"], o["device"], bar.update, o["effort"], o["flow_only"]
        )
    dt = time.perf_counter() - t0
    if o["verify"]:
        back = codec.decompress(out, o["model"], device=o["device"])
        if not same_image(back, im):
            raise Failure(f"{_name(src)}: verification failed: the decoded image differs (please report this)")
    _write(dst, out, o["force"])
    _remove_input(src, o["rm"])
    if o["quiet"]:
        return
    line = f"{_name(src)} -> {_name(dst, True)}: {im.width}x{im.height} {im.mode}, {st.bytes} bytes, {st.bpd:.3f} bpd"
    if o["verbose"]:
        line += f", {st.method}"
        if st.flow_bytes:
            line += f", model NLL {st.nll_bits / st.subpixels:.3f} bpd"
        line += f", {dt:.2f} s"
    if o["verify"]:
        line += ", verified identical"
    if im.format == "JPEG":  # the pixels of a lossy file, kept exactly, are larger than the file was
        line += (
            f" (JPEG input: its decoded pixels are stored losslessly, {st.bytes / len(data):.1f}x the JPEG's "
            f"{len(data)} bytes)"
        )
    click.echo(line, err=True)


def _default_suffix(src: Path) -> str:
    try:
        data = read_input(src)
        mode = inspect(data)["mode"]
    except (IdfzipError, OSError):
        return ".png"
    return ".png" if mode in PNG_MODES else ".tif"


def _idfz(data: bytes, src: Path) -> None:
    if not data.startswith(MAGIC):
        raise Failure(f"{_name(src)}: not an .idfz file" + (" (compress it?)" if _looks_like_image(data) else ""))


def _looks_like_image(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@_file_options
@click.option("-t", "--test", is_flag=True, help="Decode and check each file; write nothing.")
@click.option(
    "--preview",
    type=click.IntRange(1, 16),
    default=None,
    metavar="K",
    help="A quick look 2**K times smaller per side (INPUT.preview-K.png), from the coarse levels only; "
    "approximate (see README).",
)
@click.option("-v", "--verbose", is_flag=True, help="Also print the time taken.")
@_shared("threads", "model", "device")
@click.pass_context
def decompress(
    ctx, inputs, output, out_dir, to_stdout, force, keep, rm, recursive, quiet, jobs, test, preview, verbose
):
    """Decompress .idfz files back to the identical image (INPUT.idfz -> INPUT.png; '-': stdin to stdout).
    The output's format follows its suffix: .png .tif .bmp .webp .ppm (stdout: PNG, or TIFF for modes PNG
    cannot hold)."""
    found = _expand(inputs, recursive, {".idfz"})
    if preview and (test or rm):
        raise click.UsageError("--preview writes a picture of each file: it takes neither -t nor --rm")
    if test:
        if output or out_dir or to_stdout or rm:
            raise click.UsageError("-t/--test writes nothing: it takes no -o, --out-dir, -c or --rm")
        pairs = [(Path(i), None) for i in found]
    elif preview:
        pairs = _targets(found, output, out_dir, to_stdout, lambda s: f".preview-{preview}.png")
    else:
        pairs = _targets(found, output, out_dir, to_stdout, _default_suffix)
    _check_rm(keep, rm, pairs)
    opts = dict(ctx.obj, force=force, rm=rm, quiet=quiet, preview=preview, verbose=verbose, labels=_label(pairs))
    _run_each(pairs, functools.partial(_decompress_one, opts), jobs)


def _decompress_one(o: dict, src: Path, dst: Path | None) -> None:
    """decompress one input to ``dst`` (None: check only), with the command's options ``o``."""
    data = _read(src)
    _idfz(data, src)
    _check_target(dst, o["force"], src)
    from . import codec

    info = inspect(data)
    t0 = time.perf_counter()
    with _progress(info["width"] * info["height"], o["labels"][src], o["verbose"]) as bar:
        im = codec.decompress(data, o["model"], device=o["device"], progress=bar.update, preview=o["preview"] or 0)
    dt = time.perf_counter() - t0
    if dst is not None:
        _write(dst, _image_bytes(im, dst), o["force"])
        _remove_input(src, o["rm"])
    if o["quiet"]:
        return
    line = f"{_name(src)}: OK" if dst is None else f"{_name(src)} -> {_name(dst, True)}"
    line += f", {im.width}x{im.height} {im.mode}" + (f", {dt:.2f} s" if o["verbose"] else "")
    click.echo(line, err=True)


@cli.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file, one per line.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing: only check the structure (exit status).")
@click.option("-v", "--verbose", is_flag=True, help="Also the bytes of each tile stream.")
def info(inputs, as_json, quiet, verbose):
    """Check the structure of .idfz files and show what each holds: size, mode, model, tiles, bytes, bits per
    sub-pixel. A truncated or corrupt file is an error (exit status 1); `decompress -t` also decodes."""
    import json

    from .planes import meta_parts

    shown = [0]

    def one(src: Path, _dst) -> None:
        data = _read(src)
        _idfz(data, src)
        d = inspect(data)  # every declared length checked against the bytes present (docs/FORMAT.md)
        d["metadata"] = meta_parts(Container.from_bytes(data).meta)
        if quiet:
            return
        if as_json:
            click.echo(json.dumps({"file": _name(src), **d}))
            return
        rest = d["rest"]
        lines = [
            f"file:        {_name(src)}",
            f"format:      .idfz version {d['version']}"
            + ("" if d["version"] >= 4 else " (float coding tables: decodes on the kind of machine that wrote it)")
            + (" (split windows)" if d["split_windows"] else ""),
            f"image:       {d['width']}x{d['height']} {d['mode']}",
            f"size:        {d['bytes']} bytes, {d['bpd']:.4f} bits per sub-pixel",
            f"model:       {d['model'] or 'a shipped model not installed here'} (sha256 {d['model_sha256_prefix']}...)"
            if d["model_sha256_prefix"]
            else "model:       none",
        ]
        if d["tiles"]:
            grid = "1 (the whole image)" if d["tiles"] == 1 else f"{d['tiles']} of {d['tile']}x{d['tile']}"
            lines.append(f"tiles:       {grid}, {d['flow_bytes']} bytes by the flow")
            if d["classical_tiles"]:
                n = d["classical_tiles"]
                lines.append(
                    f"WebP tiles:  {n} of {d['tiles']} (coded classically, smaller there), {d['classical_bytes']} bytes"
                )
            if d["adapted_tiles"]:
                how = "4 numbers and per-component offsets" if d["layout"] >= 6 else "4 numbers"
                lines.append(
                    f"adapted:     {d['adapted_tiles']} of {d['tiles']} tiles, {d['adapted_slots']} slots "
                    f"(priors fitted to the image: {how} per slot and channel)"
                )
                if "updated_slots" in d:
                    lines.append(
                        f"updated:     {d['updated_slots']} slots' network output layers; "
                        f"{d['adaptation_bytes']} bytes of fitted parameters in all"
                    )
            lines.append(f"effort:      {_effort(d)}")
            if verbose:
                sizes = [len(t) for t in Container.from_bytes(data).tiles]
                lines.append(f"tile bytes:  {' '.join(map(str, sizes))} (row-major)")
        if rest:
            lines.append(f"other data:  {rest['bytes']} bytes ({REST_METHODS[rest['method']]})")
        if d["meta_bytes"]:
            lines.append(f"metadata:    {d['meta_bytes']} bytes ({', '.join(d['metadata'])})")
        lines.append(f"crc32:       {d['crc32']}")
        click.echo(("\n" if shown[0] else "") + "\n".join(lines))
        shown[0] += 1

    _run_each([(Path(i), None) for i in inputs], one)


@cli.command()
@click.argument("data", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (NAME.safetensors).")
@click.option(
    "--minutes",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Stop after this many minutes (without --config: default 20, or sooner when validation stops improving).",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help='JSON: {"model": {...}, "train": {...}} (docs/MODELS.md). Without it: fine-tune the shipped model.',
)
@click.option("--resume", is_flag=True, help="Continue from the checkpoint OUT.ckpt of an earlier run.")
@click.option(
    "--init-from",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this model file's weights where they fit (a grown config keeps its function).",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Stop after this many steps.")
@click.option("--val-images", type=click.IntRange(1), default=None, help="Hold out this many images for validation.")
@click.option("--no-report", is_flag=True, help="Skip the end report (the held-out files coded with both models).")
@click.option("--device", "train_device", type=click.Choice(["cpu", "cuda"]), default=None, help="Train here.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress, log lines or report: errors and the model's line only.")
@click.option("-v", "--verbose", is_flag=True, help="A log line every 50 steps instead of the progress bar.")
@_shared("threads")
@click.pass_context
def train(
    ctx,
    data,
    out,
    minutes,
    config_path,
    resume,
    init_from,
    steps,
    val_images,
    no_report,
    train_device,
    force,
    quiet,
    verbose,
):
    """Train a model on DATA (folders, images or zips of images) and write OUT, usable at once with --model.

    Without --config it fine-tunes the shipped model for the images' kind (natural for colour, grey when all
    are greyscale), holds a tenth of the files out (named in the log), and ends with what the new model saves
    on them, as whole files, beside the shipped model (and PNG and JPEG-XL when imagecodecs is installed)."""
    import dataclasses

    from . import registry, zoo
    from . import train as training
    from .imagefile import find_images

    device = train_device or ctx.obj["device"]
    out = Path(out)
    if out.suffix != ".safetensors":
        raise click.UsageError("--out must end in .safetensors (the model's name is the file's stem)")
    if out.exists() and not (force or resume):
        raise IdfzipError(f"{out} exists (use --force to overwrite, --resume to continue its run)")
    if quiet and verbose:
        raise click.UsageError("give -q or -v, not both")
    ckpt = Path(str(out) + ".ckpt")
    if resume and not ckpt.is_file():
        raise IdfzipError(f"no checkpoint {ckpt} to resume from")
    try:
        if config_path:
            model_cfg, train_cfg = training.load_config(config_path)
        else:
            model_cfg, train_cfg, start = training.auto_config(find_images(data))
            init_from = init_from or str(start)
        over = {"steps": steps, "minutes": minutes, "val_images": val_images}
        over = {k: v for k, v in over.items() if v is not None}
        train_cfg = dataclasses.replace(train_cfg, **over)
    except ValueError as e:
        raise IdfzipError(str(e)) from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise IdfzipError("--device cuda: no CUDA device is available")
    helper = os.environ.get("RANK", "0") != "0"  # under torchrun, process 0 alone reports
    log = (lambda line: None) if quiet else lambda line: _tqdm_write(line)
    bar = _TrainBar(train_cfg, disable=helper or quiet or verbose)
    try:
        training.train(
            model_cfg,
            train_cfg,
            list(data),
            out,
            out.stem,
            resume=ckpt if resume else None,
            device=device,
            init_from=init_from,
            log=log,
            # no terminal (or -v): a log line every 50 steps; -q: neither
            progress=None if bar is None else bar,
        )
    except (ValueError, OSError) as e:
        raise IdfzipError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    if helper:
        return
    if not out.exists():
        raise IdfzipError("training ended before its first validation: no model written")
    m = zoo.load(str(out))
    click.echo(f"{out}: {m.flow.num_parameters()} parameters, validation {m.metadata.get('val_bpd', '?')} bpd")
    if no_report or quiet:
        return
    from . import bench

    held = training.split_holdout(find_images(data), train_cfg.val_images, train_cfg.holdout)[1]
    before = zoo.load(init_from if init_from and not config_path else registry.default_model(model_cfg.channels))
    click.echo(f"coding the {len(held)} held-out files with {m.name} and {before.name} ...", err=True)
    try:
        text, _ = bench.saving_report(held, m, before, device=device)
    except IdfzipError as e:
        raise IdfzipError(f"report: {e}") from None
    click.echo(text)


def _tqdm_write(line: str) -> None:
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


class _TrainBar:
    """The progress bar of ``train``: steps, or with a time limit, minutes; the running training bpd and the
    last and best validation bpd. Called as train's ``progress``; None where there is no terminal."""

    def __new__(cls, tc, disable: bool):
        if disable or not sys.stderr.isatty():
            return None
        return super().__new__(cls)

    def __init__(self, tc, disable: bool):
        import time

        from tqdm import tqdm

        self.timed = bool(tc.minutes)
        total = round(tc.minutes * 60) if self.timed else tc.steps
        unit = "s" if self.timed else "step"
        self.bar = tqdm(total=total, desc="train", unit=unit, file=sys.stderr, dynamic_ncols=True)
        self.start, self.clock = time.time(), time.time
        self.val = self.best = None

    def __call__(self, step: int, bpd: float | None, val: float | None) -> None:
        if val is not None:
            self.val, self.best = val, val if self.best is None else min(self.best, val)
        self.bar.n = min(self.bar.total, round(self.clock() - self.start)) if self.timed else step
        text = f"step {step}" + (f", train {bpd:.4f}" if bpd is not None else "")
        if self.val is not None:
            text += f", validation {self.val:.4f} (best {self.best:.4f}) bpd"
        self.bar.set_postfix_str(text, refresh=False)
        if step % 10 == 0 or val is not None or bpd is None:
            self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option(
    "--compare",
    default="png,webp,jpeg2000,jpegls,jpegxl",
    show_default=True,
    help="Baseline codecs, comma-separated ('' or none: no baselines; jpegxl9: JPEG-XL at effort 9, slow).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the full results as JSON here.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="Write a PNG chart here (needs matplotlib).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N images, in sorted order.")
@click.option(
    "--process",
    type=click.IntRange(0),
    default=3,
    show_default=True,
    help="Also time the first N images as whole 'idfzip compress' / 'decompress' processes (0: none).",
)
@click.option(
    "-e", "--effort", type=click.IntRange(1, 9), default=DEFAULT_EFFORT, show_default=True, help="idfzip's effort."
)
@click.option(
    "--flow-only", is_flag=True, help="idfzip codes every tile with the model, never WebP (measures the model)."
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(1, 256),
    default=None,
    help="Images measured at once, each job a process of cores/jobs threads (default: one job per core; "
    "each image's times are then its own job's).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar: the table (and errors) only.")
@click.option("-v", "--verbose", is_flag=True, help="Also a line per image as it is done.")
@_shared("threads", "model", "device")
@click.pass_context
def bench(ctx, paths, compare, json_path, plot_path, limit, process, effort, flow_only, jobs, quiet, verbose):
    """Bits per sub-pixel and speed of idfzip beside classical codecs, on PATHS (folders, images, zips)."""
    import json

    from tqdm import tqdm

    from . import bench as bm
    from . import zoo
    from .imagefile import find_images

    names = [c.strip().lower() for c in compare.split(",") if c.strip() and c.strip().lower() != "none"]
    unknown = [c for c in names if c not in bm.CODECS]
    if unknown:
        raise click.UsageError(f"unknown codec {unknown[0]!r} in --compare (known: {', '.join(bm.CODECS)})")
    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise IdfzipError("--plot needs matplotlib: pip install idfzip[bench]") from None
    sources = find_images(paths)[:limit]
    if not sources:
        raise IdfzipError("no images found in " + ", ".join(paths))
    model = zoo.with_device(zoo.load(ctx.obj["model"]), ctx.obj["device"])
    bar = tqdm(total=len(sources), desc="bench", unit="img", file=sys.stderr, disable=quiet or None, leave=False)

    def progress(i: dict | None) -> None:
        bar.update()
        if verbose and i is not None:  # -v: a line per image as it is done
            bar.write(
                f"{i['file']}: {i['bpd']:.3f} bpd, encode {i['encode_s']:.2f} s, decode {i['decode_s']:.2f} s"
                + ("" if i["exact"] else ", NOT EXACT"),
                file=sys.stderr,
            )

    with bar:
        jobs = min(jobs or _cores(), len(sources))
        threads = ctx.obj.get("threads") or max(1, _cores() // jobs)
        res = bm.run(sources, model, names, ctx.obj["device"], progress, process, effort, flow_only, jobs, threads)
    if not res.images:
        raise IdfzipError("no image could be benchmarked (" + "; ".join(res.skipped_images.values()) + ")")
    click.echo(res.table())
    if json_path:
        text = json.dumps(res.to_json(), indent=1)
        _atomic_write(Path(json_path), lambda f: f.write(text.encode()))
    if plot_path:
        path = Path(plot_path)
        _atomic_write(path, lambda f: bm.plot(res, f))
    if not (res.ours.exact and res.process.exact) or not all(t.exact for t in res.baselines.values()):
        raise IdfzipError("a codec did not reproduce the image exactly (see the table)")


@cli.group("models", invoke_without_command=True)
@click.option("-q", "--quiet", is_flag=True, help="Names only, one per line.")
@click.option("-v", "--verbose", is_flag=True, help="Also each model's architecture and training step.")
@click.pass_context
def models_cmd(ctx, quiet, verbose):
    """List the shipped models (* the defaults) and the installed ones, and what each is for; 'models add FILE'
    installs a model file in the model store ($IDFZIP_MODELS), so that files written with it decode without
    --model."""
    if ctx.invoked_subcommand:
        return
    mine = registry.installed()
    if quiet:
        click.echo("\n".join(registry.available() + mine))
        return
    rows = [("model", "sha256", "parameters", "for", "file")]
    for name in registry.available():
        path = registry.shipped(name)
        d = registry.describe(path)
        mark = "*" if name in (registry.DEFAULT_MODEL, registry.GREY_MODEL) else ""
        use = registry.PURPOSES.get(name, "")
        rows.append((name + mark, d["sha256"][:16], f"{d['parameters']:,}", use, str(path)))
    for name in mine:
        path = registry.installed_path(name)
        try:
            d = registry.describe(path)
        except ModelNotFoundError:
            continue
        rows.append((name, d["sha256"][:16], f"{d['parameters']:,}", "installed", str(path)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
        if verbose and r is not rows[0]:
            meta = registry.describe(Path(r[4]))["metadata"]
            click.echo(
                f"    config {meta.get('config', '?')}; step {meta.get('step', '?')}, validation "
                f"{meta.get('val_bpd', '?')} bpd"
            )
    click.echo(
        f"* the defaults ({registry.GREY_MODEL} for L and LA images); another with --model NAME (or a .safetensors"
        f" file: --model PATH); installed models: {registry.store_dir()} ('idfzip models add FILE')"
    )


@models_cmd.command("add")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-f", "--force", is_flag=True, help="Replace an installed model of the same name (its files then fail).")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def models_add(file, force, quiet):
    """Install the model FILE (NAME.safetensors, as 'idfzip train' writes it) in the model store under NAME:
    'compress --model NAME' then uses it, and files written with it decode without --model."""
    import shutil
    import tempfile

    from . import zoo

    src = Path(file)
    if not src.is_file():
        raise IdfzipError(f"{file}: no such model file")
    name = src.stem if src.suffix == ".safetensors" else src.name
    if not registry.valid_name(name):
        raise IdfzipError(f"{file}: a model's name (its file's stem) may hold letters, digits, '-', '_' and '.'")
    if name in registry.available():
        raise IdfzipError(f"{file}: a shipped model is called {name!r}: rename the file to install it")
    model = zoo.model_from_bytes(src.read_bytes(), name, str(src))  # a valid idfzip model, or ModelNotFoundError
    sha = model.sha256.hex()
    have = registry.installed_path(name)
    if have is not None:
        old = registry.describe(have)["sha256"]
        if old == sha:
            if not quiet:
                click.echo(f"{name}: already installed ({have}, sha256 {sha[:16]})")
            return
        if not force:
            raise IdfzipError(
                f"another model called {name!r} is installed (sha256 {old[:16]}), and the files written with it "
                "need it: rename this file, or --force to replace it"
            )
    store = registry.store_dir()
    store.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, store / f"{name}.safetensors")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not quiet:
        click.echo(
            f"{name}: installed in {store} (sha256 {sha[:16]}, {model.flow.num_parameters():,} parameters); "
            f"use it with --model {name}"
        )


def _interrupted() -> None:
    """Ctrl-C: one line and exit status 130. ``os._exit``, because a Ctrl-C that lands in an ``exec`` of source
    text (dataclasses, namedtuples: many while torch imports) makes CPython end the process by SIGINT after
    any ``sys.exit``; partial outputs are already gone (:func:`_atomic_write`)."""
    click.echo("Error: interrupted", err=True)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(130)


def main() -> None:
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, KeyboardInterrupt):  # click turns Ctrl-C into Abort (after a blank line)
            _interrupted()
        click.echo("Error: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()} (see --help)", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except IdfzipError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # outside the per-input loop (bench's --json and --plot): the file and the reason
        click.echo(f"Error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as e:  # never a traceback for the user; IDFZIP_DEBUG=1 shows it
        if os.environ.get("IDFZIP_DEBUG"):
            raise
        click.echo(f"Error: internal error: {type(e).__name__}: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
