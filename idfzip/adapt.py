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

Version 6 (efforts 7-9) adds per channel, for each of the 3K mixture parameters x (logits, means, log-scales
of each component), an offset o and a gain g: after the transform above, x' = x * (1 + g/64) + o/64. A slot
then takes C x (4 + 6K) signed bytes, ordered channel, (a, b, d, t, o_1..o_3K, g_1..g_3K). The encoder fits
them in float64 (``_offsets``) and rounds them; the bits depend only on the stored integers, so every decoder
computes the same.
"""

from __future__ import annotations

import numpy as np
import torch

from .container import Reader, write_varint
from .errors import CorruptFileError
from .priors import PARAM_FRAC, IntMixture, adapt_int, nll_bits, one_thread, quantize

UNIT = 64  # parameters are integers in units of 1/UNIT
LIMITS = ((-48, 64), (-127, 127), (-48, 64), (-48, 64))  # ranges the encoder searches for a, b, d, t
FIT_SYMBOLS = 2048  # the search sees at most about this many symbols of a stream
MIN_SYMBOLS = 4096  # smaller slots are not fitted: at ~0.1 bit saved per symbol they cannot pay for 12 bytes
STEPS = (16, 8, 4, 2, 1)
MARGIN_BITS = 16  # a slot must save this much more than its parameters cost
MIN_GAIN = 66  # a search step must save at least this many 2**-16 bits (about 1e-3 bits)

OFFSET_LIMIT = 127  # per-component offsets (version 6): integers in units of 1/UNIT, |o| <= 127
GAIN_LIMITS = (-48, 64)  # per-component gains (version 6), as the 4-parameter factors
OFFSET_STEPS = 60  # Adam steps of the offsets' float fit (by default)
OFFSET_LR = 0.05

Params = dict[tuple[int, int], torch.Tensor]  # (level, slot) -> (C, 4) int64, or (C, 4 + 6K) in version 6


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


def _search(q: np.ndarray, z: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy integer search for C streams at once: quantised parameters q (C, 3K, m), symbols z (C, m) ->
    parameters (C, 4) and each stream's saving on these symbols in units of 2**-16 bits (C,).

    Per stream, for each step s of STEPS: move to the best of the 8 neighbours p +- s e_i (clamped to LIMITS)
    while that saves at least MIN_GAIN, at most 32 times; the cost is IntMixture.ideal_length, so every
    comparison is between integers and every machine makes the same choices (ties: the first candidate)."""
    C, _, m = q.shape
    lo = np.array([lim[0] for lim in LIMITS], dtype=np.int64)
    hi = np.array([lim[1] for lim in LIMITS], dtype=np.int64)
    eye = np.concatenate([np.eye(4, dtype=np.int64), -np.eye(4, dtype=np.int64)])  # (8, 4)

    def costs(qs, zs):  # qs (c, r, 3K, m) zs (c, m) -> (c, r)
        c, r = qs.shape[:2]
        flat = np.moveaxis(qs, 2, 0).reshape(3 * K, -1)
        bits = IntMixture.from_quantized(flat, K).ideal_length(np.broadcast_to(zs[:, None], (c, r, m)).reshape(-1))
        return bits.reshape(c, r, m).sum(2)

    # each candidate moves one of a, b (log-scales), d (means), t (logits): only that part of the mixtures is
    # rebuilt, the others are the current point's (the same integers as adapt_int and IntMixture._parts)
    lg, mu, ls = (np.moveaxis(q[:, i * K : (i + 1) * K], 1, 0)[:, :, None] for i in range(3))  # (K, C, 1, m)
    moved = [[0, 1, 4, 5], [2, 6], [3, 7]]  # candidates (rows of eye) that move a or b, d, t

    def candidate_costs(act: np.ndarray, cands: np.ndarray) -> np.ndarray:  # cands (c, 8, 4) -> (c, 8)
        def scales(P):  # P (c, r, 4) -> (K, c, r, m); likewise means, weights
            a, b = P[None, :, :, 0, None], P[None, :, :, 1, None]
            return IntMixture.scale_idx_of(((ls[:, act] * (64 + a)) >> 6) + (b << (PARAM_FRAC - 6)))

        def means(P):
            return IntMixture.means_of((mu[:, act] * (64 + P[None, :, :, 2, None])) >> 6)

        def weights(P):
            return IntMixture.weights_of((lg[:, act] * (64 + P[None, :, :, 3, None])) >> 6)

        parts = []
        for rows, make in zip(moved, (scales, means, weights)):
            full = np.repeat(make(p[act, None]), 8, axis=2)  # the current point's, for every candidate
            full[:, :, rows] = make(cands[:, rows])
            parts.append(full.reshape(K, -1))
        c = len(act)
        bits = IntMixture.from_parts(parts[2], parts[1], parts[0]).ideal_length(
            np.broadcast_to(z[act, None], (c, 8, m)).reshape(-1)
        )
        return bits.reshape(c, 8, m).sum(2)

    p = np.zeros((C, 4), dtype=np.int64)
    base = costs(q[:, None], z)[:, 0]
    cur = base.copy()
    for s in STEPS:
        active = np.ones(C, dtype=bool)
        for _ in range(32):
            act = np.flatnonzero(active)
            cands = np.clip(p[act, None, :] + s * eye, lo, hi)  # (c, 8, 4)
            f = candidate_costs(act, cands)
            i = np.argmin(f, 1)
            best = f[np.arange(len(act)), i]
            better = best <= cur[act] - MIN_GAIN
            p[act[better]] = cands[better, i[better]]
            cur[act[better]] = best[better]
            active[act[~better]] = False
            if not active.any():
                break
    return p, base - cur


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
    x (1 + g) + o; a float64 fit (Adam on the mixture's NLL, from 0), rounded. Only the encoder runs it; the
    decoder reads the integers, so the file decodes the same anywhere (another kind of CPU may round a float
    differently and so choose other integers: a different file, as valid)."""
    C = q.shape[0]
    base = torch.from_numpy(adapt_int(q, p[:, :, None], K, axis=1)).double() * 2.0**-PARAM_FRAC
    raw = base.reshape(1, C * 3 * K, -1, 1)
    zs = torch.from_numpy(z).double().reshape(1, C, -1, 1)
    o = torch.zeros(1, C * 3 * K, 1, 1, dtype=torch.float64, requires_grad=True)
    g = torch.zeros(1, C * 3 * K, 1, 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([o, g], lr=OFFSET_LR)
    with torch.enable_grad(), one_thread():  # the same choices at any thread count (on one kind of CPU)
        for _ in range(steps):
            opt.zero_grad()
            nll_bits(zs, raw * (1 + g) + o, K).backward()
            opt.step()
    o = torch.round(o.detach() * UNIT).clamp(-OFFSET_LIMIT, OFFSET_LIMIT).long()
    g = torch.round(g.detach() * UNIT).clamp(*GAIN_LIMITS).long()
    return torch.cat([o.view(C, 3 * K), g.view(C, 3 * K)], 1).numpy()


def _lengths(q: np.ndarray, z: np.ndarray, p: np.ndarray, K: int) -> np.ndarray:
    """Integer code length (2**-16 bits) of each of C streams (q (C, 3K, m), z (C, m)) under adaptation p."""
    C, _, m = q.shape
    qq = adapt_int(q, p[:, :, None], K, axis=1)
    flat = np.moveaxis(qq, 1, 0).reshape(3 * K, -1)
    return IntMixture.from_quantized(flat, K).ideal_length(z.reshape(-1)).reshape(C, m).sum(1)


def fit_slot(
    segments: list[tuple[torch.Tensor, list[torch.Tensor]]],
    C: int,
    K: int,
    symbols: int = FIT_SYMBOLS,
    offsets: int = 0,
    steps: int = OFFSET_STEPS,
) -> torch.Tensor | None:
    """(C, 4) parameters for one slot of a level from its passes [(symbols (B, C, ...), per-channel mixture
    parameters)], searched on about ``symbols`` of each stream's symbols, or None where adapting it would
    not pay for its bytes. ``offsets`` > 0 (version 6): (C, 4 + 6K) parameters, the last 6K per-component
    offsets and gains (``_offsets``) fitted on about that many symbols in ``steps`` steps (zero in a channel
    where they do not save bits on them)."""
    if sum(z.numel() for z, _ in segments) < MIN_SYMBOLS:
        return None

    def sample(size: int) -> tuple[np.ndarray, np.ndarray, int]:  # (C, 3K, m) parameters, (C, m) symbols, n
        s = [_streams([r[c] for _, r in segments], [z[:, c : c + 1] for z, _ in segments], K, size) for c in range(C)]
        return np.stack([x[0] for x in s]), np.stack([x[1] for x in s]), s[0][2]

    q, z, n = sample(symbols)
    p, saved = _search(q, z, K)
    if offsets:
        q, z, n = sample(offsets)
        with_o = np.concatenate([p, _offsets(q, z, p, K, steps)], 1)
        before, after = _lengths(q, z, p, K), _lengths(q, z, with_o, K)
        p = np.where((after < before)[:, None], with_o, np.pad(p, ((0, 0), (0, 6 * K))))
        saved = _lengths(q, z, np.zeros_like(p[:, :4]), K) - np.minimum(before, after)
    return torch.from_numpy(p) if int(saved.sum()) * n // z.shape[1] > (8 * p.size + MARGIN_BITS) << 16 else None


def to_bytes(params: Params, C: int) -> bytes:
    out = bytearray(write_varint(sum(1 << (3 * level + j) for level, j in params)))
    for key in sorted(params):
        out += params[key].to(torch.int8).numpy().tobytes()
    return bytes(out)


def from_bytes(data: bytes, levels: int, C: int, width: int = 4) -> tuple[Params, int]:
    """The block at the start of a tile stream: (parameters, bytes it took); ``width`` parameters per channel
    (4, or 4 + 6K in version 6)."""
    r = Reader(data, "tile stream")
    mask = r.varint()
    if mask >> (3 * levels):
        raise CorruptFileError("invalid adaptation block")
    params = {}
    for bit in range(3 * levels):
        if mask >> bit & 1:
            block = bytearray(r.take(width * C))
            params[bit // 3, bit % 3] = torch.frombuffer(block, dtype=torch.int8).long().view(C, width)
    return params, r.pos
