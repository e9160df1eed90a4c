"""Entropy coding of integer latents with constriction's rANS stack coder. The only importer of constriction.

A *segment* is an array of integer symbols with one :class:`~idfzip.priors.Mixture` each. Within a segment
the symbols are split by window width class (ascending), each class coded in position order in chunks of a
fixed number of symbols per table, under ``Categorical(perfect=False)`` tables built by ``Mixture.table``; a
symbol outside its window is coded as the escape entry and then sent raw as two 16-bit uniform symbols after
all the categorical symbols of the segment. The decoder rebuilds exactly the same chunks in the same order,
so the tables it builds are the encoder's.

ANS is a stack: segments must be pushed to :class:`Encoder` in the reverse of the order in which
:class:`Decoder` pops them.

constriction's bit stream depends on its version and on ``perfect=False``: the version is pinned in
pyproject.toml and ``perfect=False`` is always passed explicitly.
"""

from __future__ import annotations

import constriction
import numpy as np
import torch

from .errors import CorruptFileError
from .priors import WIDTHS, Mixture, one_thread

_CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
_U16 = constriction.stream.model.Uniform(1 << 16)
_RAW_BIAS = 1 << 31
TABLE_ENTRIES = 1 << 20  # a chunk's table holds at most about this many probabilities


def _chunks(n: int, width: int):
    step = max(64, TABLE_ENTRIES // (width + 1))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def _plan(mix: Mixture):
    """Per width class present: (width, positions). Both sides compute this from the parameters alone."""
    centre, cls = mix.windows()
    plan = []
    for k in torch.unique(cls).tolist():
        plan.append((WIDTHS[k], torch.nonzero(cls == k).flatten()))
    return centre, plan


class Encoder:
    def __init__(self) -> None:
        self._coder = constriction.stream.stack.AnsCoder()
        self.bits = 0.0  # ideal code length of everything pushed (the model's NLL under the coding tables)

    def push(self, z: torch.Tensor, mix: Mixture) -> None:
        """Encode the symbols z (any shape, flattened) of one segment."""
        with one_thread():
            self._push(z, mix)

    def _push(self, z: torch.Tensor, mix: Mixture) -> None:
        z = z.reshape(-1).long().cpu()
        if z.numel() != len(mix):
            raise ValueError("symbol count does not match the parameters")
        centre, plan = _plan(mix)
        ops = []
        escapes = []
        for width, pos in plan:
            off = z[pos] - centre[pos] + width // 2
            esc = (off < 0) | (off >= width)
            sym = torch.where(esc, torch.full_like(off, width), off)
            escapes.append(pos[esc])
            sub = mix.take(pos)
            for a, b in _chunks(len(pos), width):
                probs = sub.take(torch.arange(a, b)).table(centre[pos[a:b]], width)
                s = sym[a:b]
                p = torch.clamp(probs[torch.arange(b - a), s] / probs.sum(1), min=2.0**-24)
                self.bits -= float(torch.log2(p).sum())
                ops.append((s.numpy().astype(np.int32), probs.numpy()))
        esc_pos = torch.cat(escapes) if escapes else torch.zeros(0, dtype=torch.long)
        if esc_pos.numel():
            raw = z[esc_pos] - centre[esc_pos] + _RAW_BIAS
            if bool(((raw < 0) | (raw >= 1 << 32)).any()):
                raise ValueError("latent out of the codable range")
            words = torch.stack([raw >> 16, raw & 0xFFFF], 1).reshape(-1).numpy().astype(np.int32)
            self._coder.encode_reverse(words, _U16)
            self.bits += 32.0 * esc_pos.numel()
        for s, probs in reversed(ops):
            self._coder.encode_reverse(s, _CATEGORICAL, probs)

    def finish(self) -> bytes:
        return self._coder.get_compressed().astype("<u4").tobytes()


class Decoder:
    def __init__(self, data: bytes) -> None:
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
        with one_thread():
            return self._pop(mix)

    def _pop(self, mix: Mixture) -> torch.Tensor:
        n = len(mix)
        centre, plan = _plan(mix)
        z = torch.empty(n, dtype=torch.long)
        escapes = []
        try:
            for width, pos in plan:
                sub = mix.take(pos)
                for a, b in _chunks(len(pos), width):
                    probs = sub.take(torch.arange(a, b)).table(centre[pos[a:b]], width)
                    s = torch.from_numpy(self._coder.decode(_CATEGORICAL, probs.numpy()).astype(np.int64))
                    p = pos[a:b]
                    z[p] = centre[p] - width // 2 + s
                    escapes.append(p[s == width])
            esc_pos = torch.cat(escapes) if escapes else torch.zeros(0, dtype=torch.long)
            if esc_pos.numel():
                w = torch.from_numpy(self._coder.decode(_U16, 2 * esc_pos.numel()).astype(np.int64)).view(-1, 2)
                z[esc_pos] = centre[esc_pos] + ((w[:, 0] << 16) | w[:, 1]) - _RAW_BIAS
        except (CorruptFileError, KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - a Rust panic in constriction is a BaseException
            raise CorruptFileError(f"entropy-coded stream cannot be decoded ({e})") from None
        return z

    def check_end(self) -> None:
        if not self._coder.is_empty():
            raise CorruptFileError("entropy-coded stream has data left over after decoding")
