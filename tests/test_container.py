import pytest

from idfzip.container import MAX_PIXELS, Container, write_varint
from idfzip.errors import CorruptFileError, UnsupportedVersionError


def sample():
    c = Container("RGBA", 70, 33, crc32=0xDEADBEEF, model_name="natural", model_hash=b"\x01\x02\x03\x04", tile=64)
    c.tiles = [b"abcd", b"efgh" * 40]
    c.rest_method, c.rest = 0, b"\xff"
    c.meta = b"\x02\x05"
    return c


def test_round_trip():
    c = sample()
    d = Container.from_bytes(c.to_bytes())
    assert d == c


def test_header_is_compact():
    c = Container("RGB", 32, 32, model_name="cifar10", model_hash=b"abcd", tile=32, tiles=[b"x" * 8])
    # magic 3 + version 1 + mode 1 + dims 2 + flags 1 + name 8 + hash 4 + tile 1 + length 1 + crc 4
    assert len(c.to_bytes()) - 8 == 26


def test_other_modes_are_stored_by_name():
    c = Container("BGR;24", 3, 2, rest_method=2, rest=b"zz")
    assert Container.from_bytes(c.to_bytes()).mode == "BGR;24"


def test_every_truncation_is_an_error():
    data = sample().to_bytes()
    for n in range(len(data)):
        with pytest.raises(CorruptFileError):
            Container.from_bytes(data[:n])


def test_trailing_bytes_bad_magic_and_version():
    data = sample().to_bytes()
    with pytest.raises(CorruptFileError):
        Container.from_bytes(data + b"\0")
    with pytest.raises(CorruptFileError, match="magic"):
        Container.from_bytes(b"PNG" + data[3:])
    with pytest.raises(UnsupportedVersionError):
        Container.from_bytes(data[:3] + b"\x09" + data[4:])


@pytest.mark.parametrize("w,h", [(0, 5), (5, 0), (1 << 21, 1), (1 << 15, 1 << 15)])
def test_absurd_dimensions_are_refused_before_allocation(w, h):
    head = b"IDZ\x01\x00" + write_varint(w) + write_varint(h) + b"\x01"
    with pytest.raises(CorruptFileError, match="dimensions"):
        Container.from_bytes(head + b"\0" * 64)
    assert (1 << 15) ** 2 > MAX_PIXELS


def test_tile_count_larger_than_the_file_is_refused():
    # 2**14 x 2**14 image with tile 1 claims 2**28 tiles in a few bytes
    head = b"IDZ\x01\x00" + write_varint(1 << 14) + write_varint(1 << 14) + b"\x01" + b"\x01n" + b"abcd" + b"\x01"
    with pytest.raises(CorruptFileError, match="truncated"):
        Container.from_bytes(head + b"\0" * 100)


def test_non_canonical_encodings_are_refused():
    good = Container("L", 3, 2, rest_method=2, rest=b"zz").to_bytes()
    assert Container.from_bytes(good).width == 3
    with pytest.raises(CorruptFileError, match="non-minimal"):
        Container.from_bytes(good[:5] + b"\x83\x00" + good[6:])  # width 3 written in two bytes
    with pytest.raises(CorruptFileError, match="mode"):
        Container.from_bytes(good[:4] + b"\xff\x01L" + good[5:])  # a mode with a code, spelt out
