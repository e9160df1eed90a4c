"""`idfzip bench`: the JSON schema, the totals, baselines verified, and a codec that is missing."""

import json
import zipfile

import pytest
from click.testing import CliRunner
from conftest import photo
from PIL import Image

from idfzip import bench
from idfzip.cli import cli
from idfzip.errors import IdfzipError
from idfzip.imagefile import find_images

SCHEMA = {
    "model": {"name": str, "sha256": str},
    "image": {
        "file": str,
        "width": int,
        "height": int,
        "channels": int,
        "bytes": int,
        "bpd": float,
        "nll_bpd": float,
        "encode_s": float,
        "decode_s": float,
        "exact": bool,
    },
    "total": {
        "images": int,
        "subpixels": int,
        "bytes": int,
        "bpd": float,
        "nll_bpd": float,
        "encode_s": float,
        "decode_s": float,
    },
    "baseline": {"bytes": int, "bpd": float, "encode_s": float, "decode_s": float, "exact": bool},
}


def check(obj: dict, schema: dict) -> None:
    assert set(schema) <= set(obj), set(schema) - set(obj)
    for k, t in schema.items():
        assert isinstance(obj[k], t) and not (t is int and isinstance(obj[k], bool)), (k, obj[k])


@pytest.fixture()
def images(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(photo(80, 64, seed=1)).save(d / "b.png")
    Image.fromarray(photo(40, 24, seed=2)).save(d / "sub" / "a.png")
    Image.fromarray(photo(30, 20, seed=3)).convert("L").save(d / "c.png")
    (d / "notes.txt").write_text("not an image")
    return d


def test_json_schema_and_totals(tiny, images, tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", str(images), "--model", str(tiny.path), "--compare", "png", "--json", str(out), "--limit", "2"]
    r = CliRunner().invoke(cli, [*args, "--process", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "PNG" in r.output and "idfzip" in r.output
    res = json.loads(out.read_text())
    check(res["model"], SCHEMA["model"])
    assert res["model"]["name"] == "tiny" and res["model"]["sha256"] == tiny.sha256.hex()
    assert [im["file"] for im in res["images"]] == [str(images / "b.png"), str(images / "c.png")]  # sorted, limit
    for im in res["images"]:
        check(im, SCHEMA["image"])
        assert im["exact"] and im["bpd"] == pytest.approx(
            8 * im["bytes"] / (im["width"] * im["height"] * im["channels"])
        )
    t = res["total"]
    check(t, SCHEMA["total"])
    assert t["images"] == 2 and t["subpixels"] == 80 * 64 * 3 + 30 * 20
    assert t["bytes"] == sum(im["bytes"] for im in res["images"])
    assert t["bpd"] == pytest.approx(8 * t["bytes"] / t["subpixels"])
    assert set(res["baselines"]) == {"png"}
    check(res["baselines"]["png"], SCHEMA["baseline"])
    assert res["baselines"]["png"]["exact"]
    for im in res["images"]:  # the baselines per image too, adding up to their totals
        check(im["baselines"]["png"], SCHEMA["baseline"])
    assert sum(im["baselines"]["png"]["bytes"] for im in res["images"]) == res["baselines"]["png"]["bytes"]
    # the first image also as whole processes: same file, same image
    p = t["process"]
    assert p["images"] == 1 and p["subpixels"] == 80 * 64 * 3 and p["exact"] and p["encode_s"] > 0 < p["decode_s"]
    assert res["images"][0]["process_exact"] and "process_encode_s" not in res["images"][1]
    assert "as whole processes (first 1 image)" in r.output


def test_zip_and_single_image_inputs(tiny, images, tmp_path):
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.write(images / "b.png", "x/b.png")
        zf.writestr("readme.md", "no")
    found = find_images([tmp_path / "z.zip", images / "c.png"])
    assert [s.name for s in found] == [f"{tmp_path / 'z.zip'}/x/b.png", str(images / "c.png")]
    res = bench.run(found, tiny, compare=[])
    assert len(res.images) == 2 and res.ours.exact and res.baselines == {}


def test_missing_codec_is_skipped_not_a_crash(tiny, images, monkeypatch, tmp_path):
    real = bench.baseline

    def fake(name):
        if name == "jpegxl":
            raise ImportError("no module named imagecodecs", name="imagecodecs")
        if name == "jpegls":
            raise RuntimeError("library built without CharLS")
        return real(name)

    monkeypatch.setattr(bench, "baseline", fake)
    out = tmp_path / "r.json"
    args = ["bench", str(images / "b.png"), "--model", str(tiny.path), "--compare", "png,jpegls,jpegxl", "--json", out]
    args += ["--process", "0"]
    r = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "skipped jpegxl: not installed" in r.output and "skipped jpegls" in r.output
    res = json.loads(out.read_text())
    assert set(res["baselines"]) == {"png"} and set(res["skipped"]["codecs"]) == {"jpegls", "jpegxl"}


def test_every_available_baseline_is_exact(tiny, images):
    res = bench.run(find_images([images]), tiny, compare=bench.CODECS)
    assert len(res.images) == 3
    assert res.baselines, "no baseline ran at all"
    for name, t in res.baselines.items():
        assert t.exact and t.bytes > 0, name
    assert set(res.baselines) | set(res.skipped) == set(bench.CODECS)


def test_plot_writes_a_png(tiny, images, tmp_path):
    pytest.importorskip("matplotlib")
    res = bench.run(find_images([images / "b.png"]), tiny, compare=["png"])
    bench.plot(res, str(tmp_path / "p.png"))
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.width > 300


def test_bad_arguments(tiny, tmp_path):
    (tmp_path / "empty").mkdir()
    runner = CliRunner()
    with pytest.raises(IdfzipError, match="no images"):
        runner.invoke(
            cli, ["bench", str(tmp_path / "empty"), "--model", str(tiny.path), "--process", "0"], catch_exceptions=False
        )
    r = runner.invoke(cli, ["bench", str(tmp_path), "--compare", "gif"])
    assert r.exit_code != 0 and "unknown codec" in r.output


def test_effort_reaches_the_codec_and_the_whole_processes(tiny, tmp_path):
    """bench -e 7: the in-process files are effort 7's (version 9, adapted), the whole-process compress gets the
    same effort (its file must be the same bytes), and the JSON and table say so."""
    import idfzip

    src = tmp_path / "p.png"
    Image.fromarray(photo(128, 96, seed=6)).save(src)
    out = tmp_path / "r.json"
    args = ["bench", str(src), "--model", tiny.path, "--compare", "none", "--json", str(out), "-e", "7", "--flow-only"]
    r = CliRunner().invoke(cli, [*args, "--process", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    data = idfzip.compress(Image.open(src), tiny, effort=7, flow_only=True)
    assert idfzip.inspect(data)["version"] == 9
    assert res["effort"] == 7 and res["images"][0]["bytes"] == len(data) and res["images"][0]["process_exact"]
    assert "effort 7, flow only" in r.output and res["flow_only"] and res["paths"]["webp_tiles"] == 0


def test_the_summary_says_which_path_coded_the_pixels(tiny, tmp_path):
    """idfzip's row is the product: a graphic the tiny model codes worse than WebP is stored whole classically,
    a photo crop flow-only is its tiles by the flow; the JSON and the table count both."""
    from PIL import ImageDraw

    g = Image.new("RGB", (160, 96), (240, 240, 248))
    ImageDraw.Draw(g).text((8, 8), "a chart, flat colour and text", fill=(10, 10, 10))
    g.save(tmp_path / "g.png")
    res = bench.run(find_images([tmp_path]), tiny, compare=())
    assert res.paths == {"flow_tiles": 0, "webp_tiles": 0, "whole_images": 1}
    assert "0 tiles by the flow, 0 as WebP; 1 image stored whole classically" in res.table()
    Image.fromarray(photo(96, 80)).save(tmp_path / "p.png")
    res = bench.run(find_images([tmp_path / "p.png"]), tiny, compare=(), flow_only=True)
    assert res.paths == {"flow_tiles": 1, "webp_tiles": 0, "whole_images": 0} and res.images[0]["tiles"] == 1


def test_jobs_measure_the_same_files(tiny, images, tmp_path):
    """-j 2: the images in two worker processes give the same bytes, records and order as -j 1."""
    res = {}
    for j in (1, 2):
        out = tmp_path / f"r{j}.json"
        args = ["bench", str(images), "--model", str(tiny.path), "--compare", "png", "--json", str(out)]
        r = CliRunner().invoke(cli, [*args, "--process", "1", "-j", str(j)], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert ("2 jobs of 1 thread" in r.output) == (j == 2)
        res[j] = json.loads(out.read_text())
    strip = ("encode_s", "decode_s", "process_encode_s", "process_decode_s", "baselines")
    assert [{k: v for k, v in im.items() if k not in strip} for im in res[1]["images"]] == [
        {k: v for k, v in im.items() if k not in strip} for im in res[2]["images"]
    ]
    assert res[1]["total"]["bytes"] == res[2]["total"]["bytes"] and res[2]["total"]["process"]["exact"]
    assert res[2]["jobs"] == 2 and res[2]["threads_per_job"] == 1
