"""Command line: the only place click and tqdm appear. Parses, calls the library, reports one line per error.

Importing this module imports neither torch nor the codec (each command imports what it uses), so
``idfzip --help`` and ``--version`` start at once, and Ctrl-C while torch loads is the one line
``Error: interrupted`` (exit 130) like Ctrl-C anywhere else: no traceback, no partial output. Inputs are read
only from regular files, and an existing output, a dangling symlink included, is kept unless ``--force``.
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
from .container import REST_METHODS, inspect
from .errors import IdfzipError
from .imagefile import open_image, read_input

DEFAULT_TILE = 1024  # = codec.DEFAULT_TILE, which needs torch to import; a test checks they agree
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


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="px",
        unit_scale=True,
        leave=False,
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
    )


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


def _targets(inputs: tuple[str, ...], output: str | None, out_dir: str | None, suffix) -> list[tuple[Path, Path]]:
    if output and len(inputs) != 1:
        raise click.UsageError("-o/--output needs exactly one input; use --out-dir for several")
    if output and out_dir:
        raise click.UsageError("give -o/--output or --out-dir, not both")
    pairs = []
    for i in inputs:
        src = Path(i)
        if output:
            dst = Path(output)
        else:
            dst = (Path(out_dir) if out_dir else src.parent) / (src.stem + suffix(src))
        pairs.append((src, dst))
    return pairs


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
    try:
        im.save(buf, **params)
        with Image.open(io.BytesIO(buf.getvalue())) as back:
            back.load()
            return buf.getvalue() if same_image(back, im) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _save_image(im: Image.Image, path: Path) -> None:
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
        raise Failure(f"{path}: a {fmt} file cannot hold this {im.mode} image exactly ({hint})")
    _atomic_write(path, lambda f: f.write(data))


def _check_target(dst: Path, force: bool, src: Path) -> None:
    if dst.resolve() == src.resolve():
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
            msg = str(e)
            click.echo(f"Error: {msg if msg.startswith(str(src)) else f'{src}: {msg}'}", err=True)
            failed += 1
        except OSError as e:
            click.echo(f"Error: {e.filename or src}: {e.strerror or e}", err=True)
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
        help=f"Model name or .safetensors path (default: {registry.DEFAULT_MODEL}; decompress: the file's).",
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


def _model(ctx):
    from . import zoo

    return zoo.with_device(zoo.load(ctx.obj["model"]), ctx.obj["device"])


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Output file (one input only).")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Write outputs into this folder.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@click.option(
    "--tile",
    type=click.IntRange(1, 1 << 14),
    default=DEFAULT_TILE,
    show_default=True,
    help="Tile side in pixels (a multiple of the model's 2**levels).",
)
@click.option("--verify", is_flag=True, help="Decode the result and confirm it is identical before writing it.")
@click.option("-v", "--verbose", is_flag=True, help="Print size, bits per sub-pixel, model NLL and time.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_shared("threads", "model", "device")
@click.pass_context
def compress(ctx, inputs, output, out_dir, force, tile, verify, verbose, quiet):
    """Compress images to .idfz (INPUT.png -> INPUT.idfz)."""
    state = {"model": None}

    def one(src: Path, dst: Path) -> None:
        _check_target(dst, force, src)
        im = open_image(src)
        from . import codec  # after the checks: a bad input is refused without waiting for torch
        from .planes import same_image

        if im.mode in ("RGB", "RGBA") and state["model"] is None:
            state["model"] = _model(ctx)
        t0 = time.perf_counter()
        with _progress(im.width * im.height, src.name) as bar:
            data, st = codec.compress_with_stats(
                im, state["model"], tile=tile, device=ctx.obj["device"], progress=bar.update
            )
        dt = time.perf_counter() - t0
        if verify:
            back = codec.decompress(data, state["model"], device=ctx.obj["device"])
            if not same_image(back, im):
                raise Failure(f"{src}: verification failed: the decoded image differs (please report this)")
        _atomic_write(dst, lambda f: f.write(data))
        if quiet:
            return
        line = f"{src} -> {dst}: {im.width}x{im.height} {im.mode}, {st.bytes} bytes, {st.bpd:.3f} bpd"
        if verbose:
            line += f", {st.method}"
            if st.flow_bytes:
                line += f", model NLL {st.nll_bits / st.subpixels:.3f} bpd"
            line += f", {dt:.2f} s"
        if verify:
            line += ", verified identical"
        click.echo(line, err=True)

    _run_each(_targets(inputs, output, out_dir, lambda s: ".idfz"), one)


def _default_suffix(src: Path) -> str:
    try:
        data = read_input(src)
        mode = inspect(data)["mode"]
    except (IdfzipError, OSError):
        return ".png"
    return ".png" if mode in PNG_MODES else ".tif"


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Output image (one input only); format from the suffix: .png .tif .bmp .webp .ppm.",
)
@click.option("--out-dir", type=click.Path(file_okay=False), help="Write outputs into this folder.")
@click.option("-f", "--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("-v", "--verbose", is_flag=True, help="Print what was decoded and the time taken.")
@_shared("threads", "model", "device")
@click.pass_context
def decompress(ctx, inputs, output, out_dir, force, verbose):
    """Decompress .idfz files back to the identical image (INPUT.idfz -> INPUT.png)."""

    def one(src: Path, dst: Path) -> None:
        _check_target(dst, force, src)
        data = read_input(src)
        from . import codec, zoo

        info = inspect(data)
        model = None
        if info["model"] is not None:
            m = zoo.load(ctx.obj["model"]) if ctx.obj["model"] else zoo.load_shipped(info["model"])
            model = zoo.with_device(m, ctx.obj["device"])
        t0 = time.perf_counter()
        with _progress(info["width"] * info["height"], src.name) as bar:
            im = codec.decompress(data, model, device=ctx.obj["device"], progress=bar.update)
        dt = time.perf_counter() - t0
        _save_image(im, dst)
        if verbose:
            click.echo(f"{src} -> {dst}: {im.width}x{im.height} {im.mode}, {dt:.2f} s", err=True)

    _run_each(_targets(inputs, output, out_dir, _default_suffix), one)


@cli.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(dir_okay=False))
def info(inputs):
    """Show what an .idfz file holds: size, mode, model, tiles, bytes, bits per sub-pixel."""

    def one(src: Path, _dst) -> None:
        data = read_input(src)
        d = inspect(data)
        rest = d["rest"]
        lines = [
            f"file:        {src}",
            f"format:      .idfz version {d['version']}"
            + ("" if d["version"] >= 4 else " (float coding tables: decodes on the kind of machine that wrote it)"),
            f"image:       {d['width']}x{d['height']} {d['mode']}",
            f"size:        {d['bytes']} bytes, {d['bpd']:.4f} bits per sub-pixel",
            f"model:       {d['model'] or 'a shipped model not installed here'} (sha256 {d['model_sha256_prefix']}...)"
            if d["model_sha256_prefix"]
            else "model:       none",
        ]
        if d["tiles"]:
            grid = "1 (the whole image)" if d["tiles"] == 1 else f"{d['tiles']} of {d['tile']}x{d['tile']}"
            lines.append(f"tiles:       {grid}, {d['flow_bytes']} bytes")
            if d["adapted_tiles"]:
                lines.append(f"adapted:     {d['adapted_tiles']} of {d['tiles']} tiles (priors fitted to the image)")
        if rest:
            lines.append(f"other data:  {rest['bytes']} bytes ({REST_METHODS[rest['method']]})")
        if d["meta_bytes"]:
            lines.append(f"metadata:    {d['meta_bytes']} bytes (palette, transparency, ICC, EXIF)")
        lines.append(f"crc32:       {d['crc32']}")
        click.echo("\n".join(lines))

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
@click.option("--device", "train_device", type=click.Choice(["cpu", "cuda"]), default=None, help="Train here.")
@click.option("-f", "--force", is_flag=True, help="Overwrite an existing OUT.")
@_shared("threads")
@click.pass_context
def train(ctx, data, config_path, out, resume, init_from, steps, minutes, train_device, force):
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
        over = {k: v for k, v in (("steps", steps), ("minutes", minutes)) if v is not None}
        train_cfg = dataclasses.replace(train_cfg, **over)
    except ValueError as e:
        raise IdfzipError(str(e)) from None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise IdfzipError("--device cuda: no CUDA device is available")
    helper = os.environ.get("RANK", "0") != "0"  # under torchrun, process 0 alone reports
    bar = tqdm(
        total=train_cfg.steps, desc="train", unit="step", file=sys.stderr, disable=helper or None, dynamic_ncols=True
    )

    def progress(step: int, bpd: float) -> None:
        bar.n = step
        bar.set_postfix_str(f"{bpd:.4f} bpd", refresh=False)
        if step % 10 == 0:
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
            log=lambda line: bar.write(line, file=sys.stderr),
            progress=None if bar.disable else progress,  # no terminal: a log line every 50 steps instead
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
    default=",".join(("png", "webp", "jpeg2000", "jpegls", "jpegxl")),
    show_default=True,
    help="Baseline codecs, comma-separated ('' or none: no baselines).",
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
@_shared("threads", "model", "device")
@click.pass_context
def bench(ctx, paths, compare, json_path, plot_path, limit, process):
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
    with tqdm(total=len(sources), desc="bench", unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        res = bm.run(sources, model, names, ctx.obj["device"], progress=bar.update, process=process)
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


@cli.command("models")
def models_cmd():
    """List the shipped models."""
    for name in registry.available():
        path = registry.shipped(name)
        d = registry.describe(path)
        click.echo(f"{name}\t{d['sha256'][:16]}\t{d['parameters']} parameters\t{path}")


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
