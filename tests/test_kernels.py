"""The compiled kernels give exactly the numpy code's integers (idfzip.kernels' invariant)."""

import numpy as np
import pytest

from idfzip import kernels, priors
from idfzip.priors import IntMixture

numba = pytest.importorskip("numba")


@pytest.fixture
def fast(monkeypatch):
    """The kernels loaded, in a state of their own (the process's is left as it was)."""
    monkeypatch.delenv("IDFZIP_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_STATE", {"pixels": 0, "loaded": False, "kernels": None})
    kernels.count(kernels.LOAD_AFTER)
    assert kernels.loaded() is not None
    return kernels._STATE


def _mixtures(n: int, K: int = 3, seed: int = 0) -> IntMixture:
    """n random mixtures over the whole range of the parameters: sharp and flat, near and far means, weights
    that vanish, log-scales clamped at both ends."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, (K, n)) * (1 << priors.PARAM_FRAC)
    means = rng.normal(0, 1, (K, n)) * rng.choice([1, 30, 3000, 100000], (K, n)) * (1 << priors.PARAM_FRAC)
    log_s = rng.uniform(-6, 11, (K, n)) * (1 << priors.PARAM_FRAC)
    return IntMixture.from_quantized(np.concatenate([logits, means, log_s]).astype(np.int64), K)


def _both(fn, state):
    """fn() with the kernels and with numpy."""
    with_kernels = fn()
    kernels_were, state["kernels"] = state["kernels"], None
    try:
        return with_kernels, fn()
    finally:
        state["kernels"] = kernels_were


@pytest.mark.parametrize("width", [12, 48, 256, 4096])
def test_tables_are_the_numpy_tables(fast, width):
    mix = _mixtures(3000, seed=width)
    centre = mix.windows()[0].numpy() + np.random.default_rng(1).integers(-3, 4, len(mix))
    stride = priors.STRIDES[width]
    for g in {1, stride}:
        a, b = _both(lambda: mix.table(centre, width, g).numpy(), fast)
        assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
        assert (a.astype(np.int64).sum(1) == (1 << priors.PROB_BITS) - (width // g + 1)).all()


def test_cdf_is_the_numpy_cdf(fast):
    mix = _mixtures(2000, K=4, seed=7)
    x0, dx = mix._starts(mix.windows()[0].numpy() - 20)
    rng = np.random.default_rng(3)
    for j in (np.arange(41)[:, None], rng.integers(0, 400, (5, len(mix)))):
        a, b = _both(lambda: priors._cdf(x0, dx, mix.weights, j), fast)
        assert np.array_equal(a, b)
    # what goes through _cdf: every symbol's code length, split windows' inner tables, the encoder's rows
    z = rng.integers(-50, 50, len(mix))
    centre = mix.windows()[0].numpy()
    bucket = rng.integers(0, 4, len(mix))
    s = rng.integers(0, 5, len(mix))
    for fn in (
        lambda: mix.ideal_length(z),
        lambda: mix.inner_table(centre, 96, 8, bucket).numpy(),
        lambda: mix.symbol_rows(centre, 24, s, 4)[0],
    ):
        a, b = _both(fn, fast)
        assert np.array_equal(a, b)


def test_the_kernels_load_only_after_enough_pixels(monkeypatch):
    monkeypatch.delenv("IDFZIP_KERNELS", raising=False)
    monkeypatch.setattr(kernels, "_STATE", {"pixels": 0, "loaded": False, "kernels": None})
    kernels.count(kernels.LOAD_AFTER - 1)
    assert kernels.loaded() is None
    kernels.count(1)
    assert kernels.loaded() is not None
    monkeypatch.setattr(kernels, "_STATE", {"pixels": 0, "loaded": False, "kernels": None})
    monkeypatch.setenv("IDFZIP_KERNELS", "numpy")
    kernels.count(kernels.LOAD_AFTER)
    assert kernels.loaded() is None
