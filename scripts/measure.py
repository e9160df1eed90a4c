"""Measure a model on a folder of images: whole-file bpd, model NLL, encode and decode seconds, exactness.

    python scripts/measure.py ../shared/data/kodak [--model natural] [--limit N] [--threads 2]

bpd = file bytes x 8 / (width x height x channels), totals are sums over images. Every image is decoded and
compared with the original. (The full benchmark against classical codecs is a separate command.)
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import idfzip
from idfzip.imagefile import open_image
from idfzip.planes import same_image
from idfzip.zoo import load

SUFFIXES = {".png", ".webp", ".bmp", ".tif", ".tiff", ".ppm"}

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--model", default=None)
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--decode-threads", type=int, default=0, help="decode with this many threads (default: same)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    model = load(a.model)
    files = sorted(p for p in Path(a.folder).rglob("*") if p.suffix.lower() in SUFFIXES)
    if a.limit:
        files = files[: a.limit]
    tot = {"bytes": 0, "sub": 0, "nll": 0.0, "enc": 0.0, "dec": 0.0}
    bad = 0
    print(
        f"model {model.name} sha256 {model.sha256.hex()[:16]}, encode threads {torch.get_num_threads()}, "
        f"decode threads {a.decode_threads or torch.get_num_threads()}"
    )
    print(f"{'image':<16}{'size':>11}{'bytes':>10}{'bpd':>8}{'nll bpd':>9}{'enc s':>8}{'dec s':>8}")
    for f in files:
        im = open_image(f)
        t0 = time.perf_counter()
        data, st = idfzip.compress_with_stats(im, model)
        enc_threads = torch.get_num_threads()
        if a.decode_threads:
            torch.set_num_threads(a.decode_threads)
        t1 = time.perf_counter()
        back = idfzip.decompress(data, model)
        t2 = time.perf_counter()
        torch.set_num_threads(enc_threads)
        ok = same_image(im, back)
        bad += not ok
        tot["bytes"] += st.bytes
        tot["sub"] += st.subpixels
        tot["nll"] += st.nll_bits
        tot["enc"] += t1 - t0
        tot["dec"] += t2 - t1
        print(
            f"{f.name:<16}{im.width:>5}x{im.height:<5}{st.bytes:>10}{st.bpd:>8.3f}{st.nll_bits / st.subpixels:>9.3f}"
            f"{t1 - t0:>8.2f}{t2 - t1:>8.2f}{'' if ok else '  MISMATCH'}",
            flush=True,
        )
    n = max(1, len(files))
    print(
        f"total: {len(files)} images, {tot['bytes']} bytes, {8 * tot['bytes'] / tot['sub']:.4f} bpd, "
        f"model NLL {tot['nll'] / tot['sub']:.4f} bpd (flow part), mean encode {tot['enc'] / n:.2f} s, "
        f"mean decode {tot['dec'] / n:.2f} s, {'all exact' if not bad else f'{bad} MISMATCHES'}"
    )
    sys.exit(1 if bad else 0)
