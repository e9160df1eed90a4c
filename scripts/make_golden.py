"""Write the golden files of the current container version: tests/golden/{rgb,rgba,tiled,rgb_e7}.idfz from the PNGs
beside them, with the shipped `natural` model (tests/test_golden.py decodes them and requires re-encoding to
give the same bytes). Run only when the container version changes; never to make a failing test pass.

The {rgb,rgba,tiled}_v4.idfz files were written the same way by commit 88ca5f9 (version 4, float64
networks) with the shipped model before its calibration. The legacy_v{1,2,3}.idfz files were written by idfzip at commit b7424ea (version 3, the last float-table
build) from legacy.png: v3 as `idfzip.compress(im, "natural")`, v2 and v1 as that build's unadapted stream in
the older layouts."""

from pathlib import Path

from PIL import Image

import idfzip

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
FILES = {"rgb": {}, "rgba": {}, "tiled": {"tile": 32}, "rgb_e7": {"effort": 7}}  # name -> compress options
# rgb_e7.idfz (version 6: adaptation with offsets) is written from rgb.png

if __name__ == "__main__":
    for name, kw in FILES.items():
        data = idfzip.compress(Image.open(GOLDEN / f"{name.split('_')[0]}.png"), "natural", **kw)
        (GOLDEN / f"{name}.idfz").write_bytes(data)
        print(name, len(data), idfzip.inspect(data))
