"""Encode and decode times of two efforts, paired: each image of a folder compressed at effort A and at effort
B in one process, and each file decoded, alternating which goes first, so a machine's drift falls on both
alike. Prints each effort's encode and decode MB/s of raw pixels, its bytes, and the time ratios B / A.

    python scripts/time_efforts.py ../shared/data/kodak 1 5      # effort 1 against the default
    python scripts/time_efforts.py ../shared/data/kodak 5 9 8    # effort 9's decode cost, first 8 images
"""

import sys
import time
from pathlib import Path

from PIL import Image

import idfzip


def main(folder: str, a: int, b: int, limit: int = 0) -> None:
    files = sorted(Path(folder).glob("*.png"))[: limit or None]
    idfzip.compress(Image.open(files[0]).crop((0, 0, 64, 64)))  # load the model first
    enc, dec = {a: 0.0, b: 0.0}, {a: 0.0, b: 0.0}
    size, subpixels = {a: 0, b: 0}, 0
    for i, f in enumerate(files):
        im = Image.open(f)
        im.load()
        subpixels += im.width * im.height * len(im.getbands())
        order = (a, b) if i % 2 == 0 else (b, a)
        data = {}
        for e in order:
            t = time.perf_counter()
            data[e] = idfzip.compress(im, effort=e)
            enc[e] += time.perf_counter() - t
            size[e] += len(data[e])
        for e in order:
            t = time.perf_counter()
            assert idfzip.decompress(data[e]).tobytes() == im.tobytes()
            dec[e] += time.perf_counter() - t
    for e in (a, b):
        print(
            f"effort {e}: encode {subpixels / enc[e] / 1e6:.3f} MB/s, decode {subpixels / dec[e] / 1e6:.3f} MB/s, "
            f"{size[e]:,} bytes, {enc[e]:.1f} s / {dec[e]:.1f} s"
        )
    print(
        f"effort {a} encodes {enc[b] / enc[a]:.2f}x as fast as effort {b}; decoding effort {b}'s files takes "
        f"{dec[b] / dec[a]:.3f}x effort {a}'s time"
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 0)
