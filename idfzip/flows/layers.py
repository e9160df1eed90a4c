"""Invertible integer layers: squeeze, channel permutation, additive couplings with rounding.

Every layer has ``forward`` (float32 with straight-through rounding, for training) and ``encode`` /
``decode`` (int64 tensors in, int64 out, exact; ``decode(encode(x)) == x`` for every integer x).
References: Hoogeboom et al. 2019 (Integer Discrete Flows), Tomczak 2020 (general invertible
transformations: the 4-partition coupling), Dinh et al. 2017 (squeeze).
"""

from __future__ import annotations

import torch
from torch import nn

from .nets import ConvNet

T_CLAMP = float(1 << 16)  # every translation is clamped to +-2**16 before rounding


def squeeze(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 2h, 2w) -> (B, 4C, h, w), partition-major: [x00 | x01 | x10 | x11], each C channels."""
    return torch.cat([x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]], 1)


def unsqueeze(y: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`squeeze`."""
    B, C4, h, w = y.shape
    C = C4 // 4
    x = y.new_empty(B, C, 2 * h, 2 * w)
    x[:, :, 0::2, 0::2] = y[:, 0:C]
    x[:, :, 0::2, 1::2] = y[:, C : 2 * C]
    x[:, :, 1::2, 0::2] = y[:, 2 * C : 3 * C]
    x[:, :, 1::2, 1::2] = y[:, 3 * C :]
    return x


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x + 0.5) - x).detach()


class Permute(nn.Module):
    """A fixed channel permutation, stored in the weights (never re-drawn)."""

    def __init__(self, perm: list[int]):
        super().__init__()
        p = torch.tensor(perm, dtype=torch.long)
        self.register_buffer("perm", p)
        self.register_buffer("inv", torch.argsort(p))

    def forward(self, x):
        return x[:, self.perm]

    encode = forward

    def decode(self, y):
        return y[:, self.inv]


class Coupling(nn.Module):
    """A sequence of additive coupling updates over channel groups.

    ``updates`` is a list of (target, sources): y[target] = x[target] + round(t(y[sources])) applied in
    order, each ``t`` a :class:`ConvNet` that sees the current values of its source channels (earlier
    targets already updated). Bipartite IDF coupling: one update ``(x_b, [x_a])``. 4-partition coupling
    (Tomczak 2020): four updates, each partition from the other three. Inversion runs the updates
    backwards, subtracting the same rounded translation, so it is exact for integer inputs.
    """

    def __init__(
        self, channels: int, updates: list[tuple[list[int], list[int]]], hidden: int, layers: int, kernel: int
    ):
        super().__init__()
        self.channels = channels
        self.targets = [list(t) for t, _ in updates]
        self.sources = [list(s) for _, s in updates]
        self.nets = nn.ModuleList(ConvNet(len(s), len(t), hidden, layers, kernel) for t, s in updates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for tgt, src, net in zip(self.targets, self.sources, self.nets):
            t = torch.clamp(net(x[:, src]), -T_CLAMP, T_CLAMP)
            x[:, tgt] = x[:, tgt] + round_ste(t)
        return x

    @staticmethod
    def _shift(net: ConvNet, x: torch.Tensor, src: list[int], integer: bool) -> torch.Tensor:
        t = torch.clamp(net.exact(x[:, src], integer), -T_CLAMP, T_CLAMP)
        return torch.floor(t + 0.5).long()

    @torch.no_grad()
    def encode(self, x: torch.Tensor, integer: bool = False) -> torch.Tensor:
        """``integer``: the networks in their integer mode (nets.py)."""
        x = x.clone()
        for tgt, src, net in zip(self.targets, self.sources, self.nets):
            x[:, tgt] += self._shift(net, x, src, integer)
        return x

    @torch.no_grad()
    def decode(self, y: torch.Tensor, integer: bool = False) -> torch.Tensor:
        y = y.clone()
        for tgt, src, net in reversed(list(zip(self.targets, self.sources, self.nets))):
            y[:, tgt] -= self._shift(net, y, src, integer)
        return y


def quad_updates(C: int) -> list[tuple[list[int], list[int]]]:
    """4-partition coupling over channel blocks p0..p3 of C channels: p_i from the other three."""
    blocks = [list(range(i * C, (i + 1) * C)) for i in range(4)]
    return [(blocks[i], sum((blocks[j] for j in range(4) if j != i), [])) for i in range(4)]


def bipartite_updates(C4: int) -> list[tuple[list[int], list[int]]]:
    """IDF coupling: the second half of the channels from the first half."""
    h = C4 // 2
    return [(list(range(h, C4)), list(range(h)))]


def init_lifting(coupling: Coupling, C: int) -> None:
    """Initialise a 4-partition coupling's linear filters to a 2D 5/3-style integer wavelet step.

    Slot order after the level's permutation is (d, b, c, a) = (x11, x01, x10, x00) of the squeeze.
    d <- d + (a + a_r + a_d + a_dr)/4 - (b + b_d)/2 - (c + c_r)/2      (diagonal detail, HH)
    b <- b - (a + a_r)/2                                               (horizontal detail)
    c <- c - (a + a_d)/2                                               (vertical detail)
    a <- a + (b + b_l + c + c_u)/4 + (d + d_l + d_u + d_ul)/16 ... scaled so a stays a local mean.
    Each net sees the other three slots in slot order; kernel taps are (row, col) offsets + 1.
    """
    d, b, c, a = 0, 1, 2, 3

    def tap(net: ConvNet, src_slot: int, srcs: list[int], dy: int, dx: int, val: float) -> None:
        k = srcs.index(src_slot)
        for ch in range(C):
            net.linear.weight.data[ch, k * C + ch, 1 + dy, 1 + dx] += val

    with torch.no_grad():
        n = coupling.nets
        tap(n[0], a, [b, c, a], 0, 0, 0.25)
        tap(n[0], a, [b, c, a], 0, 1, 0.25)
        tap(n[0], a, [b, c, a], 1, 0, 0.25)
        tap(n[0], a, [b, c, a], 1, 1, 0.25)
        tap(n[0], b, [b, c, a], 0, 0, -0.5)
        tap(n[0], b, [b, c, a], 1, 0, -0.5)
        tap(n[0], c, [b, c, a], 0, 0, -0.5)
        tap(n[0], c, [b, c, a], 0, 1, -0.5)
        tap(n[1], a, [d, c, a], 0, 0, -0.5)
        tap(n[1], a, [d, c, a], 0, 1, -0.5)
        tap(n[2], a, [d, b, a], 0, 0, -0.5)
        tap(n[2], a, [d, b, a], 1, 0, -0.5)
        for dy, dx in ((0, 0), (0, -1)):
            tap(n[3], b, [d, b, c], dy, dx, 0.25)
        for dy, dx in ((0, 0), (-1, 0)):
            tap(n[3], c, [d, b, c], dy, dx, 0.25)
        for dy, dx in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
            tap(n[3], d, [d, b, c], dy, dx, 1.0 / 16)


def init_rct(coupling: Coupling) -> None:
    """Initialise a 2-update colour coupling to JPEG 2000's reversible colour transform.

    Update 1: (R, B) <- (R - G, B - G); update 2: G <- G + (R' + B')/4, so the outputs are
    (V, Y, U) with Y = G + round((U + V)/4).
    """
    with torch.no_grad():
        n1, n2 = coupling.nets
        n1.linear.weight.data[0, 0, 0, 0] = -1.0
        n1.linear.weight.data[1, 0, 0, 0] = -1.0
        n2.linear.weight.data[0, 0, 0, 0] = 0.25
        n2.linear.weight.data[0, 1, 0, 0] = 0.25
