"""Per-tile adaptation of the priors: a few numbers the encoder fits to each tile and stores in the file.

A trained prior is a compromise over its training images; one photo is sharper or noisier, more or less
predictable than that average. For each level l, slot j and channel c the encoder may store four small
integers (a, b, d, t), in units of 1/64, that transform that stream's mixture parameters before coding:

    log-scales  s' = s * (1 + a/64) + b/64
    means       m' = m * (1 + d/64)          (after the channel-autoregressive shift)
    logits      w' = w * (1 + t/64)

The encoder fits them by a greedy integer search on the ideal code length of (a subsample of) the stream's
symbols, and adapts a slot only where the estimated saving exceeds the bytes its parameters take. The
decoder applies the same float64 operations, in the same order, to the same network outputs, so both build
identical tables. Block layout (docs/FORMAT.md): a varint mask (bit 3l + j: slot j of level l adapted), then
per adapted slot in mask order C x 4 signed bytes, ordered channel, (a, b, d, t).
"""

from __future__ import annotations

import torch

from .container import Reader, write_varint
from .errors import CorruptFileError
from .priors import LOG_SCALE_MAX, LOG_SCALE_MIN, one_thread

UNIT = 64  # parameters are integers in units of 1/UNIT
LIMITS = ((-48, 64), (-127, 127), (-48, 64), (-48, 64))  # ranges the encoder searches for a, b, d, t
FIT_SYMBOLS = 2048  # the search sees at most about this many symbols of a stream
MIN_SYMBOLS = 4096  # smaller slots are not fitted: at ~0.1 bit saved per symbol they cannot pay for 12 bytes
STEPS = (16, 8, 4, 2, 1)
MARGIN_BITS = 16.0  # a level must save this much more than its parameters cost

Params = dict[tuple[int, int], torch.Tensor]  # (level, slot) -> (C, 4) int64


def apply(raw: torch.Tensor, p: torch.Tensor | None, K: int) -> torch.Tensor:
    """One channel's mixture parameters raw (B, 3K, ...) [logits, means, log-scales] transformed by p = (a, b,
    d, t) (integers); None or zeros leave raw as it is."""
    if p is None or not bool(p.any()):
        return raw
    a, b, d, t = (float(v) / UNIT for v in p.tolist())
    return torch.cat([raw[:, :K] * (1.0 + t), raw[:, K : 2 * K] * (1.0 + d), raw[:, 2 * K :] * (1.0 + a) + b], 1)


def _bits(cands: torch.Tensor, logits, mu, log_s, z) -> torch.Tensor:
    """Ideal code length (bits) of symbols z (n,) under each candidate (m, 4) of the transform (float32; a
    logistic is symmetric, so each bin's mass is taken on the side of the mean where it is accurate)."""
    a, b, d, t = (cands[:, i].view(-1, 1, 1) / UNIT for i in range(4))
    inv_s = torch.exp(-torch.clamp(log_s * (1.0 + a) + b, LOG_SCALE_MIN, LOG_SCALE_MAX))
    dist = (z.view(1, -1, 1) - mu * (1.0 + d)).abs_()
    p = torch.sigmoid((0.5 - dist) * inv_s) - torch.sigmoid((-0.5 - dist) * inv_s)
    w = logits * (1.0 + t)
    w = torch.exp(w - w.amax(2, keepdim=True))  # softmax weights, unnormalised (torch.softmax is slow here)
    p = (p * w).sum(2) / w.sum(2)
    return -torch.log2(p.clamp_(min=1e-30)).sum(1)


def fit(raws: list[torch.Tensor], zs: list[torch.Tensor], K: int) -> tuple[torch.Tensor, float]:
    """Parameters (4,) int64 for one stream, given its segments' mixture parameters raws[i] (B, 3K, ...) and
    symbols zs[i] (B, 1, ...), and the estimated saving in bits over the whole stream."""
    r = torch.cat([x.detach().reshape(x.shape[0], 3 * K, -1).permute(0, 2, 1).reshape(-1, 3 * K) for x in raws])
    z = torch.cat([x.reshape(-1) for x in zs])
    n = len(z)
    if n > FIT_SYMBOLS:  # a fixed pseudo-random subsample (a strided one could see only a few image columns)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(n))[:FIT_SYMBOLS].to(z.device)
        r, z = r[pick], z[pick]
    r, z = r.float().cpu(), z.float().cpu()
    logits, mu, log_s = (r[None, :, i * K : (i + 1) * K].contiguous() for i in range(3))
    lo = torch.tensor([lim[0] for lim in LIMITS], dtype=torch.float32)
    hi = torch.tensor([lim[1] for lim in LIMITS], dtype=torch.float32)
    p = torch.zeros(4)
    base = cur = float(_bits(p[None], logits, mu, log_s, z)[0])
    eye = torch.eye(4)
    for s in STEPS:
        for _ in range(32):
            cands = torch.clamp(torch.cat([p + s * eye, p - s * eye]), lo, hi)
            f = _bits(cands, logits, mu, log_s, z)
            i = int(torch.argmin(f))
            if float(f[i]) >= cur - 1e-3:
                break
            p, cur = cands[i], float(f[i])
    return p.long(), (base - cur) * n / len(z)


def fit_slot(segments: list[tuple[torch.Tensor, list[torch.Tensor]]], C: int, K: int) -> torch.Tensor | None:
    """(C, 4) parameters for one slot of a level from its passes [(symbols (B, C, ...), per-channel mixture
    parameters)], or None where adapting it would not pay for its bytes."""
    if sum(z.numel() for z, _ in segments) < MIN_SYMBOLS:
        return None
    p = torch.zeros(C, 4, dtype=torch.long)
    saved = 0.0
    with one_thread():  # the same choices, so the same file, whatever the thread count
        for c in range(C):
            p[c], s = fit([raws[c] for _, raws in segments], [z[:, c : c + 1] for z, _ in segments], K)
            saved += s
    return p if saved > 8 * 4 * C + MARGIN_BITS else None


def to_bytes(params: Params, C: int) -> bytes:
    out = bytearray(write_varint(sum(1 << (3 * level + j) for level, j in params)))
    for key in sorted(params):
        out += params[key].to(torch.int8).numpy().tobytes()
    return bytes(out)


def from_bytes(data: bytes, levels: int, C: int) -> tuple[Params, int]:
    """The block at the start of a tile stream: (parameters, bytes it took)."""
    r = Reader(data, "tile stream")
    mask = r.varint()
    if mask >> (3 * levels):
        raise CorruptFileError("invalid adaptation block")
    params = {}
    for bit in range(3 * levels):
        if mask >> bit & 1:
            block = bytearray(r.take(4 * C))
            params[bit // 3, bit % 3] = torch.frombuffer(block, dtype=torch.int8).long().view(C, 4)
    return params, r.pos
