"""Encode time of two efforts, paired: each image of a folder compressed at effort A and at effort B in one
process, alternating which goes first, so a machine's drift falls on both alike. Prints each effort's MB/s of
raw pixels, its bytes, and the time ratio B / A.

    python scripts/time_efforts.py ../shared/data/kodak 1 5
"""

import sys
import time
from pathlib import Path

from PIL import Image

import idfzip


def main(folder: str, a: int, b: int) -> None:
    files = sorted(Path(folder).glob("*.png"))
    idfzip.compress(Image.open(files[0]).crop((0, 0, 64, 64)))  # load the model first
    seconds, size, subpixels = {a: 0.0, b: 0.0}, {a: 0, b: 0}, 0
    for i, f in enumerate(files):
        im = Image.open(f)
        im.load()
        subpixels += im.width * im.height * len(im.getbands())
        for e in (a, b) if i % 2 == 0 else (b, a):
            t = time.perf_counter()
            size[e] += len(idfzip.compress(im, effort=e))
            seconds[e] += time.perf_counter() - t
    for e in (a, b):
        print(f"effort {e}: {subpixels / seconds[e] / 1e6:.3f} MB/s, {size[e]:,} bytes, {seconds[e]:.1f} s")
    print(f"effort {a} encodes {seconds[b] / seconds[a]:.2f}x as fast as effort {b}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
