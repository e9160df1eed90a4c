"""Per-tile adaptation of the priors: a few numbers the encoder fits to each tile and stores in the file.

A trained prior is a compromise over its training images; one photo is sharper or noisier, more or less
predictable than that average. For each level l, slot j and channel c the encoder may store four small
integers (a, b, d, t), in units of 1/64, that transform that stream's mixture parameters before coding:

    log-scales  s' = s * (1 + a/64) + b/64
    means       m' = m * (1 + d/64)          (after the channel-autoregressive shift)
    logits      w' = w * (1 + t/64)

The encoder fits them by a greedy integer search on the integer code length of (a subsample of) the stream's
symbols, and adapts a slot only where the estimated saving exceeds the bytes its parameters take. Since
version 4 the transform is integer arithmetic on the quantised parameters (priors.adapt_int), and so is the
search, so every machine makes the same choices and builds the same tables. Version 3 files are decoded
with ``apply``, the float64 form they were written with. Block layout (docs/FORMAT.md): a varint mask
(bit 3l + j: slot j of level l adapted), then per adapted slot in mask order C x 4 signed bytes, ordered
channel, (a, b, d, t).

Version 6 (efforts 5-9) adds per channel, for each of the 3K mixture parameters x (logits, means, log-scales
of each component), an offset o and a gain g: after the transform above, x' = x * (1 + g/64) + o/64. A slot
then takes C x (4 + 6K) signed bytes, ordered channel, (a, b, d, t, o_1..o_3K, g_1..g_3K). The encoder fits
them in float64 (``_offsets``) and rounds them; the bits depend only on the stored integers, so every decoder
computes the same.

Version 7 (efforts 7-9) may also update a slot's prior network itself, in its output layer: integers D (C, 3K,
hidden) change the quantised mixture parameters, before the transforms above, by

    q' = q + (sum_i D[c, k, i] * f_i) << (PARAM_FRAC - DELTA_FRAC)

where f_i (0..255) are the net's last hidden activations at that position (``ConvNet.exact(feats=...)``), each
in its calibrated unit, so D = 1 moves a parameter by at most 255 / 2**DELTA_FRAC. |D| <= DELTA_LIMIT, hidden
terms: sums of at most 127 * 255 * hidden (below 2**21 for natural's 48), integers on every machine. The
encoder fits D in float64 (``fit_delta``, charging for its size) jointly with stand-ins for the transforms,
rounds it, fits the transforms on top, and keeps D only where the bits it saves exceed its bytes. A version 7 block
is: the varint mask, a second varint mask (bit 3l + j: slot j of level l updated), a varint byte count of the rest
of the block, the parameters as above, then per updated slot in mask order a varint byte count, a byte r (Rice
parameter, 0..7) and the C * 3K * hidden zigzagged values of D (channel, parameter, hidden unit) Rice-coded with
parameter r, most significant bit first, zero-padded.

Versions 8, 9 and 10 have the blocks of versions 5, 6 and 7 (they differ in the coding only, idfzip.coding).
"""

from __future__ import annotations

import numpy as np
import torch

from .container import Reader, write_varint
from .errors import CorruptFileError
from .priors import PARAM_FRAC, IntMixture, adapt_int, nll_and_grad, one_thread, quantize

UNIT = 64  # parameters are integers in units of 1/UNIT
LIMITS = ((-48, 64), (-127, 127), (-48, 64), (-48, 64))  # ranges the encoder searches for a, b, d, t
FIT_SYMBOLS = 2048  # the search sees at most about this many symbols of a stream
MIN_SYMBOLS = 4096  # smaller slots are not fitted: at ~0.1 bit saved per symbol they cannot pay for 12 bytes
STEPS = (16, 8, 4, 2, 1)
COARSE_STEPS = 5  # the steps on half the sample (``_search``): all of them by default ...
FINE_COARSE_STEPS = 3  # ... the first three at efforts 7-9
MARGIN_BITS = 16  # a slot must save this much more than its parameters cost
MIN_GAIN = 1 << 14  # a search step must save at least this many 2**-16 bits (1/4 bit) on its sample
FINE_GAIN = 66  # the same at efforts 7-9 (about 1e-3 bits)

OFFSET_LIMIT = 127  # per-component offsets (version 6): integers in units of 1/UNIT, |o| <= 127
GAIN_LIMITS = (-48, 64)  # per-component gains (version 6), as the 4-parameter factors
OFFSET_STEPS = 12  # damped Gauss-Newton steps of the offsets' float fit (by default)
LM_DAMPING = 1e-2  # its first damping, relative to the diagonal

DELTA_FRAC = 9  # output updates (version 7): D f in units of 2**-DELTA_FRAC
DELTA_LIMIT = 127
DELTA_STEPS = 20  # damped Gauss-Newton steps of the output updates' float fit (by default)
DELTA_RIDGE = 2.0  # the fit's charge for D, in bits per unit of D**2 over the slot (an L1 charge made it diverge)
DELTA_CURVATURE = 4096  # positions whose gradients give that fit's curvature ...
DELTA_REFRESH = 4  # ... recomputed every this many steps
DELTA_MIN_SYMBOLS = 1 << 17  # a 3-channel slot of fewer symbols is not updated (``updates_may_pay``)

Params = dict[tuple[int, int], torch.Tensor]  # (level, slot) -> (C, 4) int64, or (C, 4 + 6K) in version 6
Deltas = dict[tuple[int, int], np.ndarray]  # (level, slot) -> (C, 3K, hidden) int64 output updates (version 7)


def apply(raw: torch.Tensor, p: torch.Tensor | None, K: int) -> torch.Tensor:
    """Version 3 only: one channel's mixture parameters raw (B, 3K, ...) [logits, means, log-scales]
    transformed by p = (a, b, d, t) (integers) in float64; None or zeros leave raw as it is."""
    if p is None or not bool(p.any()):
        return raw
    a, b, d, t = (float(v) / UNIT for v in p.tolist())
    return torch.cat([raw[:, :K] * (1.0 + t), raw[:, K : 2 * K] * (1.0 + d), raw[:, 2 * K :] * (1.0 + a) + b], 1)


def _subsample(n: int, size: int = FIT_SYMBOLS) -> np.ndarray:
    """At most ``size`` positions of n, spread pseudo-randomly (a strided subsample could see only a few image
    columns): i * 2654435761 mod n, distinct as that prime exceeds any n here."""
    if n <= size:
        return np.arange(n)
    return (np.arange(size, dtype=np.int64) * 2654435761) % n


def _search(
    q: np.ndarray, z: np.ndarray, K: int, gain: int = MIN_GAIN, coarse: int = COARSE_STEPS
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy integer search for C streams at once: quantised parameters q (C, 3K, m), symbols z (C, m) ->
    parameters (C, 4) and each stream's saving on these symbols in units of 2**-16 bits (C,).

    The first ``coarse`` steps search on the first half of the symbols (a subsample as spread as the whole,
    ``_subsample``), the rest on all of them (``_pattern``); the saving is measured on all of them. Three
    steps on half took 30% off the search's time against none and cost 0.003% in bytes on 9 CID22 validation
    images, 0.013% on Kodak; all five (efforts 2-6) take 38% more off, at 0.04-0.05% in bytes."""
    half = q.shape[2] // 2
    zero = np.zeros((q.shape[0], 4), dtype=np.int64)
    p, _ = _pattern(q[:, :, :half], z[:, :half], K, zero, STEPS[:coarse], gain)
    p, cur = _pattern(q, z, K, p, STEPS[coarse:], gain)
    return p, _lengths(q, z, zero, K) - cur


def _pattern(q: np.ndarray, z: np.ndarray, K: int, p: np.ndarray, steps, gain: int) -> tuple[np.ndarray, np.ndarray]:
    """The search of ``_search`` from parameters p (C, 4) over ``steps``: the parameters it ends at and their
    cost (C,) on these symbols. Per stream, for each step s: move to the best of the 8 neighbours p +- s e_i
    (clamped to LIMITS) while that saves at least ``gain``, at most 32 times; the cost is
    IntMixture.ideal_length, so every comparison is between integers and every machine makes the same choices
    (ties: the first candidate)."""
    C, _, m = q.shape
    lo = np.array([lim[0] for lim in LIMITS], dtype=np.int64)
    hi = np.array([lim[1] for lim in LIMITS], dtype=np.int64)
    eye = np.concatenate([np.eye(4, dtype=np.int64), -np.eye(4, dtype=np.int64)])  # (8, 4)

    # each candidate moves one of a, b (log-scales), d (means), t (logits): only that part of the mixtures is
    # rebuilt, the others are the current point's (the same integers as adapt_int and IntMixture._parts)
    lg, mu, ls = (np.moveaxis(q[:, i * K : (i + 1) * K], 1, 0)[:, :, None] for i in range(3))  # (K, C, 1, m)
    moved = [[0, 1, 4, 5], [2, 6], [3, 7]]  # candidates (rows of eye) that move a or b, d, t

    def part(g: int, act: np.ndarray, P: np.ndarray) -> np.ndarray:  # P (c, r, 4) -> part g (K, c, r, m)
        if g == 0:  # scale indices, from a and b
            a, b = P[None, :, :, 0, None], P[None, :, :, 1, None]
            return IntMixture.scale_idx_of(((ls[:, act] * (64 + a)) >> 6) + (b << (PARAM_FRAC - 6)))
        if g == 1:
            return IntMixture.means_of((mu[:, act] * (64 + P[None, :, :, 2, None])) >> 6)
        return IntMixture.weights_of((lg[:, act] * (64 + P[None, :, :, 3, None])) >> 6)

    def candidate_costs(act: np.ndarray, cands: np.ndarray) -> tuple[np.ndarray, list]:  # cands (c, 8, 4)
        """The candidates' costs (c, 8), and their parts [(K, c, 8, m)] (scale indices, means, weights)."""
        fulls = []
        for g, rows in enumerate(moved):
            full = np.repeat(here[g][:, act], 8, axis=2)  # the current point's, for every candidate
            full[:, :, rows] = part(g, act, cands[:, rows])
            fulls.append(full)
        c = len(act)
        parts = [full.reshape(K, -1) for full in fulls]
        bits = IntMixture.from_parts(parts[2], parts[1], parts[0]).ideal_length(
            np.broadcast_to(z[act, None], (c, 8, m)).reshape(-1)
        )
        return bits.reshape(c, 8, m).sum(2), fulls

    p = p.copy()
    cur = _lengths(q, z, p, K)
    everyone = np.arange(C)
    here = [part(g, everyone, p[:, None]) for g in range(3)]  # the current point's parts (K, C, 1, m)
    for s in steps:
        active = np.ones(C, dtype=bool)
        for _ in range(32):
            act = np.flatnonzero(active)
            cands = np.clip(p[act, None, :] + s * eye, lo, hi)  # (c, 8, 4)
            f, fulls = candidate_costs(act, cands)
            i = np.argmin(f, 1)
            best = f[np.arange(len(act)), i]
            better = best <= cur[act] - gain
            p[act[better]] = cands[better, i[better]]
            cur[act[better]] = best[better]
            for g in range(3):  # the moved streams' parts: their chosen candidate's
                here[g][:, act[better], 0] = fulls[g][:, np.flatnonzero(better), i[better]]
            active[act[~better]] = False
            if not active.any():
                break
    return p, cur


def _streams(
    raws: list[torch.Tensor], zs: list[torch.Tensor], K: int, size: int = FIT_SYMBOLS
) -> tuple[np.ndarray, np.ndarray, int]:
    """One stream's subsample of at most ``size`` symbols: quantised parameters (3K, m), symbols (m,), and the
    stream's length n."""
    r = torch.cat([x.detach().reshape(x.shape[0], 3 * K, -1).permute(1, 0, 2).reshape(3 * K, -1) for x in raws], 1)
    z = torch.cat([x.reshape(-1) for x in zs]).long().cpu().numpy()
    pick = _subsample(len(z), size)
    return quantize(r[:, torch.from_numpy(pick).to(r.device)]), z[pick], len(z)


def fit(raws: list[torch.Tensor], zs: list[torch.Tensor], K: int) -> tuple[torch.Tensor, int]:
    """Parameters (4,) int64 for one stream, given its segments' mixture parameters raws[i] (B, 3K, ...) and
    symbols zs[i] (B, 1, ...), and the estimated saving over the whole stream in units of 2**-16 bits."""
    q, z, n = _streams(raws, zs, K)
    p, saved = _search(q[None], z[None], K)
    return torch.from_numpy(p[0]), int(saved[0]) * n // len(z)


def _offsets(q: np.ndarray, z: np.ndarray, p: np.ndarray, K: int, steps: int = OFFSET_STEPS) -> np.ndarray:
    """Per-component offsets o and gains g (C, 6K: o then g) in units of 1/UNIT for C streams with quantised
    parameters q (C, 3K, m), symbols z (C, m) and 4-parameter adaptation p (C, 4): each parameter x becomes
    x (1 + g) + o. A float64 fit from 0 of the mixture's NLL (``priors.nll_and_grad``), ``steps`` damped
    Gauss-Newton steps (Levenberg-Marquardt on the symbols' gradients' outer products; a channel takes a
    step only where it lowers that channel's NLL), kept within the stored ranges, rounded. Only the encoder
    runs it; the decoder reads the integers, so the file decodes the same anywhere (another kind of CPU may
    round a float differently and so choose other integers: a different file, as valid)."""
    C = q.shape[0]
    base = adapt_int(q, p[:, :, None], K, axis=1).astype(np.float64) * 2.0**-PARAM_FRAC
    zf = z.astype(np.float64)
    lo = np.repeat([-OFFSET_LIMIT / UNIT, GAIN_LIMITS[0] / UNIT], 3 * K)
    hi = np.repeat([OFFSET_LIMIT / UNIT, GAIN_LIMITS[1] / UNIT], 3 * K)

    def nll(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # (C,), and d / d theta per symbol (C, 6K, m)
        bits, dx = nll_and_grad(base * (1.0 + th[:, 3 * K :, None]) + th[:, : 3 * K, None], zf, K)
        return bits, np.concatenate([dx, dx * base], 1)

    def step(i: int, th: np.ndarray, J: np.ndarray, damp: np.ndarray) -> np.ndarray:
        Jt = torch.from_numpy(J)
        return _damped_step(torch.bmm(Jt, Jt.transpose(1, 2)), Jt.sum(2).numpy(), damp)

    th = _damped_fit(np.zeros((C, 6 * K)), nll, step, steps, lo, hi)
    o = np.clip(np.round(th[:, : 3 * K] * UNIT), -OFFSET_LIMIT, OFFSET_LIMIT)
    g = np.clip(np.round(th[:, 3 * K :] * UNIT), *GAIN_LIMITS)
    return np.concatenate([o, g], 1).astype(np.int64)


def _damped_fit(th: np.ndarray, objective, step, steps: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Levenberg-Marquardt for C streams at once from parameters th (C, P): ``objective(th)`` -> (value (C,),
    state: an array or tuple of arrays with C first), ``step(i, th, state, damp)`` -> the i-th step (C, P) to
    subtract at that point (``_damped_step``). A stream takes a step, kept within [lo, hi], only where it
    lowers its value, its damping then divided by 3, else multiplied by 4. On one thread, so the same choices
    at any thread count (on one kind of CPU)."""

    def keep(ok: np.ndarray, new: np.ndarray, old: np.ndarray) -> np.ndarray:
        return np.where(ok.reshape(-1, *[1] * (new.ndim - 1)), new, old)

    damp = np.full(th.shape[0], LM_DAMPING)
    with one_thread():
        val, state = objective(th)
        for i in range(steps):
            trial = np.clip(th - step(i, th, state, damp), lo, hi)
            val2, state2 = objective(trial)
            ok = val2 < val
            th, val = keep(ok, trial, th), keep(ok, val2, val)
            if isinstance(state, tuple):
                state = tuple(keep(ok, new, old) for new, old in zip(state2, state))
            else:
                state = keep(ok, state2, state)
            damp = np.where(ok, damp / 3.0, damp * 4.0)
    return th


def _damped_step(F: torch.Tensor, grad: np.ndarray, damp: np.ndarray, reg: np.ndarray | None = None) -> np.ndarray:
    """One Levenberg-Marquardt step per stream: curvature F (C, P, P) float64, gradient (C, P), damping (C,)
    relative to F's diagonal, ``reg`` (P,) a ridge term's curvature -> the step (C, P) to subtract."""
    add = torch.diagonal(F, dim1=1, dim2=2) * torch.from_numpy(damp)[:, None] + 1e-9
    if reg is not None:
        add = add + torch.from_numpy(reg)
    return torch.linalg.solve(F + torch.diag_embed(add), torch.from_numpy(grad)[:, :, None])[:, :, 0].numpy()


def _lengths(q: np.ndarray, z: np.ndarray, p: np.ndarray, K: int) -> np.ndarray:
    """Integer code length (2**-16 bits) of each of C streams (q (C, 3K, m), z (C, m)) under adaptation p."""
    C, _, m = q.shape
    qq = adapt_int(q, p[:, :, None], K, axis=1)
    flat = np.moveaxis(qq, 1, 0).reshape(3 * K, -1)
    return IntMixture.from_quantized(flat, K).ideal_length(z.reshape(-1)).reshape(C, m).sum(1)


def _slot_sample(segments, C: int, K: int, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(C, 3K, m) quantised parameters and (C, m) symbols of a slot's passes [(symbols (B, C, ...), per-channel
    mixture parameters)] at the positions ``_subsample`` picks of its n, and n."""
    s = [_streams([r[c] for _, r in segments], [z[:, c : c + 1] for z, _ in segments], K, size) for c in range(C)]
    return np.stack([x[0] for x in s]), np.stack([x[1] for x in s]), s[0][2]


def delta_q(D: np.ndarray, f) -> np.ndarray:
    """Parameter changes (C, 3K, n) int64, in units of 2**-PARAM_FRAC, of output updates D (C, 3K, hidden) at
    last hidden activations f (hidden, n), 0..255: float64 products of integers whose sums stay far below
    2**53, so exact in any order (module docstring)."""
    C, K3, hd = D.shape
    s = torch.from_numpy(D.reshape(-1, hd)).double() @ torch.as_tensor(f).cpu().double()
    return (s.long().numpy() << (PARAM_FRAC - DELTA_FRAC)).reshape(C, K3, -1)


def fit_slot(
    segments: list[tuple[torch.Tensor, list[torch.Tensor]]],
    C: int,
    K: int,
    symbols: int = FIT_SYMBOLS,
    offsets: int = 0,
    steps: int = OFFSET_STEPS,
    delta: tuple[np.ndarray, torch.Tensor] | None = None,
    gain: int = MIN_GAIN,
    coarse: int = COARSE_STEPS,
) -> tuple[torch.Tensor | None, int]:
    """(C, 4) parameters for one slot of a level from its passes [(symbols (B, C, ...), per-channel mixture
    parameters)], searched on about ``symbols`` of each stream's symbols, or None where adapting it would
    not pay for its bytes; and the estimated saving over the slot's unadapted stream, less the bytes of the
    parameters, in units of 2**-16 bits. ``offsets`` > 0 (version 6): (C, 4 + 6K) parameters, the last 6K
    per-component offsets and gains (``_offsets``) fitted on about that many symbols in ``steps`` steps (zero in
    a channel where they do not save bits on them). ``delta`` (D, f): output updates (version 7) and the
    slot's last hidden activations f (hidden, n) in the passes' order: the parameters are fitted on top of
    them, and the saving counts theirs (not their bytes). ``gain``: the search's least saving per step
    (``_pattern``); ``coarse``: its steps on half the sample (``_search``)."""
    if sum(z.numel() for z, _ in segments) < MIN_SYMBOLS:
        return None, 0

    def sample(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:  # (before D, after D, symbols, n)
        q, z, n = _slot_sample(segments, C, K, size)
        if delta is None:
            return q, q, z, n
        return q, q + delta_q(delta[0], delta[1][:, torch.from_numpy(_subsample(n, size))]), z, n

    q0, q, z, n = sample(symbols)
    p, saved = _search(q, z, K, gain, coarse)
    if offsets:
        q0, q, z, n = sample(offsets)
        with_o = np.concatenate([p, _offsets(q, z, p, K, steps)], 1)
        before, after = _lengths(q, z, p, K), _lengths(q, z, with_o, K)
        p = np.where((after < before)[:, None], with_o, np.pad(p, ((0, 0), (0, 6 * K))))
        saved = _lengths(q, z, np.zeros_like(p[:, :4]), K) - np.minimum(before, after)
    plain = int(saved.sum()) * n // z.shape[1] - ((8 * p.size + MARGIN_BITS) << 16)  # with p, against q
    by_delta = 0
    if delta is not None:
        zero = np.zeros((C, 4), dtype=np.int64)
        by_delta = int((_lengths(q0, z, zero, K) - _lengths(q, z, zero, K)).sum()) * n // z.shape[1]
    if plain > 0:
        return torch.from_numpy(p), plain + by_delta
    return None, by_delta


def updates_may_pay(symbols: int, C: int) -> bool:
    """Whether output updates are worth fitting for a slot of ``symbols`` symbols of a C-channel model: a
    3-channel slot needs DELTA_MIN_SYMBOLS (fewer would not pay for the updates' some 1,300 values); a
    1-channel model's updates hold a third of the values, so its slots need a third of the symbols (the same
    positions)."""
    return 3 * symbols >= DELTA_MIN_SYMBOLS * C


def fit_delta(
    segments: list[tuple[torch.Tensor, list[torch.Tensor]]],
    f: torch.Tensor,
    C: int,
    K: int,
    size: int,
    steps: int = DELTA_STEPS,
) -> np.ndarray:
    """Output updates D (C, 3K, hidden) int64 for one slot (version 7) from its passes as for ``fit_slot`` and
    its last hidden activations f (hidden, n): damped Gauss-Newton steps, as ``_offsets`` takes, on the NLL of
    about ``size`` of its positions plus DELTA_RIDGE bits per unit of D**2 (scaled to the sample), jointly with
    per-parameter offsets and gains standing in for the adaptation fitted after it; rounded. The curvature comes
    from the gradients of DELTA_CURVATURE of those positions, in float32, recomputed every DELTA_REFRESH steps."""
    q, z, n = _slot_sample(segments, C, K, size)
    m, K3 = z.shape[1], 3 * K
    feats = f[:, torch.from_numpy(_subsample(n, size))].cpu().double().numpy() * 2.0**-DELTA_FRAC  # (hidden, m)
    nD = K3 * feats.shape[0]
    base = q * 2.0**-PARAM_FRAC
    zf = z.astype(np.float64)
    ridge = DELTA_RIDGE * m / n
    sub = _subsample(m, DELTA_CURVATURE)
    fsub = feats[:, sub]
    lo = np.concatenate(
        [np.full(nD, -DELTA_LIMIT), np.full(K3, -OFFSET_LIMIT / UNIT), np.full(K3, GAIN_LIMITS[0] / UNIT)]
    )
    hi = np.concatenate(
        [np.full(nD, DELTA_LIMIT), np.full(K3, OFFSET_LIMIT / UNIT), np.full(K3, GAIN_LIMITS[1] / UNIT)]
    )
    reg = np.concatenate([np.full(nD, 2.0 * ridge), np.zeros(2 * K3)])

    def mm(x: np.ndarray, y: np.ndarray) -> np.ndarray:  # in torch, so on _damped_fit's one thread (not NumPy's BLAS)
        return (torch.from_numpy(x) @ torch.from_numpy(y)).numpy()

    def objective(th: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
        """The fit's objective (C,), and the NLL's derivatives per symbol by D's rows (before the features),
        the offsets and the gains, each (C, 3K, m)."""
        D, o, g = th[:, :nD].reshape(C, K3, -1), th[:, nD : nD + K3, None], th[:, nD + K3 :, None]
        lin = base + mm(D, feats)
        bits, dx = nll_and_grad(lin * (1.0 + g) + o, zf, K)
        return bits + ridge * (D**2).sum((1, 2)), (dx * (1.0 + g), dx, dx * lin)

    curvature = []  # the latest, recomputed every DELTA_REFRESH steps

    def step(i: int, th: np.ndarray, parts: tuple[np.ndarray, ...], damp: np.ndarray) -> np.ndarray:
        a, do, dg = parts
        grad = np.concatenate([mm(a, feats.T).reshape(C, -1) + 2.0 * ridge * th[:, :nD], do.sum(2), dg.sum(2)], 1)
        if i % DELTA_REFRESH == 0:
            J = np.empty((C, nD + 2 * K3, len(sub)), dtype=np.float32)  # filled a channel at a time (memory)
            for c in range(C):
                J[c, :nD] = (a[c][:, None, sub] * fsub[None]).reshape(nD, -1)
            J[:, nD : nD + K3], J[:, nD + K3 :] = do[:, :, sub], dg[:, :, sub]
            J = torch.from_numpy(J)
            curvature[:] = [torch.bmm(J, J.transpose(1, 2)).double() * (m / len(sub))]
        return _damped_step(curvature[0], grad, damp, reg)

    th = _damped_fit(np.zeros((C, nD + 2 * K3)), objective, step, steps, lo, hi)
    return np.clip(np.round(th[:, :nD]), -DELTA_LIMIT, DELTA_LIMIT).astype(np.int64).reshape(C, K3, -1)


def _zigzag(v: np.ndarray) -> np.ndarray:
    return np.where(v < 0, -2 * v - 1, 2 * v)


def rice_bytes(D: np.ndarray) -> bytes:
    """D's values zigzagged and Rice-coded with the parameter r (0..7) that takes the fewest bits: byte r, then
    the bits, most significant first, zero-padded to a whole byte (the block's varint byte count not included)."""
    u = _zigzag(D.reshape(-1))
    r = min(range(8), key=lambda k: int((u >> k).sum()) + len(u) * (k + 1))
    bits = []
    for v in u.tolist():
        bits += [1] * (v >> r) + [0] + [(v >> i) & 1 for i in reversed(range(r))]
    return bytes([r]) + np.packbits(np.array(bits, dtype=np.uint8)).tobytes()


def from_rice(data: bytes, count: int) -> np.ndarray:
    """The ``count`` values of a ``rice_bytes`` block, checked: r <= 7, every value within DELTA_LIMIT, no bits
    left but the zero padding."""
    if not data or data[0] > 7:
        raise CorruptFileError("invalid output update block")
    r = data[0]
    bits = np.unpackbits(np.frombuffer(data[1:], dtype=np.uint8))
    zeros = np.flatnonzero(bits == 0)  # each value's unary part ends at a zero
    out = np.empty(count, dtype=np.int64)
    pos = 0
    weights = 1 << np.arange(r - 1, -1, -1)
    for i in range(count):
        k = np.searchsorted(zeros, pos)
        if k >= len(zeros) or zeros[k] + 1 + r > len(bits):
            raise CorruptFileError("output update block is truncated")
        end = zeros[k] + 1
        out[i] = ((end - 1 - pos) << r) + int((bits[end : end + r] * weights).sum())
        pos = end + r
        if out[i] > 2 * DELTA_LIMIT:
            raise CorruptFileError("invalid output update block")
    if len(bits) - pos >= 8 or bits[pos:].any():
        raise CorruptFileError("output update block has data left over")
    return np.where(out & 1, -((out + 1) >> 1), out >> 1)


def _mask(keys) -> bytes:
    return write_varint(sum(1 << (3 * level + j) for level, j in keys))


def to_bytes(params: Params, C: int, deltas: Deltas | None = None) -> bytes:
    """The adaptation block of a tile (docs/FORMAT.md); ``deltas`` not None: version 7's layout, with output
    updates."""
    body = bytearray()
    for key in sorted(params):
        body += params[key].to(torch.int8).numpy().tobytes()
    if deltas is None:
        return _mask(params) + bytes(body)
    for key in sorted(deltas):
        block = rice_bytes(deltas[key])
        body += write_varint(len(block)) + block
    return _mask(params) + _mask(deltas) + write_varint(len(body)) + bytes(body)


def from_bytes(
    data: bytes, levels: int, C: int, width: int = 4, delta_shape: tuple[int, int] | None = None
) -> tuple[Params, Deltas, int]:
    """The block at the start of a tile stream: (parameters, output updates, bytes it took); ``width``
    parameters per channel (4, or 4 + 6K in version 6); ``delta_shape`` (3K, hidden): version 7's layout,
    with output updates of that shape per channel."""
    r = Reader(data, "tile stream")

    def mask() -> int:
        m = r.varint()
        if m >> (3 * levels):
            raise CorruptFileError("invalid adaptation block")
        return m

    adapted = mask()
    updated = mask() if delta_shape is not None else 0
    if updated and not delta_shape[1]:
        raise CorruptFileError("output updates for a model whose priors have no hidden layers")
    size = r.varint() if delta_shape is not None else 0
    start = r.pos
    params, deltas = {}, {}
    for bit in range(3 * levels):
        if adapted >> bit & 1:
            block = bytearray(r.take(width * C))
            params[bit // 3, bit % 3] = torch.frombuffer(block, dtype=torch.int8).long().view(C, width)
    for bit in range(3 * levels):
        if updated >> bit & 1:
            count = C * delta_shape[0] * delta_shape[1]
            deltas[bit // 3, bit % 3] = from_rice(r.take(r.varint()), count).reshape(C, *delta_shape)
    if delta_shape is not None and r.pos - start != size:
        raise CorruptFileError("adaptation block does not match its length")
    return params, deltas, r.pos
