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

DEFAULT_TILE, LARGE_TILE = 256, 1024  # = codec's, which needs torch to import; a test checks they agree
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


def _run_each(pairs, fn) -> None:
    failed = 0
    outputs: set[Path] = set()
    for src, dst in pairs:
        try:
            if dst is not None:
                key = dst.resolve()
                if key in outputs:
                    raise Failure(f"{src}: its output {dst} is also the output of an earlier input; skipped")
                outputs.add(key)
            fn(src, dst)
        except (Failure, IdfzipError) as e:
            msg, name = str(e), _name(src)
            click.echo(f"Error: {msg if msg.startswith(name) else f'{name}: {msg}'}", err=True)
            failed += 1
        except OSError as e:
            click.echo(f"Error: {e.filename or _name(src)}: {e.strerror or e}", err=True)
            failed += 1
    if failed:
        sys.exit(1)


def _set_threads(_ctx, _param, threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


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
)


def _file_options(f):
    """The options compress and decompress share: outputs, stdin/stdout, keeping inputs, folders, quiet."""
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
    ctx, inputs, output, out_dir, to_stdout, force, keep, rm, recursive, quiet, tile, effort, flow_only, verify, verbose
):
    """Compress images to .idfz (INPUT.png -> INPUT.idfz; '-': stdin to stdout)."""
    pairs = _targets(_expand(inputs, recursive, IMAGE_SUFFIXES), output, out_dir, to_stdout, lambda s: ".idfz")
    _check_rm(keep, rm, pairs)
    labels = _label(pairs)

    def one(src: Path, dst: Path) -> None:
        data = _read(src)
        if data.startswith(MAGIC):
            raise Failure(f"{_name(src)}: already an .idfz file (decompress it)")
        _check_target(dst, force, src)
        im = decode_image(data, _name(src))
        from . import codec  # after the checks: a bad input is refused without waiting for torch
        from .planes import same_image

        t0 = time.perf_counter()
        with _progress(im.width * im.height, labels[src], verbose) as bar:
            out, st = codec.compress_with_stats(
                im, ctx.obj["model"], tile, ctx.obj["device"], bar.update, effort, flow_only
            )
        dt = time.perf_counter() - t0
        if verify:
            back = codec.decompress(out, ctx.obj["model"], device=ctx.obj["device"])
            if not same_image(back, im):
                raise Failure(f"{_name(src)}: verification failed: the decoded image differs (please report this)")
        _write(dst, out, force)
        _remove_input(src, rm)
        if quiet:
            return
        line = (
            f"{_name(src)} -> {_name(dst, True)}: {im.width}x{im.height} {im.mode}, {st.bytes} bytes, {st.bpd:.3f} bpd"
        )
        if verbose:
            line += f", {st.method}"
            if st.flow_bytes:
                line += f", model NLL {st.nll_bits / st.subpixels:.3f} bpd"
            line += f", {dt:.2f} s"
        if verify:
            line += ", verified identical"
        if im.format == "JPEG":  # the pixels of a lossy file, kept exactly, are larger than the file was
            line += (
                f" (JPEG input: its decoded pixels are stored losslessly, {st.bytes / len(data):.1f}x the JPEG's "
                f"{len(data)} bytes)"
            )
        click.echo(line, err=True)

    _run_each(pairs, one)


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
def decompress(ctx, inputs, output, out_dir, to_stdout, force, keep, rm, recursive, quiet, test, preview, verbose):
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
    labels = _label(pairs)

    def one(src: Path, dst: Path | None) -> None:
        data = _read(src)
        _idfz(data, src)
        _check_target(dst, force, src)
        from . import codec

        info = inspect(data)
        t0 = time.perf_counter()
        with _progress(info["width"] * info["height"], labels[src], verbose) as bar:
            im = codec.decompress(
                data, ctx.obj["model"], device=ctx.obj["device"], progress=bar.update, preview=preview or 0
            )
        dt = time.perf_counter() - t0
        if dst is not None:
            _write(dst, _image_bytes(im, dst), force)
            _remove_input(src, rm)
        if quiet:
            return
        line = f"{_name(src)}: OK" if dst is None else f"{_name(src)} -> {_name(dst, True)}"
        line += f", {im.width}x{im.height} {im.mode}" + (f", {dt:.2f} s" if verbose else "")
        click.echo(line, err=True)

    _run_each(pairs, one)


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
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSON: {"model": {...}, "train": {...}} (see docs/MODELS.md).',
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Model file to write (NAME.safetensors).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint OUT.ckpt of an earlier run.")
@click.option(
    "--init-from",
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this model file's weights where they fit (a grown config keeps its function).",
)
@click.option("--steps", type=click.IntRange(1), default=None, help="Override the config's step count.")
@click.option("--minutes", type=click.FloatRange(0), default=None, help="Stop after this many minutes.")
@click.option("--val-images", type=click.IntRange(1), default=None, help="Override the config's held-out image count.")
@click.option("--device", "train_device", type=click.Choice(["cpu", "cuda"]), default=None, help="Train here.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing OUT.")
@click.option("-q", "--quiet", is_flag=True, help="No progress or log lines: errors and the result only.")
@click.option("-v", "--verbose", is_flag=True, help="Log lines every 50 steps even beside the progress bar.")
@_shared("threads")
@click.pass_context
def train(
    ctx, data, config_path, out, resume, init_from, steps, minutes, val_images, train_device, force, quiet, verbose
):
    """Train a model on DATA (folders, images or zips of images) and write OUT, usable at once with --model."""
    import dataclasses

    from tqdm import tqdm

    from . import train as training
    from . import zoo

    device = train_device or ctx.obj["device"]
    out = Path(out)
    if out.suffix != ".safetensors":
        raise click.UsageError("--out must end in .safetensors (the model's name is the file's stem)")
    if out.exists() and not (force or resume):
        raise IdfzipError(f"{out} exists (use --force to overwrite, --resume to continue its run)")
    ckpt = Path(str(out) + ".ckpt")
    if resume and not ckpt.is_file():
        raise IdfzipError(f"no checkpoint {ckpt} to resume from")
    try:
        model_cfg, train_cfg = training.load_config(config_path)
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
    if quiet and verbose:
        raise click.UsageError("give -q or -v, not both")
    bar = tqdm(
        total=train_cfg.steps,
        desc="train",
        unit="step",
        file=sys.stderr,
        disable=helper or quiet or None,
        dynamic_ncols=True,
    )

    def progress(step: int, bpd: float | None) -> None:
        bar.n = step
        if bpd is not None:
            bar.set_postfix_str(f"{bpd:.4f} bpd", refresh=False)
        if step % 10 == 0 or bpd is None:
            bar.refresh()

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
            log=(lambda line: None) if quiet else lambda line: bar.write(line, file=sys.stderr),
            # no terminal (or -v): a log line every 50 steps; -q: neither
            progress=None if bar.disable or verbose else progress,
        )
    except (ValueError, OSError) as e:
        raise IdfzipError(str(e)) from None
    finally:
        bar.close()
    if helper:
        return
    if not out.exists():
        raise IdfzipError("training ended before its first validation: no model written")
    m = zoo.load(str(out))
    click.echo(f"{out}: {m.flow.num_parameters()} parameters, validation {m.metadata.get('val_bpd', '?')} bpd")


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
@click.option("-q", "--quiet", is_flag=True, help="No progress bar: the table (and errors) only.")
@click.option("-v", "--verbose", is_flag=True, help="Also a line per image as it is done.")
@_shared("threads", "model", "device")
@click.pass_context
def bench(ctx, paths, compare, json_path, plot_path, limit, process, effort, flow_only, quiet, verbose):
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
        res = bm.run(sources, model, names, ctx.obj["device"], progress, process, effort, flow_only)
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
