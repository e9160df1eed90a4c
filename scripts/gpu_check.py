"""GPU <-> CPU exactness of .idfz files: run on a machine with a CUDA GPU.

    python scripts/gpu_check.py OUT_DIR [IMAGES ...]     (default images: the golden PNGs and up to 4 Kodak)

It compresses each image on the GPU (`device="cuda"`) and on the CPU, requires the two files to be
byte-identical, decodes each on the other device, and decodes the committed golden files (written on a CPU)
on the GPU. The GPU's files are written to OUT_DIR (with a report, gpu_check.json) so that they can also be
decoded on another CPU: `python scripts/gpu_check.py --decode OUT_DIR`. Exit status 0 only when everything
is exact. The device machines lack constriction: install its wheel there first (pip download
"constriction>=0.5,<0.6" on a machine with internet, carry the wheel).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

import idfzip

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
KODAK = ROOT.parent / "shared" / "data" / "kodak"


def check(out: Path, images: list[Path]) -> dict:
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "files": [], "golden": []}
    for path in images:
        im = Image.open(path)
        t = time.perf_counter()
        gpu = idfzip.compress(im, "natural", device="cuda")
        t_gpu = time.perf_counter() - t
        cpu = idfzip.compress(im, "natural")
        row = {
            "image": path.name,
            "bytes": len(gpu),
            "same_bytes_as_cpu": gpu == cpu,
            "gpu_file_on_cpu": idfzip.decompress(gpu).tobytes() == im.tobytes(),
            "cpu_file_on_gpu": idfzip.decompress(cpu, device="cuda").tobytes() == im.tobytes(),
            "gpu_encode_s": round(t_gpu, 3),
        }
        (out / f"{path.stem}.gpu.idfz").write_bytes(gpu)
        report["files"].append(row)
        print(row, flush=True)
    for path in sorted(GOLDEN.glob("*.idfz")):
        src = GOLDEN / f"{path.stem.split('_v')[0]}.png"  # rgb_v4.idfz and rgb.idfz both hold rgb.png
        ok = idfzip.decompress(path.read_bytes(), device="cuda").tobytes() == Image.open(src).tobytes()
        report["golden"].append({"file": path.name, "exact_on_gpu": ok})
        print(path.name, ok, flush=True)
    files = all(r["same_bytes_as_cpu"] and r["gpu_file_on_cpu"] and r["cpu_file_on_gpu"] for r in report["files"])
    golden = all(g["exact_on_gpu"] for g in report["golden"] if not g["file"].startswith("legacy"))
    report["ok"] = files and golden
    return report


def decode_here(out: Path) -> bool:
    """Decode the GPU's files on this machine (a CPU) against the sources named in the report."""
    report = json.loads((out / "gpu_check.json").read_text())
    ok = True
    for row in report["files"]:
        src = next(p for p in [GOLDEN / row["image"], KODAK / row["image"]] if p.exists())
        same = idfzip.decompress((out / f"{Path(row['image']).stem}.gpu.idfz").read_bytes()).tobytes()
        ok &= same == Image.open(src).tobytes()
        print(row["image"], same == Image.open(src).tobytes())
    return ok


if __name__ == "__main__":
    if sys.argv[1:2] == ["--decode"]:
        sys.exit(0 if decode_here(Path(sys.argv[2])) else 1)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    images = [Path(p) for p in sys.argv[2:]] or [GOLDEN / f"{n}.png" for n in ("rgb", "rgba", "tiled")] + sorted(
        KODAK.glob("kodim0[1-4].png")
    )
    report = check(out, images)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print("all exact" if report["ok"] else "MISMATCH")
    sys.exit(0 if report["ok"] else 1)
