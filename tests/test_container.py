import pytest

from idfzip.container import MAX_PIXELS, Container, write_varint
from idfzip.errors import CorruptFileError, UnsupportedVersionError


def sample(version=3, name="natural", tile=64, adapted=False):
    c = Container("RGBA", 70, 33, crc32=0xDEADBEEF, model_name=name, model_hash=b"\x01\x02\x03\x04", tile=tile)
    c.tiles = [b"abcd", b"efgh" * 40] if tile else [b"efgh" * 40]
    c.rest_method, c.rest = 0, b"\xff"
    c.meta = b"\x02\x05"
    c.version, c.adapted = version, adapted
    return c


SAMPLES = [
    sample(version=11),
    sample(version=5),
    sample(version=5, name="", tile=0, adapted=True),
    sample(),
    sample(name="", tile=0, adapted=True),
    sample(version=2),
    sample(version=1),
]


@pytest.mark.parametrize("c", SAMPLES)
def test_round_trip(c):
    assert Container.from_bytes(c.to_bytes()) == c


def test_header_is_compact():
    c = Container("RGB", 32, 32, model_name="", model_hash=b"abcd", tile=0, tiles=[b"x" * 1412])
    # magic 3 + version 1 + mode 1 + dims 2 + flags 1 + name length 1 + hash 4 + tile 1 + stream length 2
    # + crc 4
    assert len(c.to_bytes()) - 1412 == 20 and c.tile_side == 32
    c.version = 4  # versions 2-4: the last (here the only) tile stream runs up to the CRC, without a length
    assert len(c.to_bytes()) - 1412 == 18
    c.version = 1  # a shipped model's name, a tile side and a stream length: 10 more bytes
    c.model_name, c.tile = "cifar10", 1024
    assert len(c.to_bytes()) - 1412 == 28


def test_version_1_layout_is_still_read():
    # RGB 32x32, model "n" (hash abcd), tile 32, one stream "wxyz" with its length, then the CRC
    data = b"IDZ\x01\x00\x20\x20\x01" + b"\x01n" + b"abcd" + b"\x20" + b"\x04wxyz" + b"\x01\x02\x03\x04"
    c = Container.from_bytes(data)
    assert (c.version, c.model_name, c.tile, c.tiles, c.crc32) == (1, "n", 32, [b"wxyz"], 0x04030201)
    assert c.to_bytes() == data
    for bad in (data[:8] + b"\x00" + data[9:13] + data[14:], data[:14] + b"\x00" + data[15:]):
        with pytest.raises(CorruptFileError):  # version 1 has neither the empty model name nor tile side 0
            Container.from_bytes(bad)


def test_other_modes_are_stored_by_name():
    c = Container("BGR;24", 3, 2, rest_method=2, rest=b"zz")
    assert Container.from_bytes(c.to_bytes()).mode == "BGR;24"


@pytest.mark.parametrize("c", SAMPLES)
def test_every_truncation_is_an_error(c):
    data = c.to_bytes()
    # in versions 2-4 the last tile stream has no length: a cut inside it (or bytes added) gives that stream
    # other bytes, which its decoder and the CRC refuse (tests/test_codec.py), and nothing else; version 5
    # (like version 1) refuses every cut as truncated
    last = len(data) - len(c.tiles[-1]) if 2 <= c.version <= 4 else len(data)
    for n in range(len(data)):
        if n < last:
            with pytest.raises(CorruptFileError, match="truncated" if c.version >= 5 and n >= 4 else None):
                Container.from_bytes(data[:n])
        else:
            assert Container.from_bytes(data[:n]).tiles[-1] != c.tiles[-1]


def test_trailing_bytes_bad_magic_and_version():
    data = sample().to_bytes()
    with pytest.raises(CorruptFileError):
        Container.from_bytes(sample(version=1).to_bytes() + b"\0")
    with pytest.raises(CorruptFileError, match="magic"):
        Container.from_bytes(b"PNG" + data[3:])
    with pytest.raises(UnsupportedVersionError):
        Container.from_bytes(data[:3] + b"\x0e" + data[4:])


def test_adapted_tiles_need_version_3_and_a_flow_part():
    data = bytearray(sample(version=2).to_bytes())
    flags = data.index(b"\x07\x07")  # flags (flow, rest, meta) then the model name's length 7
    data[flags] |= 8
    with pytest.raises(CorruptFileError, match="flags"):  # version 2 has no adaptation
        Container.from_bytes(bytes(data))
    data[3] = 3
    assert Container.from_bytes(bytes(data)).adapted
    rest_only = Container("L", 2, 2, rest_method=0, rest=b"\x00", version=3)
    raw = bytearray(rest_only.to_bytes())
    raw[7] |= 8
    with pytest.raises(CorruptFileError, match="flags"):
        Container.from_bytes(bytes(raw))
    with pytest.raises(ValueError):
        sample(version=2, adapted=True).to_bytes()


@pytest.mark.parametrize("w,h", [(0, 5), (5, 0), (1 << 21, 1), (1 << 15, 1 << 15)])
def test_absurd_dimensions_are_refused_before_allocation(w, h):
    head = b"IDZ\x01\x00" + write_varint(w) + write_varint(h) + b"\x01"
    with pytest.raises(CorruptFileError, match="dimensions"):
        Container.from_bytes(head + b"\0" * 64)
    assert (1 << 15) ** 2 > MAX_PIXELS


def test_one_tile_is_only_for_images_a_tile_can_hold():
    c = Container("RGB", 1 << 14, 8, model_name="", model_hash=b"abcd", tile=0, tiles=[b"wxyz"])
    assert Container.from_bytes(c.to_bytes()).tile_side == 1 << 14
    c.width += 1
    with pytest.raises(CorruptFileError, match="tile size"):
        Container.from_bytes(c.to_bytes())


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


def test_classical_tiles_and_the_webp_rest_need_version_11():
    """Versions 11-13: a tile-method map after the flow header (bit i % 8 of byte i // 8: tile i is a VP8L
    stream), and rest method 3 (WebP); earlier versions have neither, and a writer refuses to write them there."""
    c = sample(version=12, adapted=True)
    c.tile = 16  # a 70 x 33 image of 16-pixel tiles: 5 x 3 tiles, two bytes of map
    c.tiles = [bytes([i]) * 4 for i in range(15)]
    c.classical = [i % 3 == 0 for i in range(15)]
    data = c.to_bytes()
    back = Container.from_bytes(data)
    assert back == c and back.flow_tiles == [t for i, t in enumerate(c.tiles) if i % 3]
    at = data.index(b"\x01\x02\x03\x04") + 5  # the map follows the hash and the tile side
    assert data[at : at + 2] == bytes([0b01001001, 0b00010010])
    bad = bytearray(data)
    bad[at + 1] |= 0x80  # a padding bit (tile 15 does not exist)
    with pytest.raises(CorruptFileError, match="padding"):
        Container.from_bytes(bytes(bad))
    c.version = 9
    with pytest.raises(ValueError, match="version 11"):
        c.to_bytes()
    rest = Container("RGB", 4, 4, rest_method=3, rest=b"/xyz", version=11)
    assert Container.from_bytes(rest.to_bytes()) == rest
    old = bytearray(rest.to_bytes())
    old[3] = 5
    with pytest.raises(CorruptFileError, match="coding method"):
        Container.from_bytes(bytes(old))
    rest.version = 8
    with pytest.raises(ValueError, match="version 11"):
        rest.to_bytes()
