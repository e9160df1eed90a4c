"""A large test photo for speed and memory checks: the Kodak images (landscape; portrait ones turned a quarter
turn) tiled row-major, cyclically, over a W x H canvas, cut at its edges.

    python scripts/mosaic.py ../shared/data/kodak 6000 4000 big24.png
"""

import sys
from pathlib import Path

from PIL import Image


def main(folder: str, width: int, height: int, out: str) -> None:
    photos = []
    for p in sorted(Path(folder).glob("*.png")):
        im = Image.open(p).convert("RGB")
        photos.append(im if im.width >= im.height else im.transpose(Image.Transpose.ROTATE_90))
    canvas = Image.new("RGB", (width, height))
    i = 0
    for y in range(0, height, photos[0].height):
        for x in range(0, width, photos[0].width):
            canvas.paste(photos[i % len(photos)], (x, y))
            i += 1
    canvas.save(out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
