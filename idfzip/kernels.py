"""Compiled integer kernels for the coding tables of idfzip.priors, through numba where it is installed.

Invariant: each kernel computes exactly the integers of its numpy counterpart in idfzip.priors (``_cdf``, the
frequencies of ``IntMixture.table``): the same int64 operations on each symbol's own numbers, and a float32
conversion of integers below 2**24 only, so the tables, and the files, are the same with or without numba, on
any machine (tests/test_kernels.py checks them against each other). Where numba cannot be imported, or
IDFZIP_KERNELS=numpy is set, ``loaded()`` is None and the numpy code serves.

numba is imported only once a process has coded enough pixels for the kernels to repay their loading
(``count``), and the kernels are compiled once for C-contiguous arrays and kept in numba's on-disk cache (beside
this file, else the user's cache directory).
"""

from __future__ import annotations

import os
import threading

import numpy as np

from . import tables


def _cdf_into(out, x0, dx, w, j, pack, interp):
    """out[e, s] = sum_k w[k, s] Phi(x0[k, s] + j[e, s'] dx[k, s]) (s' = s, or 0 where j has one column): as
    priors._cdf, Phi from the packed table (SIGF << 20 | SIGD) with the index clamped to the table."""
    K, n = x0.shape
    one = j.shape[1] == 1
    x0s = np.empty(K, dtype=np.int64)
    dxs = np.empty(K, dtype=np.int64)
    for s in range(n):
        for k in range(K):
            x0s[k] = x0[k, s]
            dxs[k] = dx[k, s]
        for e in range(out.shape[0]):
            out[e, s] = _phi_sum(x0s, dxs, w, s, j[e, 0] if one else j[e, s], pack, interp)


def _starts_of(x0, dx, means, scale_idx, inv_tab, s, lo, c):
    """priors.IntMixture._starts of symbol s (first edge lo) into x0, dx (K,); c: the constants (``consts``)."""
    e0 = (lo << c[0]) - (1 << (c[0] - 1))
    for k in range(x0.shape[0]):
        inv = inv_tab[scale_idx[k, s]]
        d = e0 - means[k, s]
        if d < -(1 << 33):
            d = -(1 << 33)
        elif d > (1 << 33):
            d = 1 << 33
        x0[k] = ((d * inv) >> (c[0] + 22 - c[1])) + c[2]
        dx[k] = inv << (c[1] - 22)


def _phi_sum(x0, dx, w, s, jj, pack, interp):
    """sum_k w[k, s] Phi(x0[k] + jj dx[k]) (priors._cdf of one symbol at one edge)."""
    last = pack.shape[0] - 1
    acc = 0
    for k in range(x0.shape[0]):
        x = jj * dx[k] + x0[k]
        i = x >> interp
        if i < 0:
            i = 0
        elif i > last:
            i = last
        v = pack[i]
        acc += ((((v & 0xFFFFF) * (x & ((1 << interp) - 1))) >> interp) + (v >> 20)) * w[k, s]
    return acc


def _table_into(out, means, scale_idx, w, lo, stride, inv_tab, pack, c):
    """The frequencies of ``IntMixture.table`` (its docstring) into out (n, e + 1) float32, symbol s's window
    starting at lo[s]: G_j = (C(edge j) total) >> shift, f_j = G_{j+1} - G_j, the escape total - (G_e - G_0),
    each entry's excess over MAX_FREQ to the escape and then the escape's to entry 0."""
    K, n = means.shape
    m = out.shape[1]
    e = m - 1
    total = (1 << c[5]) - m
    g = np.empty(m, dtype=np.int64)
    fb = np.empty(m, dtype=np.int64)
    x0 = np.empty(K, dtype=np.int64)
    dx = np.empty(K, dtype=np.int64)
    for s in range(n):
        _starts_of(x0, dx, means, scale_idx, inv_tab, s, lo[s], c)
        for jx in range(m):
            g[jx] = (_phi_sum(x0, dx, w, s, jx * stride, pack, c[3]) * total) >> c[4]
        excess = 0
        for jx in range(e):
            f = g[jx + 1] - g[jx]
            if f > c[6]:
                excess += f - c[6]
                f = c[6]
            fb[jx] = f
        esc = total - (g[e] - g[0]) + excess
        if esc > c[6]:
            fb[0] += esc - c[6]
            esc = c[6]
        fb[e] = esc
        for jx in range(m):
            out[s, jx] = fb[jx]


def _inner_into(out, means, scale_idx, w, lo, bucket, inv_tab, pack, c):
    """The frequencies of ``IntMixture.inner_table`` (its docstring) into out (n, stride) float32: D_i = C_i -
    C_0 at the bucket's edges, G_i = D_i total // max(D_stride, 1), f_i = G_{i+1} - G_i, the last total -
    G_{stride-1}, each excess over MAX_FREQ to entry 0 (entry 0's to entry 1)."""
    K, n = means.shape
    stride = out.shape[1]
    total = (1 << c[5]) - stride
    d = np.empty(stride + 1, dtype=np.int64)
    fb = np.empty(stride, dtype=np.int64)
    x0 = np.empty(K, dtype=np.int64)
    dx = np.empty(K, dtype=np.int64)
    for s in range(n):
        _starts_of(x0, dx, means, scale_idx, inv_tab, s, lo[s], c)
        first = bucket[s] * stride
        for i in range(stride + 1):
            d[i] = _phi_sum(x0, dx, w, s, first + i, pack, c[3])
        base = d[0]
        q = d[stride] - base
        if q < 1:
            q = 1
        to_first = 0
        excess0 = 0
        g0 = 0  # G_0 = D_0 total // q = 0
        for i in range(stride):
            g1 = ((d[i + 1] - base) * total) // q if i + 1 < stride else total
            f = g1 - g0
            g0 = g1
            if f > c[6]:
                if i == 0:
                    excess0 = f - c[6]
                else:
                    to_first += f - c[6]
                f = c[6]
            fb[i] = f
        fb[0] += to_first
        fb[1] += excess0
        for i in range(stride):
            out[s, i] = fb[i]


_I2 = "int64[:, ::1]"
_CDF_SIGNATURE = f"void({_I2}, {_I2}, {_I2}, {_I2}, {_I2}, int64[::1], int64)"
_TABLE_SIGNATURE = f"void(float32[:, ::1], {_I2}, {_I2}, {_I2}, int64[::1], {{}}, int64[::1], int64[::1], int64[::1])"


def _c(a: np.ndarray) -> np.ndarray:
    """``a`` as C-contiguous int64 (a copy only where it is not already)."""
    return np.ascontiguousarray(a, dtype=np.int64)


class Kernels:
    """The compiled kernels, each for C-contiguous arrays only (one compiled version each, loaded from the cache),
    with writable copies of the INV and SIGPACK tables (numba types read-only arrays apart). ``consts``:
    PARAM_FRAC, X_FRAC, X_MAX, INTERP_BITS, WEIGHT_BITS + SIG_BITS, PROB_BITS, MAX_FREQ of idfzip.priors, which
    passes them."""

    def __init__(self, numba) -> None:
        def jit(signature, fn):
            return numba.njit(signature, cache=True, nogil=True, boundscheck=False)(fn)

        # numba functions call numba functions only: the helpers become theirs before the kernels compile
        helper = numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
        for name in ("_starts_of", "_phi_sum"):
            fn = globals()[name]
            globals()[name] = helper(getattr(fn, "py_func", fn))
        self._cdf = jit(_CDF_SIGNATURE, _cdf_into)
        self._table = jit(_TABLE_SIGNATURE.format("int64"), _table_into)
        self._inner = jit(_TABLE_SIGNATURE.format("int64[::1]"), _inner_into)
        t = tables.load()
        self._inv, self._pack = t["INV"].copy(), t["SIGPACK"].copy()

    def cdf(self, x0: np.ndarray, dx: np.ndarray, w: np.ndarray, j: np.ndarray, interp: int) -> np.ndarray:
        """priors._cdf: (m, n) int64 for x0, dx, w (K, n) and edge indices j (m, 1) or (m, n)."""
        out = np.empty((j.shape[0], x0.shape[1]), dtype=np.int64)
        self._cdf(out, _c(x0), _c(dx), _c(w), _c(j), self._pack, interp)
        return out

    def table(self, mix, lo: np.ndarray, e: int, stride: int, consts: np.ndarray) -> np.ndarray:
        """IntMixture.table of ``mix`` with windows starting at lo: (n, e + 1) float32."""
        out = np.empty((len(lo), e + 1), dtype=np.float32)
        self._table(out, *self._parts(mix), _c(lo), stride, self._inv, self._pack, consts)
        return out

    def inner(self, mix, lo: np.ndarray, stride: int, bucket: np.ndarray, consts: np.ndarray) -> np.ndarray:
        """IntMixture.inner_table of ``mix`` with windows starting at lo: (n, stride) float32."""
        out = np.empty((len(lo), stride), dtype=np.float32)
        self._inner(out, *self._parts(mix), _c(lo), _c(bucket), self._inv, self._pack, consts)
        return out

    @staticmethod
    def _parts(mix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return _c(mix.means), _c(mix.scale_idx), _c(mix.weights)


LOAD_AFTER = 1 << 18  # pixels: numba is loaded once a process is to code this many through the flow
_STATE = {"pixels": 0, "loaded": False, "kernels": None}
_LOCK = threading.Lock()


def loaded() -> Kernels | None:
    """The kernels if loaded (``count``), else None: the numpy code serves (the same integers)."""
    return _STATE["kernels"]


def count(pixels: int) -> None:
    """Count pixels about to be coded through the flow; once a process is to code LOAD_AFTER (a Kodak image at
    once, or a few smaller ones), numba is imported and the kernels loaded from the cache (0.9 s on a 2-core AMD
    EPYC, of which 0.4 s is numba's import; they saved 1.45 s of a Kodak image's 5.9 s decode there). Never
    where numba is missing, cannot compile, or IDFZIP_KERNELS=numpy is set."""
    with _LOCK:
        _STATE["pixels"] += pixels
        if _STATE["loaded"] or _STATE["pixels"] < LOAD_AFTER:
            return
        _STATE["loaded"] = True
        if os.environ.get("IDFZIP_KERNELS", "").lower() == "numpy":
            return
        try:
            import numba

            _STATE["kernels"] = Kernels(numba)
        except Exception:  # noqa: BLE001 - numba missing, or unable to compile here: the numpy code serves
            return
