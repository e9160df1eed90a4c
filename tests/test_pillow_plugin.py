"""The Pillow plugin: every mode the command line supports, through Image.open / Image.save alone."""

import io

import pytest
from conftest import assert_same
from PIL import Image
from test_codec import _modes

import idfzip  # importing idfzip registers the format


@pytest.mark.parametrize("name,im", list(_modes()), ids=[n for n, _ in _modes()])
def test_every_mode_through_open_and_save(tiny, tmp_path, name, im):
    path = tmp_path / "x.idfz"
    im.save(path, model=tiny.path)  # the format from the suffix
    assert path.read_bytes()[:3] == b"IDZ"
    with Image.open(path) as back:
        assert back.format == "IDFZ" and back.mode == im.mode and back.size == im.size  # the header alone
        back.load()
        assert_same(im, back)
    buf = io.BytesIO()
    im.save(buf, format="IDFZ", model=tiny.path)
    assert_same(im, Image.open(io.BytesIO(buf.getvalue())))


def test_a_damaged_file_is_an_oserror(tiny, tmp_path):
    im = Image.new("L", (5, 4), 7)
    buf = io.BytesIO()
    im.save(buf, format="IDFZ")
    data = buf.getvalue()
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(data[:-2]))
    bad = bytearray(data)
    bad[-1] ^= 1  # the CRC: found on load
    with Image.open(io.BytesIO(bytes(bad))) as back, pytest.raises(OSError, match="CRC"):
        back.load()
    assert Image.registered_extensions()[".idfz"] == "IDFZ"


def test_effort_as_a_save_parameter(tiny, tmp_path):
    from conftest import photo

    im = Image.fromarray(photo(128, 96, seed=6))
    for effort, version in ((1, 8), (7, 9)):
        path = tmp_path / f"e{effort}.idfz"
        im.save(path, model=tiny.path, effort=effort, flow_only=True)
        assert idfzip.inspect(path.read_bytes())["version"] == version
        assert_same(im, idfzip.decompress(path.read_bytes(), tiny))  # (Image.open knows shipped models only)
