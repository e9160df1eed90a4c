import hashlib
import time

import numpy as np
import pytest
import torch

from idfzip import priors, tables
from idfzip.coding import MIN_SYMBOL_BITS, Decoder, Encoder, max_symbols
from idfzip.errors import CorruptFileError
from idfzip.priors import MAX_FREQ, STRIDES, WIDTHS, FloatMixture, IntMixture, nll_bits


def raw_params(n, K=3, seed=0, log_scale=(np.log(0.3), np.log(40.0))):
    """(1, 3K, n, 1) network outputs: random logits, means around +-20, log-scales in the given range."""
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(K, n, generator=g, dtype=torch.float64)
    mu = torch.randn(K, n, generator=g, dtype=torch.float64) * 20
    ls = torch.empty(K, n, dtype=torch.float64).uniform_(*log_scale, generator=g)
    return torch.cat([lg, mu, ls])[None, :, :, None]


def sample(raw, K=3, seed=0):
    """Symbols drawn from the mixtures of raw (1, 3K, n, 1)."""
    g = torch.Generator().manual_seed(seed)
    lg, mu, ls = raw[0, :K, :, 0].T, raw[0, K : 2 * K, :, 0].T, raw[0, 2 * K :, :, 0].T
    k = torch.multinomial(torch.softmax(lg, 1), 1, generator=g).flatten()
    u = torch.rand(lg.shape[0], generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    idx = torch.arange(lg.shape[0])
    return torch.floor(mu[idx, k] + torch.exp(ls[idx, k]) * torch.log(u / (1 - u)) + 0.5).long()


def coded(mix, z, split=False):
    enc = Encoder(mix.portable, split)
    enc.push(z, mix)
    return enc, enc.finish()


# ------------------------------------------------------------------------------------ integer tables (v4)
def test_integer_tables_are_what_their_hash_says():
    """The tables are built by exact decimal arithmetic: the same integers everywhere (a few spot values)."""
    built = tables._build()
    assert tables.digest(built) == tables.TABLES_SHA256
    t = tables.load()
    assert t["SIG"][0] == 1 << 23 and t["SIG"][-1] == 1 << 24 and t["EXP"][0] == 1 << 16
    assert t["INV"][tables.LOG_SCALE_OFFSET] == 1 << 22 and t["SCALE"][tables.LOG_SCALE_OFFSET] == 1 << 12
    assert t["SIG"][64] == round(2**24 / (1 + np.exp(-1.0)))  # sigmoid(1)
    assert t["LOG2"][512] == round(2**16 * np.log2(1.5))
    assert t["SIGD"][0] == 0 and t["SIGD"][-1] == 0 and t["SIGD"][-2] == 0  # saturation at +-24


def _kl(ref: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """KL(ref || (f + 1) / 2**24) per row, in bits."""
    p = (f + 1) / 2**24
    return (ref * (torch.log2(ref.clamp(min=1e-30)) - torch.log2(p))).sum(1)


def test_integer_tables_are_exact_distributions_close_to_the_float_ones():
    raw = raw_params(4000)
    im, fm = IntMixture(raw, 3), FloatMixture(raw, 3)
    centre, core = im._core_windows()
    centre, core, tail = (torch.from_numpy(a) for a in (centre, core, im._tails(centre, core, np.arange(len(im)))))
    fc, fcls = fm.windows()  # version 3's one window leaves 2**-17 outside, as the tail window does
    assert (centre == fc).float().mean() > 0.99 and (tail - fcls).abs().max() <= 1
    assert (core < tail).all() and (WIDTHS[int(core.max())] < 1000)
    for k in torch.unique(core).tolist():  # the core tables
        pos = torch.nonzero(core == k).flatten()
        w = WIDTHS[k]
        f = im.take(pos.numpy()).table(centre[pos], w).double()
        assert torch.equal(f, f.round()) and (f >= 0).all() and (f <= MAX_FREQ).all()
        assert (f.sum(1) == 2**24 - (w + 1)).all()  # so constriction's scale is exactly 1
        ref = fm.take(pos).table(centre[pos], w).double()
        assert float(_kl(ref / ref.sum(1, keepdim=True), f).mean()) < 1e-4  # bits per symbol
    for k in torch.unique(tail).tolist():  # the tail tables: the mixture outside the core window
        pos = torch.nonzero(tail == k).flatten()
        w, w1 = WIDTHS[k], torch.tensor(WIDTHS)[core[pos]]
        f = im.take(pos.numpy()).tail_table(centre[pos], w1, w).double()
        assert torch.equal(f, f.round()) and (f >= 0).all() and (f.sum(1) == 2**24 - (w + 1)).all()
        j = torch.arange(w)[None]
        inside = (j >= (w - w1[:, None]) // 2) & (j < (w + w1[:, None]) // 2)
        assert (f[:, :w][inside] == 0).all()
        pi, mu, sc = fm.weights[pos, None], fm.means[pos, None], fm.scales[pos, None]
        edges = (centre[pos, None] - w // 2 + torch.arange(w + 1)[None] - 0.5).double()[..., None]
        cdf = (pi * torch.sigmoid((edges - mu) / sc)).sum(2)  # float64
        beyond = cdf[:, :1] + (pi * torch.sigmoid((mu - edges[:, -1:]) / sc)).sum(2)  # outside the window
        ref = torch.cat([cdf[:, 1:] - cdf[:, :-1], beyond], 1)
        ref[:, :w][inside] = 0
        mass = ref.sum(1, keepdim=True)  # the symbol escapes its core this often: weight its loss by that
        assert float((mass[:, 0] * _kl(ref / mass, f)).mean()) < 1e-5


def test_ideal_length_is_the_mixture_probability():
    raw = raw_params(3000, seed=3)
    z = sample(raw, seed=3)
    got = IntMixture(raw, 3).ideal_length(z.numpy()) / 2**16
    lg, mu, ls = raw[0, :3, :, 0].T, raw[0, 3:6, :, 0].T, raw[0, 6:, :, 0].T.clamp(-4, 9)
    s = torch.exp(ls)
    cdf = lambda e: (torch.softmax(lg, 1) * torch.sigmoid((e[:, None] - mu) / s)).sum(1)  # noqa: E731
    want = -torch.log2((cdf(z + 0.5) - cdf(z - 0.5)).clamp(min=2**-39))
    err = (torch.from_numpy(got) - want).abs()
    assert err.max() < 0.1 and err.mean() < 5e-3  # the table quantisation: scales to 1/256 in log, CDF to 2**-24


def test_constriction_codes_the_integer_frequencies_exactly():
    """The stream's length is the sum of -log2((f + 1) / 2**24) over the coded entries, to within the ANS
    state's 64 bits and the sentinel's 32."""
    raw = raw_params(20000, seed=5)
    mix = IntMixture(raw, 3)
    enc, data = coded(mix, sample(raw, seed=5))
    assert abs(8 * len(data) - enc.bits - 32) < 64 + 1e-6 * enc.bits


@pytest.mark.parametrize("peaked", [False, True])
def test_encoder_symbol_rows_give_each_symbol_its_table_frequencies(peaked):
    """The encoder codes each symbol under a 3-entry row instead of its whole table: the same cumulative
    frequency and frequency (under constriction's +1), for every entry, the escape and the capped entries of
    very peaked mixtures (one entry above MAX_FREQ; symbols beside it take their full row)."""
    raw = raw_params(3000, seed=3, log_scale=(-4.0, -3.0) if peaked else (np.log(0.3), np.log(40.0)))
    if peaked:
        raw[0, 0] += 30  # component 0 dominates: nearly all mass on one entry
    mix = IntMixture(raw, 3)
    centre = mix._core_windows()[0]
    rng = np.random.default_rng(0)
    for width in (12, 64, 512):
        s = rng.integers(0, width + 1, len(mix))
        s[:300], s[300:600], s[600:1200] = 0, width, width // 2  # first entry, escape, the centre's entry
        full = mix.table(torch.from_numpy(centre), width).numpy().astype(np.int64) + 1
        rows, i = mix.symbol_rows(centre, width, s)
        eff = rows.astype(np.int64) + 1
        assert (rows >= 0).all() and (eff.sum(1) == 1 << 24).all()
        f = eff[np.arange(len(s)), i]
        k = np.where(i == 0, 0, eff[:, 0] + np.where(i == 2, eff[:, 1], 0))
        assert np.array_equal(f, full[np.arange(len(s)), s])
        assert np.array_equal(k, np.where(np.arange(width + 1) < s[:, None], full, 0).sum(1))
        if peaked:
            assert (full[:, :width] == MAX_FREQ + 1).sum() > 100


@pytest.mark.parametrize("peaked", [False, True])
def test_split_windows_give_each_symbol_its_table_frequencies(peaked):
    """Split windows (versions 8-10): the bucket rows (``symbol_rows`` with a stride) are rows of the bucket
    table, the inner rows (``inner_rows``) rows of the inner table, and both tables are distributions whose
    entries stay at most MAX_FREQ (so the work bound holds), the excess of a peaked bucket included."""
    raw = raw_params(3000, seed=7, log_scale=(-4.0, -3.0) if peaked else (np.log(0.3), np.log(40.0)))
    if peaked:
        raw[0, 0] += 30
    mix = IntMixture(raw, 3)
    centre = mix._core_windows()[0]
    rng = np.random.default_rng(1)
    for width in (24, 192, 4096):
        g = STRIDES[width]
        e = width // g
        s = rng.integers(0, e + 1, len(mix))
        s[:300], s[300:600] = 0, e
        full = mix.table(torch.from_numpy(centre), width, g).numpy().astype(np.int64) + 1
        assert full.shape == (len(mix), e + 1) and (full.sum(1) == 1 << 24).all() and (full <= MAX_FREQ + 1).all()
        rows, i = mix.symbol_rows(centre, width, s, g)
        eff = rows.astype(np.int64) + 1
        assert (rows >= 0).all() and (eff.sum(1) == 1 << 24).all()
        assert np.array_equal(eff[np.arange(len(s)), i], full[np.arange(len(s)), s])
        k = np.where(i == 0, 0, eff[:, 0] + np.where(i == 2, eff[:, 1], 0))
        assert np.array_equal(k, np.where(np.arange(e + 1) < s[:, None], full, 0).sum(1))
        bucket = np.minimum(s, e - 1)
        t = rng.integers(0, g, len(mix))
        t[:100], t[100:200] = 0, g - 1
        inner = mix.inner_table(centre, width, g, bucket).numpy().astype(np.int64) + 1
        assert inner.shape == (len(mix), g) and (inner.sum(1) == 1 << 24).all() and (inner <= MAX_FREQ + 1).all()
        rows, i = mix.inner_rows(centre, width, g, bucket, t)
        eff = rows.astype(np.int64) + 1
        assert (rows >= 0).all() and (eff.sum(1) == 1 << 24).all()
        assert np.array_equal(eff[np.arange(len(t)), i], inner[np.arange(len(t)), t])
        k = np.where(i == 0, 0, eff[:, 0] + np.where(i == 2, eff[:, 1], 0))
        assert np.array_equal(k, np.where(np.arange(g) < t[:, None], inner, 0).sum(1))
        if peaked:
            assert (inner == MAX_FREQ + 1).sum() > 100
    # per-symbol widths and strides (the encoder's one call per segment) give each symbol the same rows
    widths = np.array([12, 24, 192, 4096])[np.arange(len(mix)) % 4]
    strides = np.array([STRIDES[w] for w in widths])
    s = rng.integers(0, 1 << 20, len(mix)) % (widths // strides + 1)
    bucket, t = np.minimum(s, widths // strides - 1), rng.integers(0, 1 << 20, len(mix)) % strides
    rows, i = mix.symbol_rows(centre, widths, s, strides)
    inner, j = mix.inner_rows(centre, widths, strides, bucket, t)
    for width in (12, 24, 192, 4096):
        sel = np.flatnonzero(widths == width)
        part, g = mix.take(sel), STRIDES[width]
        assert all(map(np.array_equal, (rows[sel], i[sel]), part.symbol_rows(centre[sel], width, s[sel], g)))
        if g > 1:
            one = part.inner_rows(centre[sel], width, g, bucket[sel], t[sel])
            assert all(map(np.array_equal, (inner[sel], j[sel]), one))


def test_blocks_of_symbols_change_nothing(monkeypatch):
    """The integer CDF work runs on blocks of symbols (priors.BLOCK values at a time): tiny blocks (the last
    one short) give every method the same results as one block, with per-symbol and shared arguments."""
    raw = raw_params(1001, seed=11)
    mix = IntMixture(raw, 3)
    z = sample(raw, seed=11).numpy()
    centre = mix._core_windows()[0]
    rng = np.random.default_rng(2)
    widths = np.array([12, 24, 192])[rng.integers(0, 3, len(mix))]
    strides = np.array([STRIDES[w] for w in widths])
    s = rng.integers(0, 1 << 20, len(mix)) % (widths // strides + 1)
    bucket = np.minimum(s, widths // strides - 1)
    t = rng.integers(0, 1 << 20, len(mix)) % strides
    calls = [
        lambda: mix.table(torch.from_numpy(centre), 192, 12),
        lambda: mix.symbol_rows(centre, widths, s, strides),
        lambda: mix.inner_table(centre, 192, 12, bucket),
        lambda: mix.inner_rows(centre, widths, strides, bucket, t),
        lambda: mix.tail_table(torch.from_numpy(centre), np.full(len(mix), 12), 64),
        lambda: mix.ideal_length(z),
    ]
    whole = [call() for call in calls]
    monkeypatch.setattr(priors, "BLOCK", 40)
    for call, want in zip(calls, whole):
        got = call()
        pairs = zip(got, want) if isinstance(want, tuple) else [(got, want)]
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in pairs)


def test_split_windows_cost_next_to_nothing():
    """Coding the wide windows in two steps gives the same symbols back, in a stream within 0.1% of the
    one-step length."""
    raw = raw_params(20000, seed=8)
    mix = IntMixture(raw, 3)
    z = sample(raw, seed=8)
    z[::301] += 5000  # escapes into the tail stage and raw words
    _, plain = coded(mix, z)
    enc, data = coded(mix, z, split=True)
    dec = Decoder(data, split=True)
    assert torch.equal(dec.pop(mix), z)
    dec.check_end()
    assert abs(len(data) - len(plain)) < 0.001 * len(plain) and data != plain
    assert abs(8 * len(data) - enc.bits - 32) < 64 + 1e-6 * enc.bits


def test_round_trip_with_escapes_and_several_segments():
    raws = [raw_params(3000, seed=s) for s in range(3)]
    mixes = [IntMixture(r, 3) for r in raws]
    zs = [sample(r, seed=s) for s, r in enumerate(raws)]
    zs[1][::97] += 100_000  # far outside any window: escapes
    zs[2][5] = -(2**30)
    enc = Encoder()
    for z, m in reversed(list(zip(zs, mixes))):
        enc.push(z, m)
    data = enc.finish()
    dec = Decoder(data)
    for z, m in zip(zs, mixes):
        assert torch.equal(dec.pop(m), z)
    dec.check_end()
    assert abs(8 * len(data) - enc.bits) < 0.01 * enc.bits + 96


def test_bit_stream_is_stable():
    """The exact compressed bytes of a fixed input (version 4): a change here breaks every existing file."""
    raw = raw_params(2000, seed=11)
    _, data = coded(IntMixture(raw, 3, torch.tensor([[3, -5, 2, 1]])), sample(raw, seed=12))
    assert (len(data), hashlib.sha256(data).hexdigest()[:16]) == (1412, "e55408865626b82d")


def test_an_exhausted_stream_stops_at_once():
    """An empty or short stream for many symbols is an error before or within the first chunk, not after
    millions of symbols decoded from nothing."""
    raw = raw_params(1, log_scale=(-4.0, -4.0)).expand(1, 9, 300_000, 1)  # very confident: 1 - 2**-8 each
    mix = IntMixture(raw, 3)
    for data in (b"", b"\1\0\0\0", b"\xff" * 64):
        t = time.perf_counter()
        with pytest.raises(CorruptFileError):
            dec = Decoder(data)
            dec.pop(mix)
            dec.check_end()
        assert time.perf_counter() - t < 2.0


def test_each_symbol_costs_the_stream_a_minimum():
    """Even symbols the model is sure of cost MIN_SYMBOL_BITS each, so a stream's length bounds its symbols."""
    n = 50_000
    raw = raw_params(1, log_scale=(-4.0, -4.0)).expand(1, 9, n, 1)
    mix = IntMixture(raw, 3)
    centre, _ = mix.windows()
    enc, data = coded(mix, centre)  # every symbol at its window's centre: the likeliest entry
    assert 8 * len(data) >= n * MIN_SYMBOL_BITS and n <= max_symbols(len(data))
    dec = Decoder(data)
    assert torch.equal(dec.pop(mix), centre)
    dec.check_end()


def test_truncated_or_wrong_streams_are_errors():
    raw = raw_params(1000, seed=4)
    mix = IntMixture(raw, 3)
    z = sample(raw, seed=4)
    _, data = coded(mix, z)
    with pytest.raises(CorruptFileError):
        Decoder(data[:-1])
    for bad in (data[:-4], data[4:], data[:-8] + data[-4:]):
        with pytest.raises(CorruptFileError):
            dec = Decoder(bad)
            dec.pop(mix)
            dec.check_end()


def test_nll_and_grad_is_nll_bits_and_its_gradient():
    """The encoder's hand-written mixture NLL and gradient (the offsets' fit) against autograd of the training
    formula, per stream, with log-scales beyond the clamp (zero gradient there), far tails and narrow bins."""
    from idfzip.priors import nll_and_grad

    K, C, m = 3, 2, 500
    g = torch.Generator().manual_seed(5)
    x = torch.cat(
        [
            torch.randn(C, K, m, generator=g),
            8 * torch.randn(C, K, m, generator=g),
            3 * torch.randn(C, K, m, generator=g),
        ],
        1,
    ).double()
    z = torch.round(20 * torch.randn(C, m, generator=g)).double()
    bits, grad = nll_and_grad(x.numpy(), z.numpy(), K)
    for c in range(C):
        xc = x[c].reshape(1, 3 * K, m, 1).clone().requires_grad_()
        ref = nll_bits(z[c].reshape(1, 1, m, 1), xc, K)
        ref.backward()
        assert bits[c] == pytest.approx(float(ref.detach()), rel=1e-12)
        assert np.allclose(grad[c], xc.grad.reshape(3 * K, m).numpy(), rtol=1e-9, atol=1e-12)
    assert (np.abs(x[:, 2 * K :].numpy()) > 4).any() and not grad[:, 2 * K :][x[:, 2 * K :].numpy() < -4].any()


# ------------------------------------------------------------------------------ float tables (versions 1-3)
def test_float_table_matches_training_likelihood():
    """The version-3 coding table's probability of a symbol equals exp(-nll) of the training formula."""
    K = 2
    raw = torch.randn(1, 3 * K, 4, 5, dtype=torch.float64)
    raw[:, 2 * K :] = raw[:, 2 * K :].abs()  # moderate scales
    z = torch.randint(-3, 4, (1, 1, 4, 5))
    mix = FloatMixture(raw, K)
    centre, cls = mix.windows()
    bits = 0.0
    for i in range(len(mix)):
        w = WIDTHS[int(cls[i])]
        t = mix.take(torch.tensor([i])).table(centre[i : i + 1], w)
        bits -= float(torch.log2(t[0, int(z.flatten()[i] - centre[i] + w // 2)]))
    assert bits == pytest.approx(float(nll_bits(z.double(), raw, K)), rel=1e-6)


def test_float_bit_stream_is_stable():
    """Version-3 streams: the exact bytes of a fixed input, as the builds that wrote them produced."""
    g = torch.Generator().manual_seed(11)
    n, K = 2000, 3
    w = torch.softmax(torch.randn(n, K, generator=g, dtype=torch.float64), 1)
    mu = torch.randn(n, K, generator=g, dtype=torch.float64) * 20
    s = torch.exp(torch.empty(n, K, dtype=torch.float64).uniform_(np.log(0.3), np.log(40.0), generator=g))
    mix = FloatMixture.from_tensors(w, mu, s)
    g = torch.Generator().manual_seed(12)
    k = torch.multinomial(w, 1, generator=g).flatten()
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    z = torch.floor(mu[torch.arange(n), k] + s[torch.arange(n), k] * torch.log(u / (1 - u)) + 0.5).long()
    _, data = coded(mix, z)
    assert len(data) == 1396
    assert hashlib.sha256(data).hexdigest()[:16] == "4105717486abe4c0"
    dec = Decoder(data, portable=False)
    assert torch.equal(dec.pop(mix), z)
    dec.check_end()
