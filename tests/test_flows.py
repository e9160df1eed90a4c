import pytest
import torch

from idfzip.flows import HierarchicalIDF, IDFConfig, nets
from idfzip.flows.layers import Coupling, Permute, bipartite_updates, quad_updates, squeeze, unsqueeze
from idfzip.flows.nets import ConvNet


def rand_ints(*shape, lo=-300, hi=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, shape, generator=g)


def perturbed(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def test_squeeze_inverts():
    x = rand_ints(2, 3, 8, 6)
    assert torch.equal(unsqueeze(squeeze(x)), x)
    assert squeeze(x).shape == (2, 12, 4, 3)


@pytest.mark.parametrize("kind", ["bipartite", "quad"])
@pytest.mark.parametrize("hidden", [0, 6])
def test_coupling_is_exactly_invertible(kind, hidden):
    C = 3
    updates = quad_updates(C) if kind == "quad" else bipartite_updates(4 * C)
    coup = perturbed(Coupling(4 * C, updates, hidden, 2, 3))
    x = rand_ints(1, 12, 9, 7, lo=-2000, hi=2000)
    y = coup.encode(x)
    assert not torch.equal(y, x)  # the perturbed coupling really changes its input
    assert torch.equal(coup.decode(y), x)


def test_permutation_inverts():
    p = Permute([2, 0, 3, 1])
    x = rand_ints(1, 4, 3, 3)
    assert torch.equal(p.decode(p.encode(x)), x)


@pytest.mark.parametrize(
    "cfg",
    [
        IDFConfig(levels=3, prior_hidden=4, mixtures=2),
        IDFConfig(
            levels=2, coupling="bipartite", init="identity", steps=3, coupling_hidden=5, color="none", prior_hidden=4
        ),
        IDFConfig(levels=2, steps=2, coupling_hidden=4, prior_hidden=4),
    ],
)
def test_whole_flow_inverts(cfg):
    flow = perturbed(HierarchicalIDF(cfg), seed=3)
    x = rand_ints(1, 3, 16, 24, lo=0, hi=256, seed=5)
    kept, latents = x, []
    kept = flow.color_encode(kept)
    for level in range(cfg.levels):
        kept, z = flow.level_encode(level, kept)
        latents.append(z)
    y = kept
    for level in reversed(range(cfg.levels)):
        y = flow.level_decode(level, y, latents[level])
    assert torch.equal(flow.color_decode(y), x)


def test_training_path_matches_integer_path_on_lifting_init():
    """With the lifting initialisation (dyadic weights) the float32 training path gives the same latents."""
    flow = HierarchicalIDF(IDFConfig(levels=2, prior_hidden=4))
    x = rand_ints(1, 3, 8, 8, lo=0, hi=256)
    a = flow.color(x.float())
    b = flow.color_encode(x)
    assert torch.equal(a.long(), b)


def test_exact_is_independent_of_strips_threads_and_batching(monkeypatch):
    net = perturbed(ConvNet(9, 12, hidden=16, layers=2), seed=7)
    x = rand_ints(2, 9, 37, 23, lo=-5000, hi=5000)
    full = net.exact(x)
    monkeypatch.setattr(nets, "STRIP_BYTES", 8 * 2 * 23 * 16 * 9 * 3)  # convolutions in strips of 1 to 3 rows
    assert torch.equal(full, net.exact(x))
    monkeypatch.setattr(nets, "STRIP_POSITIONS", 50)  # the network in strips of 1-2 rows
    assert torch.equal(full, net.exact(x))
    one = torch.cat([net.exact(x[i : i + 1]) for i in range(2)])
    assert torch.equal(full, one)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = net.exact(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(full, single)
    # the exact path is close to the float32 training path
    diff = (full.float() - net(x.float())).abs().max()
    assert diff <= 1e-3 * full.abs().max()


def calibrated(net: ConvNet, x: torch.Tensor) -> ConvNet:
    net._observe = []
    net(x.float())
    acts, net._observe = net._observe, None
    net.calibrate([h.transpose(0, 1).flatten(1) for h in acts])
    net.freeze()
    return net


@pytest.mark.parametrize("hidden", [16, 56])  # 56: 504 terms per sum, fewer weight bits
def test_integer_mode_is_independent_of_strips_threads_and_batching(monkeypatch, hidden):
    x = rand_ints(2, 9, 37, 23, lo=-3000, hi=3000)
    net = calibrated(perturbed(ConvNet(9, 12, hidden=hidden, layers=3), seed=7), x)
    full = net.exact(x, integer=True)
    assert not torch.equal(full, net.exact(x))  # another arithmetic than the float64 mode
    monkeypatch.setattr(nets, "STRIP_BYTES", 8 * 2 * 23 * 16 * 9 * 3)
    monkeypatch.setattr(nets, "STRIP_POSITIONS", 50)  # the network in strips of 1-2 rows
    monkeypatch.setattr(nets, "FIRST_CHUNK_BYTES", 72 * 9 * 7)  # the first layer 7 positions at a time
    assert torch.equal(full, net.exact(x, integer=True))
    assert torch.equal(full, torch.cat([net.exact(x[i : i + 1], integer=True) for i in range(2)]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(full, net.exact(x, integer=True))
    finally:
        torch.set_num_threads(threads)
    for fast in (True, False):  # int8 products, or float32 products of the same values (CPUs without VNNI)
        monkeypatch.setattr(nets, "_INT8_FAST", fast)
        assert torch.equal(full, net.exact(x, integer=True))
    # 8-bit activations in calibrated units: close to the float32 training path
    ref = net(x.float()).detach()
    assert (full.float() - ref).abs().mean() <= 0.02 * ref.abs().mean()


def test_hidden_layers_wider_than_exact_float32_sums_allow_are_refused():
    ConvNet(9, 12, hidden=113, layers=2)  # 3x3 x 113 = 1,017 terms of at most 2**14: below 2**24
    with pytest.raises(ValueError, match="1026 terms"):  # where int8 is slow, float32 sums could round
        ConvNet(9, 12, hidden=114, layers=2)
    ConvNet(9, 12, hidden=200, layers=1)  # one hidden layer: the first (float64) and a 1x1 output of 200 terms


@pytest.mark.parametrize("layers", [1, 2, 3])  # no hidden 3x3 layer after the first, one, two
def test_outputs_at_some_positions_are_those_of_the_whole(monkeypatch, layers):
    """``exact(pos=...)`` (the integer mode computes its last hidden and output layers at those positions only)
    gives the whole output's values and hidden activations at pos, in strips or not, with int8 or float32
    products; the float64 mode gathers its whole output."""
    x = rand_ints(1, 7, 29, 21, lo=-3000, hi=3000, seed=5)
    net = calibrated(perturbed(ConvNet(7, 6, hidden=16, layers=layers), seed=9), x)
    pos = torch.nonzero(((torch.arange(29)[:, None] + torch.arange(21)) % 2 == 1).flatten()).flatten()
    pos = torch.cat([pos[:5], pos[100:101], pos[-40:]])  # uneven: some strips hold none
    feats = torch.empty(1, 16, 29, 21, dtype=torch.uint8)
    full = net.exact(x, integer=True, feats=feats)
    want, want_feats = full.flatten(2)[:, :, pos], feats.flatten(2)[:, :, pos]
    for strips in (False, True):
        if strips:
            monkeypatch.setattr(nets, "STRIP_POSITIONS", 60)  # strips of 2 rows
        for fast in (True, False):
            monkeypatch.setattr(nets, "_INT8_FAST", fast)
            got_feats = torch.zeros(1, 16, 1, len(pos), dtype=torch.uint8)
            got = net.exact(x, integer=True, feats=got_feats, pos=pos)
            assert got.shape == (1, 6, 1, len(pos))
            assert torch.equal(got[:, :, 0], want) and torch.equal(got_feats[:, :, 0], want_feats)
    assert torch.equal(net.exact(x, pos=pos)[:, :, 0], net.exact(x).flatten(2)[:, :, pos])


@pytest.mark.parametrize("fast", [True, False])
def test_integer_mode_is_plain_convolutions(monkeypatch, fast):
    """The integer mode's layouts (flat padded buffers, gathered neighbourhoods, the bias as a row, activations
    kept less 128) give what plain convolutions of its integer weights give: the first layer in float64, each
    hidden layer on activations padded with 0 as sum >> shift clamped to 0..255, the output layer scaled, plus
    the linear branch. Inputs reach the clamp."""
    monkeypatch.setattr(nets, "_INT8_FAST", fast)
    x = rand_ints(2, 5, 19, 13, lo=-3000, hi=3000, seed=4)
    x[0, 0, :3] = 1 << 20
    net = calibrated(perturbed(ConvNet(5, 6, hidden=24, layers=3), seed=8), x)
    (w0, n_lin), hidden, (w_out, beta, scale, bias) = net._int
    C = x.shape[1]
    xc = x.double().clamp(-nets.INPUT_CLAMP, nets.INPUT_CLAMP)
    r = torch.nn.functional.conv2d(xc, w0[:-1].reshape(3, 3, C, -1).permute(3, 2, 0, 1), w0[-1], padding=1)
    a = r[:, n_lin:].floor().clamp(0, nets.ACT_LEVELS)

    def weights(w):  # [hi | lo] -> 128 hi + lo, (K, N) float64
        n = w.shape[1] // 2
        return 128 * w[:, :n].double() + w[:, n:].double()

    for w, b, shift in hidden:  # beta holds -128 (2**shift) for the offset kept in the stack
        q = weights(w).reshape(3, 3, a.shape[1], -1).permute(3, 2, 0, 1)
        s = torch.nn.functional.conv2d(torch.nn.functional.pad(a - 128, (1, 1, 1, 1), value=-128), q)
        s = s.long() + b.long().view(1, -1, 1, 1) + (128 << shift.long()).view(1, -1, 1, 1)
        a = (s >> shift.long().view(1, -1, 1, 1)).clamp(0, nets.ACT_LEVELS).double()
    s = torch.einsum("bchw,co->bohw", a - 128, weights(w_out)).long() + beta.long().view(1, -1, 1, 1)
    ref = s.double() * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1) + r[:, :n_lin]
    assert torch.equal(net.exact(x, integer=True), ref)


def test_integer_products_agree_on_every_kernel():
    """int8 x int8 -> int32 (CPU) and float32 products of the same values (other devices) are the same exact
    integers, at the extremes of both factors."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (300, 432), generator=g, dtype=torch.int8)
    a[:7] = -128
    hi, lo = (
        torch.randint(-128, 128, (432, 48), generator=g, dtype=torch.int8),
        torch.full((432, 48), 127, dtype=torch.int8),
    )
    hi[:, :5] = -128
    ref = a.long() @ (128 * hi.long() + lo.long())
    w = torch.cat([hi, lo], 1)
    assert torch.equal(nets._imm(a, w).long(), ref)
    r = nets._imm_float(a, w).long()
    assert torch.equal(128 * r[:, :48] + r[:, 48:], ref)
    assert torch.equal(nets._imm(a.float(), w).long(), ref)  # the float32 buffers of CPUs without VNNI
    assert torch.equal(nets._halves(128 * hi.long() + lo.long()), w)


def test_kernel_choice_falls_back_to_float32_without_int8_products(monkeypatch):
    """The int8/float32 choice times both once per process; a torch whose CPU lacks _int_mm gets float32."""
    monkeypatch.setattr(nets, "_INT8_FAST", None)
    assert nets._int8_fast() in (True, False) and nets._INT8_FAST is not None

    def missing(*_):
        raise RuntimeError("_int_mm is not implemented for this device")

    monkeypatch.setattr(nets, "_INT8_FAST", None)
    monkeypatch.setattr(torch, "_int_mm", missing)
    assert nets._int8_fast() is False


def test_integer_mode_needs_calibration():
    net = perturbed(ConvNet(3, 4, hidden=8, layers=2), seed=1)
    assert not net.calibrated
    with pytest.raises(ValueError, match="calibrated"):
        net.exact(rand_ints(1, 3, 5, 5), integer=True)
    flow = HierarchicalIDF(IDFConfig(levels=2, prior_hidden=4))
    assert not flow.integer
    flow.calibrate([rand_ints(2, 3, 16, 16, lo=0, hi=256)])
    assert flow.integer


def test_exact_values_lie_on_the_fixed_point_grid():
    net = perturbed(ConvNet(3, 4, hidden=0), seed=2)
    out = net.exact(rand_ints(1, 3, 5, 5))
    scaled = out * 2.0**nets.LINEAR_FRAC_BITS
    assert torch.equal(scaled, torch.round(scaled))


def test_weight_out_of_range_is_refused():
    net = ConvNet(3, 3, hidden=0)
    with torch.no_grad():
        net.linear.weight[0, 0, 0, 0] = 100.0
    with pytest.raises(ValueError):
        net.freeze()


@pytest.mark.parametrize("ar", [False, True])
def test_training_loss_is_finite_and_differentiable(ar):
    flow = HierarchicalIDF(IDFConfig(levels=2, prior_hidden=4, coupling_hidden=4, channel_ar=ar))
    x = rand_ints(2, 3, 16, 16, lo=0, hi=256).float()
    bits = flow(x)
    bits.backward()
    assert torch.isfinite(bits)
    assert all(p.grad is not None for p in flow.priors.parameters())


def test_calibration_quantile_is_torch_quantile():
    """The calibration's quantile from topk gives torch.quantile's numbers exactly (ties, small rows too)."""
    from idfzip.flows.nets import CALIBRATION_QUANTILE, _upper_quantile

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 999, 1000, 1001, 20000):
        for ties in (False, True):
            a = torch.randn(5, n, generator=g, dtype=torch.float64) * 10
            a = a.round() if ties else a
            assert torch.equal(_upper_quantile(a, CALIBRATION_QUANTILE), torch.quantile(a, CALIBRATION_QUANTILE, dim=1))
