import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model, photo, roundtrip
from PIL import Image

import idfzip
from idfzip import adapt, codec, flowcode, zoo
from idfzip.container import Container
from idfzip.errors import CorruptFileError, IdfzipError, ModelMismatchError, ModelNotFoundError


@pytest.mark.parametrize("w,h", [(1, 1), (1, 9), (9, 1), (65, 257), (33, 31), (100, 64)])
def test_rgb_sizes(tiny, w, h):
    roundtrip(Image.fromarray(photo(w, h, seed=w * h)), tiny)


def test_flow_is_used_and_its_nll_is_reported(tiny):
    im = Image.fromarray(photo(128, 96))
    data, st = idfzip.compress_with_stats(im, tiny, flow_only=True)
    assert st.method == "flow:tiny"
    assert abs(st.nll_bits - 8 * st.flow_bytes) < 0.02 * 8 * st.flow_bytes + 64
    assert idfzip.decompress(data, tiny).tobytes() == im.tobytes()


def test_bipartite_model_round_trip(tiny_bipartite):
    roundtrip(Image.fromarray(photo(70, 45, seed=3)), tiny_bipartite)


def test_channel_autoregressive_model_round_trip(tiny_ar):
    assert tiny_ar.flow.n_ar == 3
    roundtrip(Image.fromarray(photo(90, 66, seed=8)), tiny_ar, tile=64)


def _modes():
    rng = np.random.default_rng(5)
    g = rng.integers(0, 256, (37, 29), dtype=np.uint8)
    rgb = photo(29, 37)
    yield "1", Image.fromarray(g > 128)
    yield "L", Image.fromarray(g)
    yield "LA", Image.fromarray(np.dstack([g, g[::-1]]), "LA")
    p = Image.fromarray(g % 16).convert("P")
    p.putpalette(list(rng.integers(0, 256, 48)))
    p.info["transparency"] = 3
    yield "P", p
    pa = Image.frombytes("PA", (29, 37), np.dstack([g % 7, g]).tobytes())
    pa.putpalette(list(range(30)))
    yield "PA", pa
    yield "RGB", Image.fromarray(rgb)
    yield "RGBA", Image.fromarray(np.dstack([rgb, g]), "RGBA")
    yield "RGBA-opaque", Image.fromarray(np.dstack([rgb, np.full_like(g, 255)]), "RGBA")
    yield "I;16", Image.frombytes("I;16", (29, 37), rng.integers(0, 65536, (37, 29), dtype="<u2").tobytes())
    yield "I", Image.fromarray(rng.integers(-(2**31), 2**31, (37, 29), dtype=np.int32), "I")
    yield "F", Image.fromarray(rng.normal(size=(37, 29)).astype(np.float32), "F")
    yield "CMYK", Image.fromarray(rgb).convert("CMYK")
    yield "YCbCr", Image.fromarray(rgb).convert("YCbCr")


@pytest.mark.parametrize("name,im", list(_modes()), ids=[n for n, _ in _modes()])
def test_every_mode(tiny, name, im):
    """Each mode round-trips, by the flow and as the product codes it (WebP where smaller); a file without a flow
    part or WebP keeps version 5 (the same layout), so that older readers still read it."""
    data = idfzip.compress(im, tiny, flow_only=True)
    assert Container.from_bytes(data).version == (8 if Container.from_bytes(data).tiles else 5)
    roundtrip(im, tiny)
    roundtrip(im, tiny, flow_only=False)


def test_icc_profile_and_palette_survive(tiny):
    im = Image.fromarray(photo(20, 20))
    im.info["icc_profile"] = b"fake icc profile bytes"
    back = idfzip.decompress(idfzip.compress(im, tiny), tiny)
    assert back.info["icc_profile"] == im.info["icc_profile"]


def test_numpy_input(tiny):
    a = photo(40, 24)
    back = idfzip.decompress(idfzip.compress(a, tiny), tiny)
    assert np.array_equal(np.asarray(back), a)


def test_thin_rgb_images_never_cost_much_more_than_png(tiny):
    im = Image.fromarray(photo(1, 3000, seed=1))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    data = roundtrip(im, tiny)
    assert len(data) <= len(buf.getvalue()) + 32


def test_constant_alpha_costs_almost_nothing(tiny):
    rgb = photo(128, 128)
    a = idfzip.compress(Image.fromarray(rgb), tiny, flow_only=True)
    b = idfzip.compress(Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])), tiny, flow_only=True)
    assert len(b) - len(a) <= 4


def test_rest_never_costs_more_than_png(tiny):
    g = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    im = Image.fromarray(g)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    assert len(idfzip.compress(im, tiny)) <= len(buf.getvalue()) + 16


SAMPLE = Path(__file__).resolve().parent.parent / "examples" / "sample.png"


def test_grey_images_go_through_a_one_channel_model(tiny, tmp_path):
    """L and the L of LA are coded by a 1-channel model: one given, else the shipped grey model (also where a
    3-channel model was given, which RGB images keep), and decode exactly; a decoder given a model of the
    other kind uses the file's."""
    path = tmp_path / "mygrey.safetensors"  # the shipped weights under another name: a user's model
    path.write_bytes(Path(zoo.load("grey").path).read_bytes())
    mine = zoo.load(str(path))
    grey = Image.open(SAMPLE).convert("L").crop((0, 0, 192, 128))  # a photo: the flow beats PNG and LZMA
    la = grey.copy()
    la.putalpha(Image.linear_gradient("L").resize(grey.size))
    for im in (grey, la):
        data, stats = codec.compress_with_stats(im, mine, flow_only=True)
        assert stats.method == "flow:mygrey" and stats.flow_bytes and stats.model_sha256 == mine.sha256
        assert idfzip.decompress(data, mine).tobytes() == im.tobytes()
        assert idfzip.decompress(data, mine).mode == im.mode
        with pytest.raises(ModelNotFoundError, match="mygrey"):
            idfzip.decompress(data, tiny)  # a model of the other kind: the file's, which is not shipped
    data, stats = codec.compress_with_stats(la, tiny, flow_only=True)
    shipped = zoo.load("grey")
    assert stats.method == "flow:grey" and stats.model_sha256 == shipped.sha256
    roundtrip(la, tiny)
    rgb = Image.fromarray(photo(96, 80, seed=5))
    assert codec.compress_with_stats(rgb, tiny, flow_only=True)[1].method == "flow:tiny"
    assert codec.compress_with_stats(rgb, mine, flow_only=True)[1].method == "flow:natural"
    # a file whose mode claims a grey image where a 3-channel model coded the colour part
    c = Container.from_bytes(idfzip.compress(rgb, flow_only=True))
    c.mode = "L"
    with pytest.raises(CorruptFileError, match="mode L cannot have a flow-coded part of 3 channels"):
        idfzip.decompress(c.to_bytes())


def test_output_updates_weigh_a_slot_by_its_positions(monkeypatch):
    """Effort 8 fits output updates in slots of at least adapt.DELTA_MIN_SYMBOLS * C / 3 symbols: as many
    positions for a grey image as for an RGB one, since a 1-channel slot's updates hold a third of the values."""
    im = Image.open(SAMPLE)  # 384 x 256: level 0's slots have 192 x 128 positions, level 1's a quarter
    calls = []

    def fit_delta(segments, feats, C, K, *plan):
        calls.append(C)
        return np.zeros((C, 3 * K, feats.shape[0]), dtype=np.int64)  # no updates

    monkeypatch.setattr(adapt, "fit_delta", fit_delta)
    monkeypatch.setattr(adapt, "DELTA_MIN_SYMBOLS", 192 * 128 * 3)
    files = {}
    for mode, C in (("RGB", 3), ("L", 1)):
        calls.clear()
        files[mode] = idfzip.compress(im.convert(mode), effort=8, tile=1024)
        assert calls == [C] * 3, mode  # level 0's three slots, for either kind
    calls.clear()  # the default: tiles of 256 (level 0's slots too small) and then of 1024, the smaller kept
    data = idfzip.compress(im.convert("RGB"), effort=8)
    assert calls == [3] * 3 and len(data) <= len(files["RGB"])


@pytest.mark.parametrize("w,h,tile", [(90, 66, 64), (5, 3, 1024), (131, 40, 1024)])
def test_checkerboard_context_round_trip(tiny_cb, w, h, tile):
    roundtrip(Image.fromarray(photo(w, h, seed=w)), tiny_cb, tile=tile)


def test_checkerboard_codes_what_training_measures(tmp_path):
    """The coder's ideal code length equals the training path's NLL (so both use the same contexts), for the
    shipped model as a checkerboard one whose second pass really uses the anchors (grown if need be)."""
    from idfzip.flows import HierarchicalIDF
    from idfzip.train import warm_start
    from idfzip.zoo import load, save_model

    base = load("natural")
    flow = HierarchicalIDF(dataclasses.replace(base.flow.config, context="checkerboard"))
    warm_start(flow, base.path)
    if base.flow.config.context != "checkerboard":  # make the grown second pass depend on the anchors
        torch.manual_seed(0)
        with torch.no_grad():
            for net in (n for level in flow.priors for n in level):
                net.linear.weight[:, -4:].normal_(0, 0.01)
    save_model(flow, tmp_path / "cb.safetensors", "cb")
    model = load(str(tmp_path / "cb.safetensors"))
    # a crop of the shipped sample photo: synthetic images are full of tail events for a photo model, where
    # the coder's fixed-point networks and the float training path differ by more than on photos
    a = np.ascontiguousarray(np.asarray(Image.open(SAMPLE).convert("RGB"))[:64, :96])
    data, stats = idfzip.codec.compress_with_stats(Image.fromarray(a), model, effort=1, flow_only=True)
    with torch.no_grad():
        bits = float(model.flow(torch.from_numpy(a).permute(2, 0, 1)[None].float()))
    assert stats.method == "flow:cb"
    assert all(float(n.linear.weight[:, -4:].detach().abs().max()) > 0 for level in flow.priors for n in level)
    assert stats.nll_bits == pytest.approx(bits, rel=2e-3)
    assert idfzip.decompress(data, model).tobytes() == Image.fromarray(a).tobytes()


def test_a_shipped_model_is_named_by_its_hash(tiny):
    im = Image.fromarray(photo(96, 64, seed=6))
    data = idfzip.compress(im, "natural", flow_only=True)
    c = Container.from_bytes(data)
    assert c.version in (8, 9) and (c.model_name, c.tile, len(c.tiles)) == ("", 0, 1)  # one tile: side 0
    assert idfzip.inspect(data)["model"] == "natural" and idfzip.inspect(data)["tile"] == 96
    assert idfzip.decompress(data).tobytes() == im.tobytes()  # found by its hash
    with pytest.raises(ModelMismatchError, match="with model 'natural' "):  # named by its hash
        idfzip.decompress(data, tiny)
    c.model_hash = bytes(b ^ 0xFF for b in c.model_hash)
    with pytest.raises(ModelNotFoundError, match="does not have"):
        idfzip.decompress(c.to_bytes())
    with pytest.raises(ModelMismatchError, match="written with a shipped model"):  # a hash not shipped here
        idfzip.decompress(c.to_bytes(), tiny)
    # older versions: tests/test_golden.py decodes files that earlier builds wrote
    # a model that is not shipped is named; an image larger than a tile records the tile side
    c = Container.from_bytes(idfzip.compress(im, tiny, tile=64, flow_only=True))
    assert (c.model_name, c.tile, len(c.tiles)) == ("tiny", 64, 2)


@pytest.mark.parametrize("tile", [32, 64, 96])
def test_tiles_grouped_differently(tiny, tile):
    """The same image in different tilings decodes exactly; each file records its tiling."""
    im = Image.fromarray(photo(150, 70, seed=9))
    data = roundtrip(im, tiny, tile=tile)
    assert idfzip.inspect(data)["tiles"] == -(-150 // tile) * -(-70 // tile)


@pytest.mark.parametrize("enc,dec", [(2, 1), (1, 2)])
def test_thread_count_does_not_change_the_bits(tiny_ar, enc, dec):
    """Large enough that torch splits the network arithmetic across threads when it is allowed to (the coding
    tables are integer arithmetic, the same on any number of threads)."""
    im = Image.fromarray(photo(256, 128, seed=4))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(enc)
        data = idfzip.compress(im, tiny_ar, tile=128, flow_only=True)
        torch.set_num_threads(dec)
        assert idfzip.compress(im, tiny_ar, tile=128, flow_only=True) == data
        assert idfzip.decompress(data, tiny_ar).tobytes() == im.tobytes()
    finally:
        torch.set_num_threads(n)


def test_tile_size_must_suit_the_model(tiny):
    with pytest.raises(IdfzipError, match="multiple"):
        idfzip.compress(photo(10, 10), tiny, tile=30)  # an IdfzipError: one line in the CLI


def test_wrong_model_is_refused(tiny, tmp_path):
    other = make_model(tmp_path, "other", prior_hidden=6)
    data = idfzip.compress(photo(80, 80), tiny, flow_only=True)
    with pytest.raises(ModelMismatchError):
        idfzip.decompress(data, other)


def test_corruption_is_an_error_never_wrong_pixels(tiny):
    im = Image.fromarray(photo(96, 64, seed=2))
    data = idfzip.compress(im, tiny, flow_only=True)
    rng = np.random.default_rng(0)
    for trial in range(40):
        bad = bytearray(data)
        pos = int(rng.integers(0, len(bad)))
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            out = idfzip.decompress(bytes(bad), tiny)
        except (CorruptFileError, ModelMismatchError):
            continue
        assert out.tobytes() == im.tobytes()  # a flip that changed nothing decodable must still be exact
    # cuts anywhere, in the last tile stream (its length is implicit) included, and bytes added at the end
    for bad in [data[:n] for n in (0, 3, 10, len(data) // 2, *range(len(data) - 12, len(data)))] + [data + b"\0"]:
        with pytest.raises(CorruptFileError):
            idfzip.decompress(bad, tiny)


def test_a_model_never_calibrated_writes_version_4(tmp_path, monkeypatch):
    """Its networks run in the float64 mode (an older model file, or one saved without calibration), at every
    effort; a calibrated model's files are version 8."""
    raw = make_model(tmp_path, "raw", calibrated=False)
    assert not raw.flow.integer
    im = Image.fromarray(photo(96, 72, seed=2))
    c = Container.from_bytes(roundtrip(im, raw))
    assert c.tiles and c.version == 4
    # version 4 has only the 4-number adaptation: the higher efforts fit just that, with their finer search
    fine = flowcode.FitPlan(adapt.FIT_SYMBOLS, gain=adapt.FINE_GAIN, coarse=adapt.FINE_COARSE_STEPS)
    for effort in (7, 8):
        data = idfzip.compress(im, raw, effort=effort)
        assert Container.from_bytes(data).version == 4
        assert idfzip.decompress(data, raw).tobytes() == im.tobytes()
        with monkeypatch.context() as m:
            m.setattr(flowcode, "fit_plan", lambda effort: fine)
            assert idfzip.compress(im, raw) == data


def _graphic(w: int, h: int) -> Image.Image:
    """A synthetic render: flat colour, text, a horizontal and a vertical gradient, bars."""
    from PIL import ImageDraw

    a = np.full((h, w, 3), (246, 246, 250), dtype=np.uint8)
    a[h // 2 :, :, 0] = np.linspace(40, 220, w).astype(np.uint8)[None]
    a[h // 2 :, :, 1] = np.linspace(200, 60, h - h // 2).astype(np.uint8)[:, None]
    im = Image.fromarray(a)
    d = ImageDraw.Draw(im)
    for i in range(h // 40):
        d.text((8, 6 + 16 * i), f"row {i}: 3.031 bpd against 2.885 ({i * 37 % 100}%)", fill=(20, 20, 30))
    for i in range(5):
        d.rectangle((w // 2 + 20 * i, h // 2 - 10 - 9 * i, w // 2 + 20 * i + 12, h // 2 - 4), fill=(200, 30 * i, 40))
    return im


def test_a_synthetic_render_is_at_most_its_webp_size():
    """Flat colour, text and gradients: at most Pillow's lossless WebP (method 6, the default quality and the
    slowest), whether the flow or WebP codes its tiles, and exact."""
    im = _graphic(320, 200)
    webp = []
    for quality in (80, 100):
        buf = io.BytesIO()
        im.save(buf, "WEBP", lossless=True, method=6, quality=quality)
        webp.append(len(buf.getvalue()))
    for tile in (1024, 128):
        data = idfzip.compress(im, tile=tile)
        assert len(data) <= min(webp), (tile, len(data), webp)
        assert idfzip.decompress(data).tobytes() == im.tobytes()
    flow_only = idfzip.compress(im, flow_only=True)
    assert len(flow_only) > 2 * min(webp)  # what the flow alone would cost (a check that WebP is what saves)


def test_a_file_with_a_webp_tile_and_a_flow_tile_round_trips():
    """tests/golden/mixed.png: a smooth field with noise (the flow's) beside a graphic (WebP's), tile 128: one
    tile each way (format version 12: the flow's tile with offsets), exact; its preview and info say so."""
    im = Image.open(Path(__file__).parent / "golden" / "mixed.png")
    data, stats = codec.compress_with_stats(im, tile=128)
    c = Container.from_bytes(data)
    assert c.version == 12 and c.classical == [False, True] and stats.classical_tiles == 1 and stats.tiles == 2
    assert "1 of 2 tiles WebP" in stats.method
    assert idfzip.decompress(data).tobytes() == im.tobytes()
    info = idfzip.inspect(data)
    assert info["classical_tiles"] == 1 and info["classical_bytes"] == len(c.tiles[1]) < info["flow_bytes"]
    small = idfzip.decompress(data, preview=2)
    assert small.size == (64, 32)
    want = np.asarray(im.reduce(4)).astype(int)
    assert np.abs(np.asarray(small).astype(int) - want)[:, 32:].max() == 0  # the WebP half: exact, box-averaged
    assert np.abs(np.asarray(small).astype(int) - want)[:, :32].mean() < 8


def test_a_bad_webp_tile_is_an_error_never_wrong_pixels():
    data = (Path(__file__).parent / "golden" / "mixed.idfz").read_bytes()
    c = Container.from_bytes(data)
    vp8l = c.tiles[1]
    other = idfzip.planes.encode_vp8l(Image.new("RGB", (128, 64), (1, 2, 3)))
    for bad in (vp8l[: len(vp8l) // 2], other, b"\x2f" + bytes(8), vp8l[:1] + bytes([vp8l[1] ^ 1]) + vp8l[2:]):
        c.tiles[1] = bad
        with pytest.raises(CorruptFileError):
            idfzip.decompress(c.to_bytes())
    c.tiles[1], c.classical = vp8l, [True, False]  # the map swapped: the flow's stream read as WebP
    with pytest.raises(CorruptFileError):
        idfzip.decompress(c.to_bytes())


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_every_colour_mode_round_trips_through_webp(tiny, mode):
    """A graphic's tiles go to WebP (the tiny random model's for RGB, the shipped grey model's for L): tiles of 32
    (version 11 with a tile-method map) or the whole image (rest method 3, with its alpha); both exact."""
    im = _graphic(96, 80)
    if mode in ("RGBA", "LA"):
        im.putalpha(Image.fromarray(np.tile(np.arange(96, dtype=np.uint8) * 2, (80, 1))))
    im = im.convert(mode)
    for tile in (32, 1024):
        data = roundtrip(im, tiny, tile=tile, flow_only=False)
        c = Container.from_bytes(data)
        assert c.version == 11 and (any(c.classical) or c.rest_method == 3)
