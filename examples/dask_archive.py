"""Compress a folder of images on a dask.distributed cluster: one task per image, the model loaded once per
worker process, the files checked by decoding them where they were made.

    pip install "idfzip[dask]"
    python examples/dask_archive.py PHOTOS/ ARCHIVE/                         # a local cluster, one worker per core
    python examples/dask_archive.py PHOTOS/ ARCHIVE/ --scheduler tcp://HOST:8786   # a cluster already running

Every worker must see PHOTOS/ and ARCHIVE/ at the same paths (a shared file system) and have idfzip installed;
a model given by path must be readable there too (or installed on each worker with ``idfzip models add``).
Use one Dask thread per worker process (``--nthreads 1``) and let the plugin give torch the worker's cores:
the encoder's exact arithmetic is the same on any thread count, so the files are those of ``idfzip
compress``, byte for byte. ARCHIVE/ gets NAME.idfz for every image PHOTOS/.../NAME.EXT, keeping sub-folders.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from dask.distributed import Client, LocalCluster, WorkerPlugin

SUFFIXES = {".png", ".tif", ".tiff", ".bmp", ".ppm", ".pgm", ".webp", ".jpg", ".jpeg"}


class TorchThreads(WorkerPlugin):
    """Each worker process runs torch on ``threads`` threads (None: torch's default, every core)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads

    def setup(self, worker):
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)


def compress_one(src: str, dst: str, model: str | None = None, effort: int = 5, verify: bool = True) -> dict:
    """Compress the image ``src`` to ``dst`` (written whole or not at all); with ``verify``, decode the bytes
    first and refuse them unless they give back the identical image."""
    import numpy as np
    from PIL import Image

    import idfzip

    with Image.open(src) as im:
        im.load()
        data, stats = idfzip.compress_with_stats(im, model, effort=effort)
        if verify:
            back = idfzip.decompress(data, model)
            same = back.mode == im.mode and back.size == im.size and np.array_equal(np.asarray(back), np.asarray(im))
            if not same:
                raise RuntimeError(f"{src}: the decoded image differs")
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{dst}.part-{os.getpid()}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, dst)
    return {"file": src, "output": dst, "bytes": len(data), "bpd": stats.bpd}


def compress_folder(
    client: Client, src_dir: str, out_dir: str, model: str | None = None, effort: int = 5
) -> list[dict]:
    """Every image under ``src_dir`` to ``out_dir`` on the cluster of ``client``; one record per image, in
    sorted order. A failed image raises its error here (the other files are written)."""
    srcs = sorted(p for p in Path(src_dir).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    dsts = [str(Path(out_dir) / p.relative_to(src_dir).with_suffix(".idfz")) for p in srcs]
    futures = client.map(compress_one, [str(p) for p in srcs], dsts, model=model, effort=effort, pure=False)
    return client.gather(futures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--scheduler", help="address of a running scheduler (default: a local cluster)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="local cluster: worker processes")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores/workers)")
    ap.add_argument("--model", default=None, help="model name or path (default: natural / grey)")
    ap.add_argument("-e", "--effort", type=int, default=5)
    a = ap.parse_args()
    if a.scheduler:
        client = Client(a.scheduler)
        threads = a.threads
    else:
        cluster = LocalCluster(n_workers=a.workers, threads_per_worker=1, processes=True)
        client = Client(cluster)
        threads = a.threads or max(1, (os.cpu_count() or 1) // a.workers)
    client.register_plugin(TorchThreads(threads))
    records = compress_folder(client, a.src_dir, a.out_dir, a.model, a.effort)
    total = sum(r["bytes"] for r in records)
    print(f"{len(records)} images -> {a.out_dir}: {total:,} bytes, every file verified by decoding")
    client.close()


if __name__ == "__main__":
    main()
