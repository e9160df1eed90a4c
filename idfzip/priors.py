"""Discretized logistic mixtures: the likelihood used in training and the tables used for coding.

P(z) = sum_k pi_k [sigmoid((z + 0.5 - mu_k) / s_k) - sigmoid((z - 0.5 - mu_k) / s_k)],  z an integer,
as in Hoogeboom et al. 2019 (IDF) and Salimans et al. 2017 (PixelCNN++), without the edge cases at 0/255:
latents are unbounded integers.

Network outputs are laid out per target channel as [logits(K), means(K), log-scales(K)].
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

LOG_SCALE_MIN = -4.0
LOG_SCALE_MAX = 9.0
# Coding windows: a symbol is coded in [c - W/2, c + W/2) around its rounded mean c, W from WIDTHS, plus one
# escape entry; an escaped symbol is then sent raw in 32 bits. The window is the narrowest that leaves at most
# about TAIL_MASS of the mixture outside (each component k needs |mu_k - c| + s_k ln(2 K pi_k / TAIL_MASS)),
# so escapes cost about TAIL_MASS * 40 bits per symbol.
WIDTHS = (12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
TAIL_MASS = 2.0**-17
ESCAPE_FLOOR = 2.0**-22


@contextmanager
def one_thread():
    """Run torch on one thread inside: the table arithmetic must not depend on the thread count.

    torch splits large element-wise operations across threads, and each piece ends in a scalar tail whose
    sigmoid/exp can differ from the vectorised one by an ulp: with another thread count the pieces, and so
    a few table entries, change. On one thread every element takes the same path in encoder and decoder.
    """
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def split_params(raw: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, C*3K, H, W) network output -> logits, means, log-scales, each (B, C, K, H, W)."""
    B, C3K, H, W = raw.shape
    r = raw.view(B, C3K // (3 * K), 3, K, H, W)
    log_s = torch.clamp(r[:, :, 2], LOG_SCALE_MIN, LOG_SCALE_MAX)
    return r[:, :, 0], r[:, :, 1], log_s


def _log_sigmoid_diff(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(hi) - sigmoid(lo)) for hi > lo, stable in both tails."""
    # reflect to the side where the sigmoids are small: sigmoid(h) - sigmoid(l) = sigmoid(-l) - sigmoid(-h)
    flip = (hi + lo) > 0
    h = torch.where(flip, -lo, hi)
    l_ = torch.where(flip, -hi, lo)
    lh, ll = F.logsigmoid(h), F.logsigmoid(l_)
    d = torch.clamp(ll - lh, max=-1e-6)
    return lh + torch.log(-torch.expm1(d))


def nll_bits(z: torch.Tensor, raw: torch.Tensor, K: int) -> torch.Tensor:
    """Total -log2 P(z) of integer-valued z (B, C, H, W) under the mixture given by raw (B, C*3K, H, W)."""
    logits, mu, log_s = split_params(raw, K)
    inv_s = torch.exp(-log_s)
    zc = z.unsqueeze(2) - mu
    lp = _log_sigmoid_diff((zc + 0.5) * inv_s, (zc - 0.5) * inv_s)
    lp = torch.logsumexp(lp + F.log_softmax(logits, dim=2), dim=2)
    return -lp.sum() / math.log(2.0)


class Mixture:
    """Mixture parameters of n symbols in coding order: weights, means, scales, each (n, K), float64.

    Tables are computed from them in float32 with a fixed sequence of operations on fixed chunks, so the
    encoder and the decoder of one machine build identical tables.
    """

    def __init__(self, raw: torch.Tensor, K: int):
        logits, mu, log_s = split_params(raw.detach().double(), K)

        def flat(t):  # (B, C, K, H, W) -> (B, C, H, W, K) -> (n, K): symbol order is z.flatten() order
            return t.permute(0, 1, 3, 4, 2).reshape(-1, K).cpu()

        with one_thread():
            self.weights = torch.softmax(flat(logits), dim=1)
            self.means = flat(mu)
            self.scales = torch.exp(flat(log_s))

    @classmethod
    def from_tensors(cls, weights, means, scales) -> Mixture:
        m = cls.__new__(cls)
        m.weights, m.means, m.scales = weights, means, scales
        return m

    def __len__(self) -> int:
        return self.means.shape[0]

    def take(self, idx: torch.Tensor) -> Mixture:
        return Mixture.from_tensors(self.weights[idx], self.means[idx], self.scales[idx])

    def windows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per symbol: window centre (int64) and index into WIDTHS (int64)."""
        centre = torch.floor((self.weights * self.means).sum(1) + 0.5)
        K = self.weights.shape[1]
        tail = torch.clamp(torch.log(self.weights * (2.0 * K / TAIL_MASS)), min=0.0)
        half = ((self.means - centre[:, None]).abs() + self.scales * tail).max(1).values
        widths = torch.tensor(WIDTHS, dtype=torch.float64)
        cls = torch.searchsorted(widths / 2, half.contiguous())
        return centre.long(), torch.clamp(cls, max=len(WIDTHS) - 1)

    def table(self, centre: torch.Tensor, width: int) -> torch.Tensor:
        """(n, width + 1) probabilities of z = centre - width/2 + j for j < width, then the escape mass."""
        f = torch.float32
        n = len(centre)
        inv_s = (1.0 / self.scales).to(f)
        # (edge - mu) / s with edge = lo + j, computed as j / s + (lo - mu) / s
        lo = (centre - width // 2).double() - 0.5
        off = ((lo[:, None] - self.means) / self.scales).to(f)
        w = self.weights.to(f)
        j = torch.arange(width + 1, dtype=f)[None, :]
        cdf = torch.zeros(n, width + 1, dtype=f)
        for k in range(w.shape[1]):
            x = j * inv_s[:, k : k + 1]
            x.add_(off[:, k : k + 1])
            torch.sigmoid_(x)
            cdf.addcmul_(x, w[:, k : k + 1])
        probs = torch.empty(n, width + 1, dtype=f)
        torch.sub(cdf[:, 1:], cdf[:, :-1], out=probs[:, :width])
        probs[:, :width].clamp_(min=0.0)
        probs[:, width] = torch.clamp(1.0 - (cdf[:, -1] - cdf[:, 0]), min=ESCAPE_FLOOR)
        return probs
