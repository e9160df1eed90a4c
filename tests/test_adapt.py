"""Per-tile prior adaptation: the fit, the block layout, and files with and without it (flow only: WebP would
win these tiles from the tiny random models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import photo
from make_golden import updates_kept  # scripts/, on the path through conftest
from PIL import Image

import idfzip
from idfzip import adapt
from idfzip.container import Container, write_varint
from idfzip.errors import CorruptFileError


def test_fit_finds_a_known_miscalibration():
    """Symbols twice as spread and 25% further from the mean than the prior says: the fit finds a log-scale
    change of ln 2 (44/64) where the log-scales are (1.5 on average: a * 1.5 + b = 44), mean factor 1.25
    (d = 16/64), and little change of the scale slope."""
    K, n = 2, 200_000
    g = torch.Generator().manual_seed(0)
    log_s = torch.rand(n, generator=g) * 3.0
    mu = torch.randn(n, generator=g) * 20.0
    u = torch.rand(n, generator=g).clamp(1e-6, 1 - 1e-6)
    z = torch.round(1.25 * mu + 2.0 * torch.exp(log_s) * torch.log(u / (1 - u)))
    raw = torch.stack([torch.zeros(n), torch.full((n,), -30.0), mu, mu, log_s, log_s]).double()[None]
    p, saved = adapt.fit([raw], [z.view(1, 1, n)], K)
    a, b, d, _ = p.tolist()
    assert abs(a) <= 6 and abs(1.5 * a + b - 44) <= 4 and abs(d - 16) <= 2
    assert saved > 0.2 * n * 2**16  # about a third of a bit per symbol (in units of 2**-16 bits)


def test_zero_parameters_change_nothing():
    raw = torch.randn(1, 9, 4, 4, dtype=torch.float64)
    assert adapt.apply(raw, torch.zeros(4, dtype=torch.long), 3) is raw
    out = adapt.apply(raw, torch.tensor([64, 32, -32, 0]), 3)
    assert torch.equal(out[:, :3], raw[:, :3])
    assert torch.equal(out[:, 3:6], raw[:, 3:6] * 0.5) and torch.equal(out[:, 6:], raw[:, 6:] * 2.0 + 0.5)


def test_block_layout():
    p = {(0, 1): torch.arange(12).view(3, 4) - 6, (2, 2): torch.full((3, 4), -5)}
    data = adapt.to_bytes(p, 3)
    assert data[:2] == bytes([0b10000010, 0b10]) and len(data) == 2 + 2 * 12  # bits 1 and 8: a 2-byte varint
    back, deltas, n = adapt.from_bytes(data + b"rest", 3, 3)
    assert n == len(data) and set(back) == set(p) and all(torch.equal(back[k], p[k]) for k in p) and deltas == {}
    assert adapt.from_bytes(b"\0abcd", 3, 3) == ({}, {}, 1)
    for bad in (b"", b"\x80\x10", data[:-1], b"\x80\x00"):  # nothing, a level past 3, cut, non-minimal
        with pytest.raises(CorruptFileError):
            adapt.from_bytes(bad, 3, 3)


def test_adaptation_saves_bytes_and_decodes_exactly(tiny_ar):
    im = Image.fromarray(photo(96, 64, seed=2))
    plain, st0 = idfzip.codec.compress_with_stats(im, tiny_ar, effort=1, flow_only=True)
    fitted, st1 = idfzip.codec.compress_with_stats(im, tiny_ar, flow_only=True)
    assert not Container.from_bytes(plain).adapted and Container.from_bytes(fitted).adapted
    assert len(fitted) < len(plain) and st1.nll_bits < st0.nll_bits
    for data in (plain, fitted):
        assert idfzip.decompress(data, tiny_ar).tobytes() == im.tobytes()


def test_tiles_with_and_without_adaptation(tiny, monkeypatch):
    """Once one tile is adapted every tile carries a block; an unadapted tile's is its mask, one zero byte."""
    calls = []
    fit_slot = adapt.fit_slot

    def every_other_tile(segments, C, K, *plan, **kw):  # tiny has 2 levels of 3 slots: calls 6i to 6i + 5 are tile i's
        calls.append(1)
        return fit_slot(segments, C, K, *plan, **kw) if (len(calls) - 1) // 6 % 2 == 0 else (None, 0)

    monkeypatch.setattr(adapt, "fit_slot", every_other_tile)
    im = Image.fromarray(photo(192, 192, seed=5))
    data = idfzip.compress(im, tiny, tile=96, flow_only=True)
    c = Container.from_bytes(data)
    masks = [t[0] for t in c.tiles]
    assert c.adapted and len(masks) == 4 and not any(masks[1::2]) and all(masks[0::2])
    assert idfzip.decompress(data, tiny).tobytes() == im.tobytes()


def test_small_slots_are_not_fitted(tiny):
    """A 64x64 tile's level-0 slots hold 3,072 symbols: too few to pay for the parameters, so not fitted."""
    im = Image.fromarray(photo(64, 64, seed=1))
    assert not Container.from_bytes(idfzip.compress(im, tiny, flow_only=True)).adapted
    assert Container.from_bytes(idfzip.compress(Image.fromarray(photo(96, 64, seed=1)), tiny, flow_only=True)).adapted


def test_a_changed_parameter_is_an_error_never_wrong_pixels(tiny):
    im = Image.fromarray(photo(96, 64, seed=3))
    data = idfzip.compress(im, tiny, flow_only=True)
    c = Container.from_bytes(data)
    assert c.adapted and c.tiles[0][0]
    rng = np.random.default_rng(1)
    for _ in range(10):
        block = bytearray(c.tiles[0])
        block[1 + int(rng.integers(0, 12))] ^= 1 << int(rng.integers(0, 8))  # in the first adapted slot
        bad = Container.from_bytes(data)
        bad.tiles = [bytes(block)]
        with pytest.raises(CorruptFileError):
            idfzip.decompress(bad.to_bytes(), tiny)


def test_offsets_and_gains_in_integers():
    """Version 6's 6K extra numbers per channel: x' = floor(x (64 + g) / 64) + o * 2**10 after (a, b, d, t)."""
    from idfzip.priors import adapt_int

    K = 2
    q = np.arange(6 * 5, dtype=np.int64).reshape(6, 5) * 12345 - 99999
    p4 = np.array([3, -7, 5, 2])
    o, g = np.array([1, -2, 3, -4, 5, -6]), np.array([-48, 64, 0, 7, -1, 30])
    base = adapt_int(q, p4[:, None], K)
    out = adapt_int(q, np.concatenate([p4, o, g])[:, None], K)
    assert np.array_equal(out, ((base * (64 + g[:, None])) >> 6) + (o[:, None] << 10))
    assert np.array_equal(adapt_int(q, np.concatenate([p4, 0 * o, 0 * g])[:, None], K), base)


def test_offsets_find_a_shifted_component():
    """Symbols whose mean sits 1.5 above the prior's on one stream: the fit moves that mean, and the stream
    gets cheaper; another stream the prior already fits keeps (nearly) nothing."""
    K, n = 1, 20_000
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(2, n, generator=g) * 10.0
    u = torch.rand(2, n, generator=g).clamp(1e-6, 1 - 1e-6)
    z = torch.round(mu + torch.tensor([[1.5], [0.0]]) + torch.log(u / (1 - u)))
    q = torch.floor(torch.stack([torch.zeros(2, n), mu, torch.zeros(2, n)], 1).double() * 2**16).long().numpy()
    p = np.zeros((2, 4), dtype=np.int64)
    fitted = adapt._offsets(q, z.long().numpy(), p, K)
    o = fitted[:, :3]
    assert abs(o[0, 1] - 96) <= 8 and abs(o[1, 1]) <= 4  # 1.5 = 96/64
    full = np.concatenate([p, fitted], 1)
    assert (adapt._lengths(q, z.long().numpy(), full, K) < adapt._lengths(q, z.long().numpy(), p, K))[0]


def test_output_updates_find_a_feature_s_effect():
    """Symbols whose mean rises by 3 across one hidden feature's range (0..255) on one stream: the fit of the
    output updates finds D = 3 * 2**DELTA_FRAC / 255 (about 6) for that mean and that feature, and the stream
    gets cheaper; the other stream, which the prior already fits, and the other features get (nearly) nothing."""
    K, n, hidden = 1, 40_000, 4
    g = torch.Generator().manual_seed(2)
    f = torch.randint(0, 256, (hidden, n), generator=g, dtype=torch.uint8)
    mu = torch.randn(2, n, generator=g) * 10.0
    u = torch.rand(2, n, generator=g).clamp(1e-6, 1 - 1e-6)
    z = torch.round(mu + torch.stack([3.0 * f[0] / 255, torch.zeros(n)]) + torch.log(u / (1 - u)))
    raws = [torch.stack([torch.zeros(n), mu[c], torch.zeros(n)])[None] for c in range(2)]
    D = adapt.fit_delta([(z[None], raws)], f, 2, K, n)
    assert abs(D[0, 1, 0] - 6) <= 1 and np.abs(D).sum() - abs(D[0, 1, 0]) <= 2
    q, zs, _ = adapt._slot_sample([(z[None], raws)], 2, K, n)
    none = np.zeros((2, 4), dtype=np.int64)
    assert (adapt._lengths(q + adapt.delta_q(D, f), zs, none, K) < adapt._lengths(q, zs, none, K))[0]


@pytest.fixture(scope="module")
def tiled_photo(tiny):
    """A 160x96 photo in tiles of 96 (96x96 and 64x96: both large enough to adapt) and its effort-1 file."""
    im = Image.fromarray(photo(160, 96, seed=3))
    return im, idfzip.compress(im, tiny, tile=96, effort=1, flow_only=True)


@pytest.mark.parametrize("effort", range(1, 10))
def test_every_effort_round_trips(tiny, tiled_photo, effort):
    """Every effort decodes exactly, tiled and (for one effort of each kind) as one tile; effort 1 fits nothing,
    efforts 5-9 write version 9 (their slots are too small for output updates), and no effort writes a larger file
    than effort 1."""
    im, plain = tiled_photo
    data = idfzip.compress(im, tiny, tile=96, effort=effort, flow_only=True)
    c = Container.from_bytes(data)
    assert len(c.tiles) == 2 and c.adapted == (effort > 1) and c.version == (9 if effort >= 5 else 8)
    assert idfzip.decompress(data, tiny).tobytes() == im.tobytes()
    assert len(data) <= len(plain)
    if effort in (1, 2, 5, 7):
        small = im.crop((0, 0, 96, 72))
        assert (
            idfzip.decompress(idfzip.compress(small, tiny, effort=effort, flow_only=True), tiny).tobytes()
            == small.tobytes()
        )


def test_high_effort_is_smaller_with_channel_autoregression(tiny_ar):
    im = Image.fromarray(photo(96, 96, seed=4))
    default, high = idfzip.compress(im, tiny_ar, flow_only=True), idfzip.compress(im, tiny_ar, effort=7, flow_only=True)
    assert Container.from_bytes(high).version == 9 and len(high) < len(default)
    assert idfzip.decompress(high, tiny_ar).tobytes() == im.tobytes()
    with pytest.raises(idfzip.IdfzipError, match="effort must be 1..9"):
        idfzip.compress(im, tiny_ar, effort=10)


def test_output_updates_block_layout():
    """Version 7's block: two masks, the byte count of the rest, the parameters, the Rice-coded output updates;
    a round trip, and every damaged block an error."""
    rng = np.random.default_rng(0)
    D = {(0, 0): rng.laplace(0, 3, (3, 9, 8)).round().clip(-127, 127).astype(np.int64)}
    D[0, 2] = np.zeros((3, 9, 8), dtype=np.int64)
    D[0, 2][1, 4, 5] = -127
    p = {(1, 1): torch.full((3, 22), 3)}
    data = adapt.to_bytes(p, 3, D)
    assert data[:4] == bytes([0b10000, 0b101]) + write_varint(len(data) - 4)  # a 2-byte count
    back, deltas, n = adapt.from_bytes(data + b"rest", 2, 3, 22, (9, 8))
    assert n == len(data) and torch.equal(back[1, 1], p[1, 1])
    assert set(deltas) == set(D) and all(np.array_equal(deltas[k], D[k]) for k in D)
    assert adapt.from_bytes(adapt.to_bytes({}, 3, {}), 2, 3, 22, (9, 8)) == ({}, {}, 3)
    first = 4 + 66  # the first update's byte count
    for bad in (
        data[:-1],  # cut
        data[:2] + bytes([data[2] - 1]) + data[3:],  # a byte count one short
        data[:first] + bytes([data[first], 8]) + data[first + 2 :],  # Rice parameter 8
        bytes([0, 1 << 6, 0]),  # a level past 2
    ):
        with pytest.raises(CorruptFileError):
            adapt.from_bytes(bad, 2, 3, 22, (9, 8))
    with pytest.raises(CorruptFileError):  # a set padding bit
        adapt.from_rice(adapt.rice_bytes(np.zeros(3, dtype=np.int64))[:1] + b"\x1f", 3)
    with pytest.raises(CorruptFileError):  # beyond DELTA_LIMIT
        adapt.from_rice(adapt.rice_bytes(np.full(10, 200)), 10)


def test_output_update_changes_are_exact_integers():
    """delta_q (float64 products of small integers) equals the int64 sum, shifted to the parameters' units."""
    rng = np.random.default_rng(1)
    D = rng.integers(-127, 128, (3, 9, 48))
    f = torch.from_numpy(rng.integers(0, 256, (48, 5000)).astype(np.uint8))
    want = np.einsum("ckh,hn->ckn", D, f.numpy().astype(np.int64)) << (16 - adapt.DELTA_FRAC)
    assert np.array_equal(adapt.delta_q(D, f), want)


def test_output_updates_round_trip_and_are_checked(tiny_ar):
    """A file whose slots carry output updates (version 10; accepted here whatever they save) decodes exactly;
    the updates change the coding (other updates give a CRC error, never other pixels)."""
    im = Image.fromarray(photo(96, 64, seed=6))
    with updates_kept():
        data = idfzip.compress(im, tiny_ar, effort=8, flow_only=True)
    c = Container.from_bytes(data)
    assert c.version == 10 and c.adapted
    assert idfzip.decompress(data, tiny_ar).tobytes() == im.tobytes()
    cfg = tiny_ar.flow.config
    K = cfg.mixtures
    params, deltas, n = adapt.from_bytes(c.tiles[0], cfg.levels, 3, 4 + 6 * K, (3 * K, cfg.prior_hidden))
    assert deltas and any(d.any() for d in deltas.values())
    key = next(k for k in sorted(deltas) if deltas[k].any())
    deltas[key] = -deltas[key]
    bad = Container.from_bytes(data)
    bad.tiles = [adapt.to_bytes(params, 3, deltas) + c.tiles[0][n:]]
    with pytest.raises(CorruptFileError):
        idfzip.decompress(bad.to_bytes(), tiny_ar)
