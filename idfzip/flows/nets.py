"""Small convolutional networks with two evaluation modes.

``forward``  float32, differentiable: used for training only.
``exact``    float64 fixed point: used whenever bits are coded. This is the one interface through which
             network arithmetic reaches the coder.

Why ``exact`` is bit-exact on every machine, thread count and tile grouping: weights are rounded to
multiples of 2**-WEIGHT_FRAC_BITS (2**-LINEAR_FRAC_BITS in the linear branch) with magnitude below
2**WEIGHT_INT_BITS, inputs are integers (scaled by 2**-IN_SHIFT in the residual branch), and every hidden
activation is floored to a multiple of 2**-ACT_FRAC_BITS and clamped to +-2**ACT_INT_BITS. Every product
and every partial sum is then a multiple of a known power of two whose magnitude stays below 2**53
(checked in ``ConvNet.__init__``), so IEEE float64 computes them without any rounding, in any summation
order, with or without FMA, on CPU or GPU. The network output is therefore an exact function of the
integer input, and spatial chunking (``exact`` works in horizontal strips of rows) cannot change it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IN_SHIFT = 6  # the residual branch sees integer inputs times 2**-6; the linear branch sees them as they are
INPUT_CLAMP = 2.0**16  # integer inputs are clamped to +-2**16 first
LINEAR_FRAC_BITS = 24  # the linear branch (integer inputs) keeps finer weights: its outputs are rounded
WEIGHT_FRAC_BITS = 14
WEIGHT_INT_BITS = 4  # |w| < 16
ACT_FRAC_BITS = 12
ACT_INT_BITS = 12  # hidden activations in [-4096, 4096]
_MANTISSA = 53
# Memory: glibc keeps buffers below 32 MB on the heap and reuses them; larger ones are mapped and faulted in
# anew on every call, which can cost more than the arithmetic. So ``exact`` runs the network on strips of
# about STRIP_POSITIONS positions (each with a halo of rows: its activations stay near 12 MB), and each k x k
# convolution in it on sub-strips whose unfolded input (positions x in_channels * k * k) stays near STRIP_BYTES.
STRIP_POSITIONS = 1 << 15
STRIP_BYTES = 3 << 23


def _quantize_weight(w: torch.Tensor, frac_bits: int = WEIGHT_FRAC_BITS) -> torch.Tensor:
    scale = float(1 << frac_bits)
    q = torch.floor(w.detach().double() * scale + 0.5) / scale
    limit = float(1 << WEIGHT_INT_BITS)
    if q.abs().max().item() >= limit:
        raise ValueError(f"weight magnitude {q.abs().max().item():.3f} exceeds the fixed-point range {limit}")
    return q


def _conv_strips(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, w, b, padding=k // 2)``, computed in horizontal strips of output rows (each from its rows
    of input and k // 2 rows either side); exact arithmetic makes the result independent of the strips."""
    B, c_in, H, W = x.shape
    k = w.shape[-1]
    pad = k // 2
    rows = max(1, STRIP_BYTES // (8 * B * W * c_in * k * k) - 2 * pad)
    if rows >= H or k == 1:
        return F.conv2d(x, w, b, padding=pad)
    xp = F.pad(x, (0, 0, pad, pad))  # the zero rows the convolution's padding would add
    out = torch.empty(B, w.shape[0], H, W, dtype=x.dtype, device=x.device)
    for r0 in range(0, H, rows):
        r1 = min(H, r0 + rows)
        out[:, :, r0:r1] = F.conv2d(xp[:, :, r0 : r1 + 2 * pad], w, b, padding=(0, pad))
    return out


_ACT_MAX = float(1 << (ACT_INT_BITS + ACT_FRAC_BITS))  # the activation clamp in units of 2**-ACT_FRAC_BITS


def _hidden_stack(a: torch.Tensor, hidden: list, w_out: torch.Tensor, b_out: torch.Tensor) -> torch.Tensor:
    """The 3x3 hidden layers and the 1x1 output layer of a ConvNet on activations ``a`` (B, C, H, W) in units
    of 2**-ACT_FRAC_BITS, as float64 matrix products in a channels-last layout (about twice the rate of
    float64 ``conv2d``, which has no optimised CPU kernel).

    Each image lives in a flat buffer of (H + 3) x (W + 2) positions by C channels: a zero row, the image rows
    each with one zero column either side, two zero rows. A 3x3 convolution is then nine products of
    contiguous row ranges of that buffer (offset dy * (W + 2) + dx) with (C, C_out) weight slices; the output
    row r, column j lands at flat position (r + 1) * (W + 2) + j + 1 of the next buffer, which is its padded
    place, and the two columns computed past each row's end (sums of real entries, bounded like the rest) are
    set to zero, becoming the next layer's padding. Sums are exact in any order (module docstring), so the
    result is that of ``F.conv2d``."""
    B, C, H, W = a.shape
    Wp = W + 2
    n = H * Wp
    out = torch.empty(B, w_out.shape[1], H, W, dtype=a.dtype, device=a.device)
    for i in range(B):
        src = a.new_zeros((H + 3) * Wp, C)
        src.view(H + 3, Wp, C)[1 : H + 1, 1 : W + 1] = a[i].permute(1, 2, 0)
        dst = torch.zeros_like(src) if hidden else src
        for w, b in hidden:
            y = dst[Wp + 1 : Wp + 1 + n]
            torch.addmm(b, src[:n], w[0], out=y)
            for k in range(1, 9):
                off = (k // 3) * Wp + k % 3
                y.addmm_(src[off : off + n], w[k])
            y.floor_().clamp_(0, _ACT_MAX)
            y.view(H, Wp, C)[:, W:] = 0
            src, dst = dst, src
        r = torch.addmm(b_out, src[Wp + 1 : Wp + 1 + n], w_out)
        out[i] = r.view(H, Wp, -1)[:, :W].permute(2, 0, 1)
    return out


class ConvNet(nn.Module):
    """t(x) = linear(x) + residual(x), both convolutions over the same input.

    ``linear`` is a single kernel x kernel convolution (a lifting filter when initialised as one);
    ``residual`` is ``layers`` ReLU convolutions (3x3) of ``hidden`` channels and a 1x1 output layer,
    zero-initialised so that a fresh net equals its linear part. ``hidden == 0`` means linear only.
    Input: integer-valued tensor (B, in_ch, H, W). Output: (B, out_ch, H, W). No per-position parameters.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        hidden: int,
        layers: int = 2,
        kernel: int = 3,
        linear: bool = True,
        zero_out: bool = True,
    ):
        super().__init__()
        self.in_ch, self.out_ch, self.hidden, self.kernel = in_ch, out_ch, hidden, kernel
        self.linear = nn.Conv2d(in_ch, out_ch, kernel, padding=kernel // 2) if linear else None
        if self.linear is not None:
            nn.init.zeros_(self.linear.weight)
            nn.init.zeros_(self.linear.bias)
        convs = []
        if hidden > 0:
            c = in_ch
            for _ in range(layers):
                convs.append(nn.Conv2d(c, hidden, 3, padding=1))
                c = hidden
            out = nn.Conv2d(c, out_ch, 1)
            if zero_out:
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
            convs.append(out)
        self.convs = nn.ModuleList(convs)
        self._check_ranges()
        self._frozen: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._stack: tuple | None = None  # the residual branch's weights as ``exact`` uses them (``freeze``)

    def _check_ranges(self) -> None:
        # bits needed by the worst sum of each layer: |a| * |w| * terms, on the finest grid involved
        in_int = math.log2(INPUT_CLAMP)
        layers = []  # (conv, input integer bits, input fractional bits)
        if self.linear is not None:
            layers.append((self.linear, in_int, LINEAR_FRAC_BITS - WEIGHT_FRAC_BITS))
        for i, conv in enumerate(self.convs):
            layers.append((conv, in_int - IN_SHIFT, IN_SHIFT) if i == 0 else (conv, ACT_INT_BITS, ACT_FRAC_BITS))
        for conv, a_int, a_frac in layers:
            terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            bits = a_int + WEIGHT_INT_BITS + math.ceil(math.log2(terms + 1)) + a_frac + WEIGHT_FRAC_BITS
            if bits > _MANTISSA:
                raise ValueError(f"a layer needs {bits} bits; exact float64 evaluation allows {_MANTISSA}")

    @property
    def halo(self) -> int:
        """Rows of context each side that one output row depends on."""
        h = self.kernel // 2 if self.linear is not None else 0
        return max(h, len(self.convs) - 1 if self.convs else 0)

    # ---------------------------------------------------------------- training path (float32)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x, -INPUT_CLAMP, INPUT_CLAMP)
        out = self.linear(x) if self.linear is not None else 0.0
        if self.convs:
            h = x * 2.0**-IN_SHIFT
            lim = float(1 << ACT_INT_BITS)
            for conv in self.convs[:-1]:
                h = torch.clamp(F.relu(conv(h)), max=lim)
            out = out + self.convs[-1](h)
        return out

    # ---------------------------------------------------------------- coding path (exact float64)
    def freeze(self, device: torch.device | str = "cpu") -> None:
        """Quantise the weights for ``exact`` (on ``device``); call again after the weights change."""
        self._frozen = [(_quantize_weight(c.weight), _quantize_weight(c.bias)) for c in self.convs]
        if self.linear is not None:
            lin = self.linear
            self._frozen.insert(0, (_quantize_weight(lin.weight, LINEAR_FRAC_BITS), _quantize_weight(lin.bias)))
        self._frozen = [(w.to(device), b.to(device)) for w, b in self._frozen]
        self._stack = None
        if len(self.convs) > 1:
            # The hidden layers work on activations in units of 2**-ACT_FRAC_BITS (integers), so each layer's
            # weights and bias are scaled by powers of two: every product and sum is the same real number as
            # in the plain formula, and the activation is floor + clamp with no scaling pass.
            s = float(1 << ACT_FRAC_BITS)
            frozen = self._frozen[1:] if self.linear is not None else self._frozen
            w0, b0 = frozen[0]
            first = (w0 * (s * 2.0**-IN_SHIFT), b0 * s)
            hidden = [(w.permute(2, 3, 1, 0).reshape(9, w.shape[1], w.shape[0]), b * s) for w, b in frozen[1:-1]]
            w, b = frozen[-1]
            last = (w[:, :, 0, 0].t() / s, b)
            self._stack = (first, hidden, last)

    def _exact(self, x: torch.Tensor) -> torch.Tensor:
        frozen = self._frozen
        x = torch.clamp(x, -INPUT_CLAMP, INPUT_CLAMP)
        out = _conv_strips(x, *frozen[0]) if self.linear is not None else None
        if self._stack is not None:
            (w0, b0), hidden, last = self._stack
            a = _conv_strips(x, w0, b0).floor_().clamp_(0, _ACT_MAX)
            r = _hidden_stack(a, hidden, *last)
        elif self.convs:
            w, b = frozen[-1]
            r = F.conv2d(x * 2.0**-IN_SHIFT, w, b)
        else:
            return out
        return r if out is None else out.add_(r)

    @torch.no_grad()
    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """Exact float64 evaluation of integer-valued ``x`` (any float or int dtype), in strips of rows."""
        if self._frozen is None or self._frozen[0][0].device != x.device:
            self.freeze(x.device)
        x = x.double()
        if x.is_cuda:  # cuDNN may pick FFT/Winograd algorithms, which are not exact: use plain GEMM kernels
            with torch.backends.cudnn.flags(enabled=False):
                return self._exact_strips(x)
        return self._exact_strips(x)

    def _exact_strips(self, x: torch.Tensor) -> torch.Tensor:
        """``_exact`` on strips of rows, each with the rows either side its outputs depend on."""
        B, _, H, W = x.shape
        rows = max(1, STRIP_POSITIONS // max(1, B * W))
        if rows >= H:
            return self._exact(x)
        halo = self.halo
        out = torch.empty(B, self.out_ch, H, W, dtype=torch.float64, device=x.device)
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            a, b = max(0, r0 - halo), min(H, r1 + halo)
            out[:, :, r0:r1] = self._exact(x[:, :, a:b])[:, :, r0 - a : r0 - a + (r1 - r0)]
        return out
