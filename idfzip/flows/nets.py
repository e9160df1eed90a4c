"""Small convolutional networks with a training mode and two exact modes.

``forward``               float32, differentiable: used for training only.
``exact(x, integer=True)``  integer arithmetic (container version 5): used whenever bits are coded with a
                          calibrated model. This and the next are the one interface through which network
                          arithmetic reaches the coder.
``exact(x)``              float64 fixed point (container versions 1-4, and models never calibrated).

Why the integer mode is exact on every machine: a calibrated net stores, per hidden channel, a power of two
2**act_exp (``calibrate``) and its hidden activations are integers 0..ACT_LEVELS in those units, rounded and
clamped; folding those powers of two into the weights is exact. The first 3x3 layer (integer inputs) runs in
float64 as below; each further layer's weights are integers below INT_WEIGHT_MAX on a power-of-two grid per
output channel, split into two int8 halves, and meet the activations (offset by -128 into int8) in int8 x int8
matrix products with int32 sums (``torch._int_mm`` on CPUs where it is fast; elsewhere, GPUs and CPUs without
VNNI-class int8 instructions, float32 products of the same int8 values, whose sums stay below 2**24 and so
are exact). Every sum is bounded below 2**31 (checked in ``freeze``), so the
result is the same integers in any summation order, on any instruction set, thread count or device. The
element-wise steps (float64 rounding of the first layer, the output's scaling and bias) are single IEEE
operations, correctly rounded everywhere.

Why the float64 mode is bit-exact on every machine, thread count and tile grouping: weights are rounded to
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
from contextlib import contextmanager

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
# about STRIP_POSITIONS positions (each with a halo of rows: its activations stay near 12 MB); in the float64 mode
# each k x k convolution in it runs on sub-strips whose unfolded input (positions x in_channels * k * k) stays
# near STRIP_BYTES (the integer mode's first layer gathers its inputs by FIRST_CHUNK_BYTES).
STRIP_POSITIONS = 1 << 15
STRIP_BYTES = 3 << 23
# integer mode (container version 5)
ACT_LEVELS = 255  # hidden activations are integers 0..255 in units of 2**act_exp (per channel)
ACT_EXP_UNSET = 127  # the act_exp of a net never calibrated
ACT_EXP_MIN = -12  # the finest activation unit a calibration gives
CALIBRATION_QUANTILE = 0.999  # of each channel's activations, which is what ACT_LEVELS units cover
INT_WEIGHT_MAX = 1 << 14  # hidden and output weights: integers in [-2**14, 2**14) on their channel's grid
# (fewer for layers of more than 432 terms: twice the largest sum, plus the bias, must stay below 2**31)
INT_TERMS = 1 << 10  # at most this many terms per sum after the first layer (float32 products stay exact: ``_imm``)
FIRST_WEIGHT_BITS = 22  # the first layer's weights: integers below 2**22 on one grid (float64 sums < 2**45)
MAX_SHIFT = 19  # a hidden layer's grid is at most 2**-19, so its sums stay below 2**31
OUT_MAX_SHIFT = 24  # the output layer's grid is at most 2**-24, like the linear branch's
_INT32 = 1 << 31


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


def _upper_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(a, q, dim=1)`` (linear interpolation) for q near 1, the same numbers: from the largest
    values (``topk``) instead of a sort of the whole row, about 10x faster on calibration's samples."""
    n = a.shape[1]
    pos = q * (n - 1)
    lo = int(pos)
    if n < 2 or lo >= n - 1:
        return torch.quantile(a, q, dim=1)
    top = torch.topk(a, n - lo, dim=1, largest=True, sorted=True).values  # top[:, -1] is the lo-th smallest
    return torch.lerp(top[:, -1], top[:, -2], torch.tensor(pos - lo, dtype=a.dtype))


def _weight_limit(terms: int) -> int:
    """The integer weight bound of a layer summing ``terms`` products (module docstring)."""
    return min(INT_WEIGHT_MAX, (_INT32 - (256 << MAX_SHIFT)) // (256 * terms))


def _int_grid(w: torch.Tensor, max_shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output channel (dim 0) of float64 weights w: integers q = floor(w * 2**shift + 1/2) with |q| below
    the layer's weight limit, shift the largest such (at most ``max_shift``); (q, shift as int64)."""
    limit = _weight_limit(w[0].numel())
    m = w.abs().flatten(1).amax(1).clamp_min(2.0**-60)
    shift = torch.floor(torch.log2((limit - 1) / m)).clamp_max(max_shift)
    # log2 of a quotient may round: step down wherever the rounded weights would still reach the limit
    while True:
        q = torch.floor(w * torch.exp2(shift).view(-1, *[1] * (w.dim() - 1)) + 0.5)
        over = (q.flatten(1).amax(1) >= limit) | (q.flatten(1).amin(1) < -limit)
        if not bool(over.any()):
            return q, shift.long()
        shift = shift - over.double()


def _halves(q: torch.Tensor) -> torch.Tensor:
    """Integer weights q (K, N) in [-2**14, 2**14) as one int8 matrix [hi | lo] (K, 2N) with q = 128 hi + lo
    (lo in 0..127): one product gives both halves' sums."""
    q = q.long()
    return torch.cat([q >> 7, q & 127], 1).to(torch.int8).contiguous()


_INT8_FAST: bool | None = None  # whether torch._int_mm beats float32 products on this CPU (``_int8_fast``)


def _int8_fast() -> bool:
    """Whether the CPU's int8 products (``torch._int_mm``) are faster than float32 products of the same values.
    With VNNI-class instructions int8 wins by 2-4x; without (AVX2 CPUs such as AMD Zen 2/3, older Intel) its
    fallback kernel is about 20x slower than float32. Both give the same integers, so this choice, made once
    per process by timing both on a small product, changes only the speed (and where _int_mm is missing, the
    float32 products serve)."""
    global _INT8_FAST
    if _INT8_FAST is None:
        import time

        a = torch.ones(512, 432, dtype=torch.int8)
        w = torch.ones(432, 96, dtype=torch.int8)
        af, wf = a.float(), w.float()

        def best(f) -> float:
            f()  # the first call may set up the kernel
            times = []
            for _ in range(2):
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
            return min(times)

        try:
            _INT8_FAST = best(lambda: torch._int_mm(a, w)) <= best(lambda: af @ wf)
        except (AttributeError, RuntimeError, NotImplementedError):  # a torch without CPU int8 products
            _INT8_FAST = False
    return _INT8_FAST


def _combine(r: torch.Tensor) -> torch.Tensor:
    """Products with the weight halves [hi | lo] (int32, exact) -> the products with 128 hi + lo (one pass)."""
    n = r.shape[1] // 2
    return torch.add(r[:, n:], r[:, :n], alpha=128)


def _imm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ (128 hi + lo) for a and w = [hi | lo] (``_halves``, int8), as exact int32: int8 products
    with int32 sums when a is int8 on the CPU; otherwise float32 products of the same values (a may be float32
    already; |a|, |hi|, |lo| <= 128, at most INT_TERMS = 2**10 terms, checked in ``ConvNet``: sums below 2**24,
    exact in any order; TF32 and reduced-precision products are turned off)."""
    if a.dtype == torch.int8 and a.device.type == "cpu":
        return _combine(torch._int_mm(a, w))
    return _combine(_imm_float(a, w))


def _imm_float(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a @ [hi | lo] as float32 products (exact, ``_imm``), int32."""
    with _float32_exact():
        return (a.float() @ w.float()).int()


@contextmanager
def _float32_exact():
    """float32 matrix products in full precision inside (no TF32 or bfloat16 passes)."""
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)


def _conv_float(src: torch.Tensor, w: torch.Tensor, Wp: int, n: int) -> torch.Tensor:
    """A 3x3 layer of ``_int_stack`` with float32 buffers: the nine shifted row ranges of ``src`` times w's
    slices (rows dy, dx, input channel), accumulated in float32 (every partial sum a bounded integer below
    2**24: exact in any order, ``_imm``), as int32 products with 128 hi + lo. No (positions, 9 C) gathered
    matrix: 2.5x faster than one product with it on a 2-core AVX2 CPU (48 channels)."""
    C = src.shape[1]
    wf = w.float()
    y = src[:n] @ wf[:C]
    for k in range(1, 9):
        off = (k // 3) * Wp + k % 3
        y.addmm_(src[off : off + n], wf[k * C : (k + 1) * C])
    return _combine(y.int())


FIRST_CHUNK_BYTES = 1 << 24  # the first layer gathers its inputs for about this many bytes of positions at a time


def _first_layer(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The integer mode's first 3x3 layer (the linear branch's channels, then the first hidden layer's) on one
    image x (C, H, W), float64, with weights w (9 C + 1, C_out): rows (dy, dx, input channel), then the bias.
    Returns (H (W + 2), C_out) in the flat channels-last layout of ``_hidden_stack``: output row r, column j at
    r (W + 2) + j; the two columns past each row's end are sums of real entries, bounded like the rest, and
    discarded.

    x lies in a zero-padded buffer of (H + 3) x (W + 2) positions by C channels, where the three neighbours dx =
    0, 1, 2 of a position are 3 C contiguous numbers: so the (positions, 9 C) matrix of the 3 x 3 neighbourhoods
    is three copies of overlapping row ranges (one per dy). It is made for about FIRST_CHUNK_BYTES of positions
    at a time (a buffer glibc reuses, as STRIP_BYTES), with a column of ones for the bias, and multiplied by w.
    Every product and partial sum is exact in float64 (FIRST_WEIGHT_BITS), so this is ``F.conv2d`` to the last
    bit, in any order: 1.7x its speed on a 2-core AVX-512 Xeon (13 channels in, 78 out)."""
    C, H, W = x.shape
    Wp = W + 2
    n = H * Wp
    buf = x.new_zeros((H + 3) * Wp, C)
    buf.view(H + 3, Wp, C)[1 : H + 1, 1 : W + 1] = x.permute(1, 2, 0)
    out = x.new_empty(n, w.shape[1])
    step = max(1, FIRST_CHUNK_BYTES // (72 * C))
    cols = x.new_empty(min(n, step), 9 * C + 1)
    cols[:, -1] = 1  # times the bias, the last row of w
    for p0 in range(0, n, step):
        p1 = min(n, p0 + step)
        c = cols[: p1 - p0]
        for dy in range(3):
            c[:, 3 * C * dy : 3 * C * (dy + 1)] = buf.as_strided((p1 - p0, 3 * C), (C, 1), (p0 + dy * Wp) * C)
        torch.mm(c, w, out=out[p0:p1])
    return out


def _int_stack(
    x: torch.Tensor,
    first: tuple,
    hidden: list,
    w_out: torch.Tensor,
    beta,
    scale,
    bias,
    feats: torch.Tensor | None = None,
    keep: slice = slice(None),
    out: torch.Tensor | None = None,
    sel: torch.Tensor | None = None,
) -> torch.Tensor:
    """The integer mode of a ConvNet on integer inputs x (B, C, H, W), float64 (clamped): (B, out, h, W) float64,
    the output rows ``keep`` (h of them; default all), written into ``out`` if given. With ``sel`` (int64, the
    flat indices r (W + 2) + c of output positions (r, c), ``_padded_rows``) instead: (B, out, 1, len(sel)), the
    outputs at those positions only; the output layer is 1x1, so the last hidden layer is computed there only
    (``_neighbours``), the same integers as at every position.

    first = (w, n_lin): the first layer (``_first_layer``), whose first n_lin channels are the linear branch
    and the rest the first hidden layer's activations before rounding. Those activations, clamped to 0..255 and
    offset by -128 into int8, live in a flat buffer of (H + 3) x (W + 2) positions by C channels as in
    ``_hidden_stack`` (padding: activation 0, stored as -128); a hidden 3x3 layer multiplies the nine shifted row
    ranges by the layer's weight halves (with int8 buffers gathered into one (positions, 9 C) matrix for
    ``torch._int_mm`` by one ``index_select`` of rows, ``_neighbours``; with float32 buffers, where that product
    is slow, by ``_conv_float``), adds beta (bias, the offset's corrections, half a unit), shifts right per
    channel and clamps to -128..127, the next activations less 128. The output layer gives (sum + beta) * scale +
    bias in float64, plus the linear branch; ``feats`` (B, C, H, W), if given, receives the activations it
    multiplies (0..255, the last hidden layer's; its rows ``keep``)."""
    B, _, H, W = x.shape
    w0, n_lin = first
    Wp = W + 2
    n = H * Wp
    # the buffers hold the int8 values as int8 where _int_mm is fast, else as float32 (the same numbers)
    int8 = x.device.type == "cpu" and _int8_fast()
    dt = torch.int8 if int8 else torch.float32
    if out is None:
        shape = (len(range(H)[keep]), W) if sel is None else (1, len(sel))
        out = torch.empty((B, w_out.shape[1] // 2) + shape, dtype=torch.float64, device=x.device)
    with _float32_exact():
        for i in range(B):
            r = _first_layer(x[i], w0)
            a = r[:, n_lin:].floor_().clamp_(0, ACT_LEVELS).sub_(128)
            C = a.shape[1]
            a.view(H, Wp, C)[:, W:] = -128
            src = torch.full(((H + 3) * Wp, C), -128, dtype=dt, device=x.device)
            src[Wp + 1 : Wp + 1 + n] = a
            full = hidden[:-1] if sel is not None else hidden  # the layers computed at every position
            dst = src.clone() if full else src
            if full and int8:
                every = _neighbours(torch.arange(n, device=x.device), Wp)
                cols = torch.empty(len(every), C, dtype=dt, device=x.device)
            for w, b, shift in full:
                if int8:
                    y = _imm(torch.index_select(src, 0, every, out=cols).view(n, 9 * C), w)
                else:
                    y = _conv_float(src, w, Wp, n)
                y = y.add_(b).bitwise_right_shift_(shift).clamp_(-128, ACT_LEVELS - 128)
                y.view(H, Wp, C)[:, W:] = -128
                dst[Wp + 1 : Wp + 1 + n] = y
                src, dst = dst, src
            if sel is None:
                last = src[Wp + 1 : Wp + 1 + n].contiguous()
                act = last.view(H, Wp, C)[keep, :W].permute(2, 0, 1)
            elif hidden:
                w, b, shift = hidden[-1]
                cols = src.index_select(0, _neighbours(sel, Wp)).view(len(sel), 9 * C)
                last = _imm(cols, w).add_(b).bitwise_right_shift_(shift)
                last = last.clamp_(-128, ACT_LEVELS - 128).to(dt)
                act = last.t()[:, None]
            else:
                last = src[Wp + 1 + sel]
                act = last.t()[:, None]
            if feats is not None:
                feats[i] = (act.to(torch.int16) + 128).to(feats.dtype)
            res = torch.addcmul(bias, _imm(last, w_out).add_(beta).double(), scale)  # exact product, one rounding
            if n_lin:
                res.add_(r[:, :n_lin] if sel is None else r[sel, :n_lin])
            out[i] = res.view(H, Wp, -1)[keep, :W].permute(2, 0, 1) if sel is None else res.t()[:, None]
    return out


def _neighbours(rows: torch.Tensor, Wp: int) -> torch.Tensor:
    """The buffer rows of the 3 x 3 neighbourhoods of output rows ``rows`` in ``_int_stack``'s layout, (dy, dx)
    in order for each: gathered from the (positions, C) buffer with ``index_select`` they are the (len(rows),
    9 C) matrix of the neighbourhoods (rows (dy, dx, channel)), at about a third of the time of three strided
    copies (int8) and a tenth (float32)."""
    off = torch.tensor([dy * Wp + dx for dy in range(3) for dx in range(3)], device=rows.device)
    return (rows[:, None] + off).flatten()


def _padded_rows(pos: torch.Tensor, W: int) -> torch.Tensor:
    """Flat positions r W + c of an H x W image -> their indices r (W + 2) + c in ``_int_stack``'s layout."""
    return pos + 2 * torch.div(pos, W, rounding_mode="floor")


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
        if hidden > 0:  # the activation unit of each hidden layer's channels (integer mode), set by calibrate
            self.register_buffer("act_exp", torch.full((layers, hidden), ACT_EXP_UNSET, dtype=torch.int8))
        self._observe: list | None = None  # calibrate: hidden activations are sampled into it
        self.amp = False  # training: bfloat16 autocast of the layers after the first (``forward``)
        self._int: tuple | None = None  # the integer mode's weights (freeze)
        self._check_ranges()
        self._frozen: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._stack: tuple | None = None  # the residual branch's weights as ``exact`` uses them (``freeze``)

    def _check_ranges(self) -> None:
        # bits needed by the worst sum of each layer: |a| * |w| * terms, on the finest grid involved; after the
        # first layer also the integer mode's terms (its int8 products run as float32 where int8 is slow)
        in_int = math.log2(INPUT_CLAMP)
        layers = []  # (conv, input integer bits, input fractional bits, whether the integer mode's products)
        if self.linear is not None:
            layers.append((self.linear, in_int, LINEAR_FRAC_BITS - WEIGHT_FRAC_BITS, False))
        for i, conv in enumerate(self.convs):
            layers.append(
                (conv, in_int - IN_SHIFT, IN_SHIFT, False) if i == 0 else (conv, ACT_INT_BITS, ACT_FRAC_BITS, True)
            )
        for conv, a_int, a_frac, products in layers:
            terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            bits = a_int + WEIGHT_INT_BITS + math.ceil(math.log2(terms + 1)) + a_frac + WEIGHT_FRAC_BITS
            if bits > _MANTISSA:
                raise ValueError(f"a layer needs {bits} bits; exact float64 evaluation allows {_MANTISSA}")
            if products and terms > INT_TERMS:
                raise ValueError(
                    f"a layer sums {terms} terms; exact int8 products in float32 allow {INT_TERMS} "
                    f"(3x3 layers at most {INT_TERMS // 9} channels wide)"
                )

    @property
    def halo(self) -> int:
        """Rows of context each side that one output row depends on."""
        h = self.kernel // 2 if self.linear is not None else 0
        return max(h, len(self.convs) - 1 if self.convs else 0)

    # ---------------------------------------------------------------- training path (float32)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32; with ``amp`` (training only) the layers after the first run under bfloat16 autocast (the
        linear branch and first layer, which see the integer inputs, stay float32)."""
        x = torch.clamp(x, -INPUT_CLAMP, INPUT_CLAMP)
        out = self.linear(x) if self.linear is not None else 0.0
        if self.convs:
            h = x * 2.0**-IN_SHIFT
            lim = float(1 << ACT_INT_BITS)
            for i, conv in enumerate(self.convs[:-1]):
                with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp and i > 0):
                    h = torch.clamp(F.relu(conv(h)), max=lim)
                if self._observe is not None:
                    self._observe.append(h.detach().float())
            with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp and len(self.convs) > 1):
                r = self.convs[-1](h)
            out = out + r.float()
        return out

    # ---------------------------------------------------------------- calibration (integer mode)
    @property
    def calibrated(self) -> bool:
        """Whether the integer mode can run: every hidden channel has its activation unit."""
        return not self.convs[:-1] or bool((self.act_exp != ACT_EXP_UNSET).all())

    @torch.no_grad()
    def calibrate(self, activations: list[torch.Tensor]) -> None:
        """Set act_exp from samples of each hidden layer's float activations (one (hidden, n) tensor per layer):
        the unit 2**e of each channel is the smallest power of two with ACT_LEVELS * 2**e at or above the
        channel's CALIBRATION_QUANTILE, no finer than 2**ACT_EXP_MIN, and coarse enough that the channel's
        weights fit the integer grid (``freeze``)."""
        exps = []
        for i, a in enumerate(activations):
            q = _upper_quantile(a.double(), CALIBRATION_QUANTILE)
            e = torch.ceil(torch.log2(q.clamp_min(2.0**-30) / ACT_LEVELS)).clamp_min(ACT_EXP_MIN)
            # the channel's weights in its own units (its inputs in theirs) must round below INT_WEIGHT_MAX
            # at a grid of at least 2**-1 (first layer: any size)
            if i > 0:
                w = self.convs[i].weight.detach().double() * torch.exp2(exps[-1]).view(1, -1, 1, 1)
                limit = _weight_limit(w[0].numel())
                need = torch.ceil(torch.log2(w.abs().flatten(1).amax(1).clamp_min(1e-300) * 2 / (limit - 1)))
                e = torch.maximum(e, need)
            exps.append(e)
        self.act_exp.copy_(torch.stack(exps).clamp(-100, 100).to(torch.int8))
        self._int = None

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
        self._int = self._freeze_int(device) if self.convs and self.calibrated else None

    def _freeze_int(self, device) -> tuple:
        """The integer mode's weights (module docstring), computed on the CPU in float64 from the float weights
        (powers of two, floor and comparisons only: the same on every machine), then moved to ``device``.
        None without hidden layers, else (first, hidden, last): first = the linear branch and first layer as one
        float64 3x3 layer (weights (9 C + 1, C_out): rows (dy, dx, input channel), then the bias; the number of
        linear channels; ``_first_layer``); hidden = per 3x3 layer ([hi | lo], beta, shift); last = ([hi | lo], beta,
        scale, bias)."""
        convs = [(c.weight.detach().double().cpu(), c.bias.detach().double().cpu()) for c in self.convs]
        if len(convs) == 1:
            return None  # no hidden layers: the float64 mode is the integer mode
        unit = [torch.exp2(e.double()) for e in self.act_exp.cpu()]  # per layer, per channel
        # first layer: the activation a = clamp(floor(r + 1/2), 0, 255) of r = conv(x * 2**-IN_SHIFT) / unit
        w, b = convs[0]
        w = w * (2.0**-IN_SHIFT / unit[0]).view(-1, 1, 1, 1)
        b = b / unit[0]
        m = max(float(w.abs().max()), float(b.abs().max()) * 2.0**-20, 2.0**-60)
        grid = 2.0 ** (FIRST_WEIGHT_BITS - 1 - math.frexp(m)[1])
        w0, b0 = torch.floor(w * grid + 0.5) / grid, torch.floor(b * grid + 0.5) / grid + 0.5
        n_lin = 0
        if self.linear is not None:
            lw, lb = self._frozen[0]
            w0, b0, n_lin = torch.cat([lw.cpu(), w0]), torch.cat([lb.cpu(), b0]), lw.shape[0]
        first = (torch.cat([w0.permute(2, 3, 1, 0).reshape(-1, w0.shape[0]), b0[None]]).to(device), n_lin)
        hidden = []
        for i in range(1, len(convs) - 1):
            w, b = convs[i]
            w = w * (unit[i - 1].view(1, -1, 1, 1) / unit[i].view(-1, 1, 1, 1))
            q, shift = _int_grid(w, MAX_SHIFT)
            if int(shift.min()) < 1:
                raise ValueError("a hidden layer's weights do not fit the integer grid: calibrate the model")
            scale = torch.exp2(shift.double())
            bound = 128 * q.abs().flatten(1).sum(1)  # the largest |sum of weight * (activation - 128)|
            beta = torch.floor(b / unit[i] * scale + 0.5) + 128 * q.flatten(1).sum(1) + scale / 2
            beta = torch.maximum(torch.minimum(beta, bound + 256 * scale), -bound - 1)
            if float((2 * bound + 256 * scale).max()) >= _INT32:
                raise ValueError("a hidden layer's integer sums could reach 2**31")
            w = _halves(q.permute(2, 3, 1, 0).reshape(-1, q.shape[0]))  # rows (dy, dx, input channel)
            # the stack keeps activations less 128: (sum + beta - 128 2**shift) >> shift is the shifted sum less 128
            # exactly, and |sum + beta - 128 2**shift| <= 2 bound + 128 scale + 1 stays below 2**31 (checked above)
            beta = beta - 128 * scale
            hidden.append((w.to(device), beta.int().to(device), shift.int().to(device)))
        w, b = convs[-1]
        w = w[:, :, 0, 0] * unit[-1].view(1, -1)
        q, shift = _int_grid(w, OUT_MAX_SHIFT)
        w = _halves(q.t())
        beta = (128 * q.sum(1)).int()  # undoes the -128 offset of the activations
        bias = _quantize_weight(b)
        last = (w.to(device), beta.to(device), torch.exp2(-shift.double()).to(device), bias.to(device))
        return first, hidden, last

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

    def _exact_int(self, x: torch.Tensor, feats: torch.Tensor | None = None, **rows) -> torch.Tensor:
        first, hidden, last = self._int
        return _int_stack(torch.clamp(x, -INPUT_CLAMP, INPUT_CLAMP), first, hidden, *last, feats, **rows)

    @torch.no_grad()
    def exact(
        self,
        x: torch.Tensor,
        integer: bool = False,
        feats: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact evaluation of integer-valued ``x`` (any float or int dtype), in strips of rows, as float64: the
        integer mode (version 5) when ``integer``, else float64 fixed point. ``feats`` (integer mode only; B,
        hidden, H, W, an integer dtype), if given, receives the last hidden layer's activations, 0..255 in
        units of 2**act_exp (version 7's output updates, idfzip.adapt, are products with them). ``pos``
        (ascending flat positions of H x W), if given: the outputs (and ``feats``) at those positions only,
        (B, out, 1, len(pos)) (the integer mode computes its last hidden and output layers there only)."""
        if self._frozen is None or self._frozen[0][0].device != x.device:
            self.freeze(x.device)
        if integer and self._int is None and self.convs[:-1]:
            raise ValueError("the integer mode needs a calibrated model")
        fn = self._exact_int if integer and self._int is not None else self._exact
        if feats is not None and fn != self._exact_int:
            raise ValueError("hidden activations are given in the integer mode only")
        x = x.double()
        if pos is not None and fn != self._exact_int:
            return self.exact(x, integer).flatten(2)[:, :, pos.to(x.device)].unsqueeze(2)
        if x.is_cuda:  # cuDNN may pick FFT/Winograd algorithms, which are not exact: use plain GEMM kernels
            with torch.backends.cudnn.flags(enabled=False):
                return self._exact_strips(x, fn, feats, pos)
        return self._exact_strips(x, fn, feats, pos)

    def _exact_strips(
        self, x: torch.Tensor, fn, feats: torch.Tensor | None = None, pos: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``fn`` on strips of rows, each with the rows either side its outputs depend on (and ``feats``, if
        given, filled through the integer mode's on the same strips); with ``pos`` (integer mode), each strip
        gives the outputs at the positions in its rows."""
        B, _, H, W = x.shape
        rows = max(1, STRIP_POSITIONS // max(1, B * W))
        if pos is not None:
            pos = pos.to(x.device)
            if rows >= H:
                return fn(x, feats=feats, sel=_padded_rows(pos, W))
            starts = torch.arange(0, H + rows, rows, device=x.device).clamp_(max=H)
            ends = torch.searchsorted(pos, starts * W).tolist()  # strip k's positions: pos[ends[k] : ends[k + 1]]
        elif rows >= H:
            return fn(x) if feats is None else fn(x, feats=feats)
        halo = self.halo
        shape = (H, W) if pos is None else (1, len(pos))
        out = torch.empty((B, self.out_ch) + shape, dtype=torch.float64, device=x.device)
        for k, r0 in enumerate(range(0, H, rows)):
            r1 = min(H, r0 + rows)
            a, b = max(0, r0 - halo), min(H, r1 + halo)
            keep = slice(r0 - a, r0 - a + (r1 - r0))
            if pos is not None:  # the strip's positions, counted from its first row with the halo, a
                i0, i1 = ends[k], ends[k + 1]
                part = None if feats is None else feats[..., i0:i1]
                fn(x[:, :, a:b], feats=part, sel=_padded_rows(pos[i0:i1] - a * W, W), out=out[..., i0:i1])
            elif fn == self._exact_int:  # writes its rows in place
                fn(x[:, :, a:b], feats=None if feats is None else feats[:, :, r0:r1], keep=keep, out=out[:, :, r0:r1])
            else:  # the float64 mode (no feats)
                out[:, :, r0:r1] = fn(x[:, :, a:b])[:, :, keep]
        return out
