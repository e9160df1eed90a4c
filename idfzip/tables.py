"""Integer tables of exp, the logistic sigmoid and log2 for the portable (version 4) coding tables.

Invariant: every entry is an integer computed by an exact procedure (Python's ``decimal`` at 50 digits,
whose exp and ln are correctly rounded in software, then rounded half-even to an integer), never by the
platform's libm, so every machine builds the same tables. ``load`` builds them once per process and checks
their SHA-256 against ``TABLES_SHA256``: a build that would compute other tables fails with an error
instead of coding other probabilities. The tables never change within a container version.

    EXP[i]   = round(2**16 * exp(-i / 256))             i = 0 .. EXP_MAX      (mixture weights)
    SCALE[i] = round(2**12 * exp((i - 1024) / 256))     i = 0 .. 3328         (scale s for log-scale index i)
    INV[i]   = round(2**22 * exp(-(i - 1024) / 256))    i = 0 .. 3328         (1 / s)
    SIG[i]   = round(2**24 * sigmoid(i / 64))           i = 0 .. 1536         (logistic CDF, x in [0, 24])
    LOG2[i]  = round(2**16 * log2(1 + i / 1024))        i = 0 .. 1024         (code lengths, encoder only)
"""

from __future__ import annotations

import hashlib
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext
from functools import cache

import numpy as np

from .errors import IdfzipError

LOG_SCALE_UNIT = 256  # log-scale table index: log-scale in units of 1/256, offset by LOG_SCALE_OFFSET
LOG_SCALE_OFFSET = 1024  # log-scale -4 .. 9 -> index 0 .. 3328
LOG_SCALE_LAST = 3328
EXP_MAX = 16 * 256  # weights of components more than 16 nats below the largest logit are 0
SIG_FRAC = 6  # SIG is sampled every 2**-6 in x
SIG_LAST = 24 << SIG_FRAC
LOG2_FRAC = 10

TABLES_SHA256 = "498cf52e58c4383f37df5c8c1bbf30ad6ca74b09899d7ab3c8f3a07fb436bd85"


def _round(x: Decimal) -> int:
    return int(x.to_integral_value(rounding=ROUND_HALF_EVEN))


def _build() -> dict[str, list[int]]:
    with localcontext(Context(prec=50)):
        step = (Decimal(1) / LOG_SCALE_UNIT).exp()  # exp(1/256)
        lo = -(SIG_LAST * 4)  # exp(i/256) for i in [-6144, 2304]: sigmoid(i/64) needs exp(-4i/256)
        hi = LOG_SCALE_LAST - LOG_SCALE_OFFSET
        e = {0: Decimal(1)}
        for i in range(1, max(-lo, hi) + 1):
            e[i] = e[i - 1] * step
            e[-i] = 1 / e[i]
        one, two16, two22, two24 = Decimal(1), Decimal(1 << 16), Decimal(1 << 22), Decimal(1 << 24)
        ln2 = Decimal(2).ln()
        return {
            "EXP": [_round(two16 * e[-i]) for i in range(EXP_MAX + 1)],
            "SCALE": [_round(Decimal(1 << 12) * e[i - LOG_SCALE_OFFSET]) for i in range(LOG_SCALE_LAST + 1)],
            "INV": [_round(two22 * e[LOG_SCALE_OFFSET - i]) for i in range(LOG_SCALE_LAST + 1)],
            "SIG": [_round(two24 / (one + e[-4 * i])) for i in range(SIG_LAST + 1)],
            "LOG2": [
                _round(two16 * (Decimal((1 << LOG2_FRAC) + i) / (1 << LOG2_FRAC)).ln() / ln2)
                for i in range((1 << LOG2_FRAC) + 1)
            ],
        }


def digest(tables: dict[str, list[int]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tables):
        h.update(name.encode() + b":" + ",".join(map(str, tables[name])).encode() + b";")
    return h.hexdigest()


@cache
def load() -> dict[str, np.ndarray]:
    """The tables as int64 arrays (built once per process, checked against TABLES_SHA256), and derived from
    SIG: SIGF[i] = the logistic CDF at (i - 1536) / 64 for i = 0 .. 3072 (1 - sigmoid(-x) below 0) and
    SIGD[i] = SIGF[i + 1] - SIGF[i] (i < 3072; SIGD[3072] = 0), and both packed in SIGPACK."""
    tables = _build()
    if digest(tables) != TABLES_SHA256:
        raise IdfzipError("the integer coding tables of this installation are wrong (their hash does not match)")
    out = {k: np.array(v, dtype=np.int64) for k, v in tables.items()}
    sig = out["SIG"]
    out["SIGF"] = np.concatenate([(1 << 24) - sig[:0:-1], sig])
    out["SIGD"] = np.append(np.diff(out["SIGF"]), 0)
    if out["SIGD"][0] or out["SIGD"][-2]:
        raise IdfzipError("the logistic table does not saturate")
    out["SIGPACK"] = (out["SIGF"] << 20) | out["SIGD"]  # SIGD < 2**17
    for a in out.values():
        a.flags.writeable = False
    return out
