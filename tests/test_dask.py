"""The Dask recipe (examples/dask_archive.py) as written: a folder compressed on a LocalCluster of 2 worker
processes gives files that decode exactly, and the same bytes as the library in this process."""

import importlib.util
from pathlib import Path

import pytest
from conftest import assert_same, photo
from PIL import Image

import idfzip

distributed = pytest.importorskip("dask.distributed")
RECIPE = Path(__file__).resolve().parent.parent / "examples" / "dask_archive.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("dask_archive", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_folder_on_a_local_cluster_of_two_worker_processes(tiny, tmp_path):
    recipe = _recipe()
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    images = {}
    for i in range(4):
        path = src / ("sub" if i % 2 else "") / f"p{i}.png"
        im = Image.fromarray(photo(64 + 8 * i, 48, seed=i))
        if i == 3:
            im = im.convert("L")
        im.save(path)
        images[path.relative_to(src).with_suffix(".idfz")] = im
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.register_plugin(recipe.TorchThreads(1))
        records = recipe.compress_folder(client, str(src), str(tmp_path / "archive"), model=tiny.path, effort=2)
        pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert len(pids) == 2 and len(records) == 4
    for rel, im in images.items():
        data = (tmp_path / "archive" / rel).read_bytes()
        assert_same(im, idfzip.decompress(data, tiny.path))
        assert data == idfzip.compress(im, tiny.path, effort=2)
    assert sorted(r["bytes"] for r in records) == sorted((tmp_path / "archive" / r).stat().st_size for r in images)
