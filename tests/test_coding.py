import hashlib

import numpy as np
import pytest
import torch

from idfzip.coding import Decoder, Encoder
from idfzip.errors import CorruptFileError
from idfzip.priors import WIDTHS, Mixture, nll_bits


def mixture(n, K=3, seed=0, scale=(0.3, 40.0)):
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(n, K, generator=g, dtype=torch.float64), 1)
    mu = torch.randn(n, K, generator=g, dtype=torch.float64) * 20
    s = torch.exp(torch.empty(n, K, dtype=torch.float64).uniform_(np.log(scale[0]), np.log(scale[1]), generator=g))
    return Mixture.from_tensors(w, mu, s)


def sample(mix, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(mix.weights, 1, generator=g).flatten()
    u = torch.rand(len(mix), generator=g, dtype=torch.float64).clamp(1e-9, 1 - 1e-9)
    idx = torch.arange(len(mix))
    return torch.floor(mix.means[idx, k] + mix.scales[idx, k] * torch.log(u / (1 - u)) + 0.5).long()


def test_tables_are_distributions_and_sum_to_one():
    mix = mixture(500)
    centre, cls = mix.windows()
    for k in torch.unique(cls).tolist():
        pos = torch.nonzero(cls == k).flatten()
        t = mix.take(pos).table(centre[pos], WIDTHS[k])
        assert (t >= 0).all()
        assert torch.allclose(t[:, :-1].sum(1) + t[:, -1], torch.ones(len(pos)), atol=1e-5)


def test_table_matches_training_likelihood():
    """The coding table's probability of a symbol equals exp(-nll) of the training formula."""
    K = 2
    raw = torch.randn(1, 3 * K, 4, 5, dtype=torch.float64)
    raw[:, 2 * K :] = raw[:, 2 * K :].abs()  # moderate scales
    z = torch.randint(-3, 4, (1, 1, 4, 5))
    mix = Mixture(raw, K)
    centre, cls = mix.windows()
    bits = 0.0
    for i in range(len(mix)):
        w = WIDTHS[int(cls[i])]
        t = mix.take(torch.tensor([i])).table(centre[i : i + 1], w)
        bits -= float(torch.log2(t[0, int(z.flatten()[i] - centre[i] + w // 2)]))
    assert bits == pytest.approx(float(nll_bits(z.double(), raw, K)), rel=1e-6)


def test_round_trip_with_escapes_and_several_segments():
    mixes = [mixture(3000, seed=s) for s in range(3)]
    zs = [sample(m, seed=s) for s, m in enumerate(mixes)]
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
    # the ideal code length and the real one agree closely
    assert abs(8 * len(data) - enc.bits) < 0.01 * enc.bits + 64


def test_bit_stream_is_stable():
    """The exact compressed bytes of a fixed input: a change here breaks every existing file."""
    mix = mixture(2000, seed=11)
    z = sample(mix, seed=12)
    enc = Encoder()
    enc.push(z, mix)
    data = enc.finish()
    assert len(data) == 1396
    assert hashlib.sha256(data).hexdigest()[:16] == "4105717486abe4c0"


def test_truncated_or_wrong_streams_are_errors():
    mix = mixture(1000, seed=4)
    z = sample(mix, seed=4)
    enc = Encoder()
    enc.push(z, mix)
    data = enc.finish()
    with pytest.raises(CorruptFileError):
        Decoder(data[:-1])
    dec = Decoder(data[:-4])
    try:
        out = dec.pop(mix)
        dec.check_end()
        assert not torch.equal(out, z)
    except CorruptFileError:
        pass
