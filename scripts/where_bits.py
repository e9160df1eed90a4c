"""Where a model's bits go on one image: the encoder's exact code length per level and slot (the coder's own
``Encoder.bits`` after each segment), for the smoothest, the middle and the busiest full tile of an image (by
mean absolute horizontal difference), at the given efforts, beside lossless WebP (method 6) and, when imagecodecs
is installed, JPEG-XL effort 9 of the same tile.

    python scripts/where_bits.py IMAGE [--model NAME] [--tile 256] [--efforts 1,5]

Prints one line per tile and effort: bits per sub-pixel in all, then per level l and slot j ("L0s2") and the
top ("L5"). Level 0 is the finest. The figures exclude the container and adaptation block (a few hundred bytes at
most per tile).
"""

import argparse
import io

import numpy as np
import torch
from PIL import Image

from idfzip import codec, flowcode, zoo
from idfzip.coding import Encoder
from idfzip.container import FLOW_VERSION, split_windows


def tiles_by_activity(a: np.ndarray, side: int) -> list[tuple[float, int, int]]:
    """(mean |horizontal difference|, y, x) of every full side x side tile of a, smoothest first."""
    h, w = a.shape[:2]
    out = []
    for y in range(0, h - side + 1, side):
        for x in range(0, w - side + 1, side):
            out.append((float(np.abs(np.diff(a[y : y + side, x : x + side].astype(np.int16), axis=1)).mean()), y, x))
    return sorted(out)


@torch.no_grad()
def bits_per_slot(model, pixels: np.ndarray, effort: int) -> dict[str, float]:
    """The exact code length in bits of each level's slots ("L0s1") and of the top ("L5") of one tile, coded as
    the encoder codes it at ``effort`` (its adaptation fitted, without its block's bytes)."""
    flow, plan = model.flow, flowcode.fit_plan(effort)
    H, W = (-(-n // flow.multiple) * flow.multiple for n in pixels.shape[:2])
    tile = flowcode._Tile(flow, H, W, "cpu", FLOW_VERSION, {}, {}, False)
    tile.encode(pixels)
    enc, fitted, out = Encoder(split=split_windows(FLOW_VERSION)), set(), {}
    for seg in reversed(flowcode.schedule(flow)):
        top = seg.level == flow.config.levels
        if plan.symbols and not top and (seg.level, seg.slot) not in fitted:
            fitted.add((seg.level, seg.slot))
            tile.fit(seg.level, seg.slot, plan)
        before = enc.bits
        enc.push(tile.symbols(seg), tile.mixture(seg))
        key = f"L{seg.level}" + ("" if top else f"s{seg.slot}")
        out[key] = out.get(key, 0.0) + enc.bits - before
    return out


def classical_bytes(pixels: np.ndarray) -> dict[str, int]:
    buf = io.BytesIO()
    codec.colour_image(pixels).save(buf, "WEBP", lossless=True, method=6)
    out = {"WebP": len(buf.getvalue())}
    try:
        import imagecodecs

        out["JPEG-XL e9"] = len(imagecodecs.jpegxl_encode(pixels, lossless=True, effort=9, numthreads=1))
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--model", default=None, help="default: the shipped model for the image's kind")
    ap.add_argument("--tile", type=int, default=codec.DEFAULT_TILE)
    ap.add_argument("--efforts", default="1,5")
    args = ap.parse_args()
    model = zoo.load(args.model or zoo.default_model(3))
    C = model.flow.config.channels
    a = np.atleast_3d(np.asarray(Image.open(args.image).convert("RGB" if C == 3 else "L")))
    ranked = tiles_by_activity(a, args.tile)
    if not ranked:
        raise SystemExit(f"the image has no full {args.tile}x{args.tile} tile")
    for name, (act, y, x) in zip(("smoothest", "middle", "busiest"), (ranked[0], ranked[len(ranked) // 2], ranked[-1])):
        px = np.ascontiguousarray(a[y : y + args.tile, x : x + args.tile])
        n = px.size
        others = ", ".join(f"{k} {8 * v / n:.3f}" for k, v in classical_bytes(px).items())
        for effort in map(int, args.efforts.split(",")):
            per = bits_per_slot(model, px, effort)
            parts = " ".join(f"{k}:{v / n:.3f}" for k, v in sorted(per.items()))
            print(
                f"{name} tile y={y} x={x} (|dx| {act:.2f}), effort {effort}: {sum(per.values()) / n:.3f} bpd "
                f"({others}); {parts}"
            )


if __name__ == "__main__":
    main()
