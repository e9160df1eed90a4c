"""Entropy coding of integer latents with constriction's rANS stack coder. The only importer of constriction.

A *segment* is an array of integer symbols with one mixture each (:class:`~idfzip.priors.IntMixture`, or
for files before version 4 :class:`~idfzip.priors.FloatMixture`). Within a segment the symbols are split by
window width class (ascending), each class coded in position order in chunks (version 4 on: of at most
MAX_CHUNK symbols), under ``Categorical(perfect=False)`` tables built by the mixture; a symbol outside its
window is coded as the escape entry. Version 4 has two stages: every symbol is first coded in its narrow *core* window
(``IntMixture.table``), then the symbols that escaped it in their wider *tail* window (``tail_table``, the
mixture outside the core, renormalised), grouped by tail width class in position order; versions 1-3 have one
window. What escapes the last stage is sent raw as two 16-bit uniform symbols after all the categorical
symbols of the segment. The decoder rebuilds exactly the same chunks in the same order, so the tables it
builds are the encoder's. *Split windows* (versions 8-10): a core window of a width with a stride g > 1
(priors.STRIDES) is coded as its bucket of g entries (``IntMixture.table`` with the stride, the escape as
before), and after the core stage of every class, the symbols of the split classes that did not escape are
coded within their buckets (``inner_table``), class by class in position order: about 2 sqrt(w) table entries
per symbol instead of w + 1, at the same bits to within rounding.

(The version-4 encoder does not build the core stage's tables: it codes each symbol under a 3-entry row with
the same cumulative frequency and frequency, ``IntMixture.symbol_rows`` and ``inner_rows``, which moves the
coder's state exactly as the whole table would.)

ANS is a stack: segments must be pushed to :class:`Encoder` in the reverse of the order in which
:class:`Decoder` pops them.

Bounded work (version 4, ``portable``): the encoder first pushes a 32-bit sentinel, which lifts the coder's
state to SENTINEL_VALID_BITS valid bits; no later push lowers it, so a decoder that finds fewer valid bits
before a chunk has read past the stream's end and stops with CorruptFileError. As every integer table keeps
each symbol's probability at most 1 - 2**-8 (priors.MAX_FREQ), each symbol costs the stream at least
MIN_SYMBOL_BITS, so a stream of b bits can hold at most ``max_symbols(b)`` symbols.

constriction's bit stream depends on its version and on ``perfect=False``: the version is pinned in
pyproject.toml and ``perfect=False`` is always passed explicitly.
"""

from __future__ import annotations

from contextlib import nullcontext

import constriction
import numpy as np
import torch

from .errors import CorruptFileError
from .priors import PROB_BITS, STRIDES, WIDTHS, FloatMixture, IntMixture, one_thread

_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_U16 = constriction.stream.model.Uniform(1 << 16)
_RAW_BIAS = 1 << 31
TABLE_ENTRIES = 1 << 20  # a chunk's table holds at most about this many probabilities (versions 1-3) ...
PORTABLE_TABLE_ENTRIES = 1 << 16  # ... (version 4)
SENTINEL = np.array([0x4944, 0x465A], dtype=np.int32)  # "IDFZ": pushed first, so popped last
# Each push with a table entry of at most 2**24 - 2**16 onto a state >= 2**32 multiplies the state by at least
# 1 + 2**-8 * 256/257: log2 of that is 0.005603 bits, so a stream of b bits holds at most 178.5 (b + 64)
# symbols (64: the final state), plus at most one chunk that a decoder pops below the sentinel's level.
SYMBOLS_PER_BIT = 180
MIN_SYMBOL_BITS = 1 / SYMBOLS_PER_BIT
MAX_CHUNK = max(64, PORTABLE_TABLE_ENTRIES // (WIDTHS[0] + 1))
_WIDTHS = np.array(WIDTHS, dtype=np.int64)  # per width class: its width and split windows' stride
_STRIDES = np.array([STRIDES[w] for w in WIDTHS], dtype=np.int64)

Mixture = FloatMixture | IntMixture


def max_symbols(stream_bytes: int) -> int:
    """The most symbols a version-4 stream of this many bytes can hold (decoders refuse more up front)."""
    return SYMBOLS_PER_BIT * (8 * stream_bytes + 64) + MAX_CHUNK


def _sentinel_bits() -> int:
    c = constriction.stream.stack.AnsCoder()
    c.encode_reverse(SENTINEL, _U16)
    return c.num_valid_bits()


def _chunks(n: int, entries_per_symbol: int, portable: bool):
    """Chunks of a class of n symbols whose tables have ``entries_per_symbol`` entries (the float tables of
    versions 1-3 depend on their chunks: those stay as they were)."""
    if not portable:
        step = max(64, TABLE_ENTRIES // entries_per_symbol)
    else:
        step = min(MAX_CHUNK, max(64, PORTABLE_TABLE_ENTRIES // entries_per_symbol))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


# Positions, centres, classes and symbols are numpy int64 arrays inside the coders (torch's per-call cost on
# these small per-chunk steps was about 8% of a decode); only the float mixtures of versions 1-3 take tensors.


def _plan(cls: np.ndarray, rows: np.ndarray | None = None):
    """Per width class present, ascending: (width, positions ascending) of ``rows`` (default: all)."""
    rows = np.arange(len(cls)) if rows is None else rows
    c = cls[rows]
    return [(WIDTHS[k], rows[c == k]) for k in np.unique(c).tolist()]


def _tables(mix: Mixture, plan, entries_per_symbol, make):
    """(positions, width, table) of every chunk of a stage, in coding order: ``make(part, p, width)`` builds
    the table of the chunk's positions p (mixture ``part``); ``entries_per_symbol(width)`` sizes the chunks."""
    for width, pos in plan:
        sub = mix.take(pos if mix.portable else torch.from_numpy(pos))
        for a, b in _chunks(len(pos), entries_per_symbol(width), mix.portable):
            p = pos[a:b]
            yield p, width, make(sub.take(slice(a, b) if mix.portable else torch.arange(a, b)), p, width)


def _core_tables(mix: Mixture, centre: np.ndarray):
    """``make`` for the tables of a one-step core stage (``_tables``)."""
    if mix.portable:
        return lambda part, p, w: part.table(centre[p], w)
    return lambda part, p, w: part.table(torch.from_numpy(centre[p]), w)


def _windows(mix: Mixture):
    """centre and core class per symbol, and (version 4) a function of positions that gives an array of every
    symbol's class holding their tail classes (the tail stage's symbols are few: only theirs are computed);
    versions 1-3 have one window (None)."""
    if not mix.portable:
        centre, cls = mix.windows()
        return centre.numpy(), cls.numpy(), None
    centre, core = mix._core_windows()

    def tails(pos: np.ndarray) -> np.ndarray:
        cls = core.copy()
        cls[pos] = mix._tails(centre, core, pos)
        return cls

    return centre, core, tails


def _offsets(z: np.ndarray, centre: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """The entries of symbols z[pos] in windows of ``width`` around their centres, ``width`` (the escape) if
    outside."""
    off = z[pos] - centre[pos] + width // 2
    return np.where((off < 0) | (off >= width), width, off)


def _escaped(escaped: list[np.ndarray], mix: Mixture) -> np.ndarray:
    """Positions that escaped a stage, ascending (versions 1-3: in width class order, then ascending)."""
    esc = np.concatenate(escaped) if escaped else np.zeros(0, dtype=np.int64)
    return np.sort(esc) if mix.portable else esc


def _threads(mix: Mixture):
    """Float tables (and their windows) need torch on one thread (see priors.one_thread)."""
    return nullcontext() if mix.portable else one_thread()


class Encoder:
    def __init__(self, portable: bool = True, split: bool = False) -> None:
        """``portable``: a version-4 stream (sentinel first, integer tables only); ``split``: with split windows
        (versions 8-10, the module docstring)."""
        self._coder = constriction.stream.stack.AnsCoder()
        self.portable = portable
        self.split = split
        self.bits = 0.0  # ideal code length of everything pushed (the model's NLL under the coding tables)
        if portable:
            self._coder.encode_reverse(SENTINEL, _U16)

    def push(self, z: torch.Tensor, mix: Mixture) -> None:
        """Encode the symbols z (any shape, flattened) of one segment."""
        if mix.portable != self.portable:
            raise ValueError("mixture kind does not match the stream")
        with _threads(mix):
            self._push(z, mix)

    def _counted(self, probs: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A chunk of 3-entry rows (``IntMixture.symbol_rows``), its code length added to ``bits``."""
        f = probs[np.arange(len(i)), i].astype(np.float64) + 1
        self.bits -= float(np.log2(f / (1 << PROB_BITS)).sum())
        return i, probs

    def _core(self, z, mix, centre, core) -> tuple[list, list[np.ndarray]]:
        """The core stage, each symbol under its own 3-entry row (no whole tables), then with split windows
        the second step of the symbols that did not escape their buckets; and the positions that escaped. Every
        class at once, in coding order (class, then position: a stable sort by core class). The rows are
        computed in position order and then put in coding order (a row is 16 bytes, a mixture 72)."""
        if not len(core):
            return [], []
        order = np.argsort(core, kind="stable")
        width = _WIDTHS[core]
        stride = (_STRIDES if self.split else np.ones_like(_WIDTHS))[core]
        off = z - centre + width // 2
        inside = (off >= 0) & (off < width)
        s = np.where(inside, off, width) // stride
        probs, i = mix.symbol_rows(centre, width, s, stride)
        ops = [self._counted(probs[order], i[order])]
        keep = order[inside[order] & (stride[order] > 1)]  # in coding order
        if len(keep):
            rows = mix.take(keep).inner_rows(centre[keep], width[keep], stride[keep], s[keep], off[keep] % stride[keep])
            ops.append(self._counted(*rows))
        return ops, [order[~inside[order]]]

    def _stage(self, z, mix, centre, plan, make) -> tuple[list, list[np.ndarray]]:
        """Tables (``make``, as for ``_tables``) and symbols of a stage's chunks, and the positions that
        escaped."""
        ops = []
        entries = {width: _offsets(z, centre, pos, width) for width, pos in plan}
        escaped = [pos[entries[width] == width] for width, pos in plan]
        done = dict.fromkeys(entries, 0)
        for pos, width, probs in _tables(mix, plan, lambda w: w + 1, make):
            s = entries[width][done[width] : done[width] + len(pos)]
            done[width] += len(pos)
            if mix.portable:  # exactly what constriction codes
                p = torch.from_numpy((probs.numpy()[np.arange(len(pos)), s].astype(np.float64) + 1) / (1 << PROB_BITS))
            else:
                p = torch.clamp(probs[torch.arange(len(pos)), torch.from_numpy(s)] / probs.sum(1), min=2.0**-24)
            self.bits -= float(torch.log2(p).sum())
            ops.append((s.astype(np.int32), probs.numpy()))
        return ops, escaped

    def _push(self, z: torch.Tensor, mix: Mixture) -> None:
        z = z.reshape(-1).long().cpu().numpy()
        if len(z) != len(mix):
            raise ValueError("symbol count does not match the parameters")
        centre, core, tails = _windows(mix)
        if mix.portable:
            ops, escaped = self._core(z, mix, centre, core)
        else:
            ops, escaped = self._stage(z, mix, centre, _plan(core), _core_tables(mix, centre))
        esc = _escaped(escaped, mix)
        if tails is not None and len(esc):  # version 4: the escaped symbols' tail stage, then raw words
            tail = tails(esc)
            staged = esc[tail[esc] > core[esc]]
            tail_ops, escaped = self._stage(z, mix, centre, _plan(tail, staged), _tail_tables(centre, core))
            ops += tail_ops
            esc = np.sort(np.concatenate(escaped + [esc[tail[esc] == core[esc]]]))
        if len(esc):
            raw = z[esc] - centre[esc] + _RAW_BIAS
            if ((raw < 0) | (raw >= 1 << 32)).any():
                raise ValueError("latent out of the codable range")
            words = np.stack([raw >> 16, raw & 0xFFFF], 1).reshape(-1).astype(np.int32)
            self._coder.encode_reverse(words, _U16)
            self.bits += 32.0 * len(esc)
        for s, probs in reversed(ops):
            self._coder.encode_reverse(s, _CATEGORICAL, probs)

    def finish(self) -> bytes:
        return self._coder.get_compressed().astype("<u4").tobytes()


def _tail_tables(centre: np.ndarray, core: np.ndarray):
    """``make`` for the tail stage's tables (``_tables``), given every symbol's core width class."""
    core_width = _WIDTHS[core]
    return lambda part, p, width: part.tail_table(centre[p], core_width[p], width)


class Decoder:
    def __init__(self, data: bytes, portable: bool = True, split: bool = False) -> None:
        """``portable``: a version-4 stream; ``split``: with split windows (versions 8-10; the module
        docstring)."""
        self.portable = portable
        self.split = split
        if len(data) % 4:
            raise CorruptFileError("entropy-coded stream has a length that is not a multiple of 4")
        words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        try:
            self._coder = constriction.stream.stack.AnsCoder(words)
        except BaseException as e:  # noqa: BLE001 - constriction rejects some invalid streams outright
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise CorruptFileError(f"invalid entropy-coded stream ({e})") from None

    def pop(self, mix: Mixture) -> torch.Tensor:
        """Decode one segment: len(mix) symbols, in the order they were given to ``Encoder.push``."""
        if mix.portable != self.portable:
            raise ValueError("mixture kind does not match the stream")
        with _threads(mix):
            try:
                return self._pop(mix)
            except (CorruptFileError, KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - a Rust panic in constriction is a BaseException
                raise CorruptFileError(f"entropy-coded stream cannot be decoded ({e})") from None

    def _stage(self, z, mix, centre, plan, make, strides=None) -> list[np.ndarray]:
        """Decode a stage's chunks (tables from ``make``, as for ``_tables``) into z; the positions that escaped.
        ``strides`` (per width, split windows): z gets the first value of each symbol's bucket."""
        escaped = []
        stride = strides.get if strides else lambda w: 1
        for p, width, probs in _tables(mix, plan, lambda w: w // stride(w) + 1, make):
            self._check_left()
            s = self._coder.decode(_CATEGORICAL, probs.numpy()).astype(np.int64)
            g = stride(width)
            z[p] = centre[p] - width // 2 + s * g
            escaped.append(p[s == width // g])
        return escaped

    def _core(self, z, mix, centre, plan) -> list[np.ndarray]:
        """The core stage, then with split windows the second step of the symbols inside their buckets."""
        if not self.split:
            return self._stage(z, mix, centre, plan, _core_tables(mix, centre))
        escaped = self._stage(z, mix, centre, plan, lambda part, p, w: part.table(centre[p], w, STRIDES[w]), STRIDES)
        inner = [(w, pos[z[pos] - centre[pos] + w // 2 < w]) for w, pos in plan if STRIDES[w] > 1]

        def make(part, p, w):
            return part.inner_table(centre[p], w, STRIDES[w], (z[p] - centre[p] + w // 2) // STRIDES[w])

        for p, width, probs in _tables(mix, inner, STRIDES.get, make):
            self._check_left()
            z[p] += self._coder.decode(_CATEGORICAL, probs.numpy()).astype(np.int64)
        return escaped

    def _pop(self, mix: Mixture) -> torch.Tensor:
        z = np.empty(len(mix), dtype=np.int64)
        centre, core, tails = _windows(mix)
        escaped = self._core(z, mix, centre, _plan(core))
        esc = _escaped(escaped, mix)
        if tails is not None and len(esc):
            tail = tails(esc)
            staged = esc[tail[esc] > core[esc]]
            escaped = self._stage(z, mix, centre, _plan(tail, staged), _tail_tables(centre, core))
            esc = np.sort(np.concatenate(escaped + [esc[tail[esc] == core[esc]]]))
        if len(esc):
            self._check_left()
            w = self._coder.decode(_U16, 2 * len(esc)).astype(np.int64).reshape(-1, 2)
            z[esc] = centre[esc] + ((w[:, 0] << 16) | w[:, 1]) - _RAW_BIAS
        return torch.from_numpy(z)

    def _check_left(self) -> None:
        """Before each chunk of a version-4 stream: the sentinel has not been reached."""
        if self.portable and self._coder.num_valid_bits() < SENTINEL_VALID_BITS:
            raise CorruptFileError("entropy-coded stream ends before its tile is complete")

    def check_end(self) -> None:
        if self.portable:
            self._check_left()
            if not np.array_equal(self._coder.decode(_U16, 2), SENTINEL):
                raise CorruptFileError("entropy-coded stream does not end with its sentinel")
        if not self._coder.is_empty():
            raise CorruptFileError("entropy-coded stream has data left over after decoding")


SENTINEL_VALID_BITS = _sentinel_bits()
