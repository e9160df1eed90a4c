"""The hierarchical integer discrete flow (Hoogeboom et al. 2019) with its priors.

Structure, for a (B, C, H, W) integer image with H and W multiples of 2**levels:

    [colour coupling]                       optional, initialised to JPEG 2000's reversible colour transform
    for each level l = 0 .. levels-1:
        squeeze                             (C, h, w) -> (4C, h/2, w/2), slots [x00 | x01 | x10 | x11]
        steps x (permutation, coupling)     bipartite (IDF) or 4-partition (Tomczak 2020)
        factor-out                          the first 3C channels z_l leave the flow, the last C are kept
    top                                     the C kept channels of the last level

Prior: z_l is coded in three slots of C channels, slot j conditioned on the kept channels and slots < j
(a ConvNet per slot and level, no per-position parameters); the top is coded with one learned mixture per
channel. With ``context="checkerboard"`` each slot is coded in two passes, its anchors (x + y even) first;
the second pass's network input also holds the anchors' values and the anchor mask (a checkerboard context
as in He et al. 2021, here on integer latents), and is exact and parallel within each pass.
With ``init="lifting"`` each level's 4-partition coupling starts as a 2D 5/3 integer wavelet step and the
slots are (HH, HL, LH) detail bands with LL kept, so training starts from classical compression.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
from torch import nn

from ..priors import nll_bits
from .layers import Coupling, Permute, bipartite_updates, init_lifting, init_rct, quad_updates, squeeze, unsqueeze
from .nets import ConvNet

AR_SCALE = 2.0**-6


@dataclass(frozen=True)
class IDFConfig:
    """Everything that defines a model's architecture. Stored as JSON inside the weights file."""

    levels: int = 5
    channels: int = 3
    coupling: str = "quad"  # "quad" (4-partition, Tomczak 2020) or "bipartite" (IDF)
    steps: int = 1  # flow steps (permutation + coupling) per level
    coupling_hidden: int = 0  # 0: each coupling translation is a single linear kernel x kernel filter
    coupling_layers: int = 2
    coupling_kernel: int = 3
    init: str = "lifting"  # "lifting" (5/3 wavelet, quad only) or "identity" (zero translations)
    color: str = "rct"  # "rct" or "none"
    prior_hidden: int = 48
    prior_layers: int = 2
    mixtures: int = 3
    channel_ar: bool = False  # within a slot, channel c's means also depend linearly on channels < c there
    context: str = "none"  # "checkerboard": a slot's second half (x + y odd) also sees its first half
    seed: int = 0

    def __post_init__(self):
        if self.coupling not in ("quad", "bipartite"):
            raise ValueError(f"unknown coupling {self.coupling!r}")
        if self.init not in ("lifting", "identity"):
            raise ValueError(f"unknown init {self.init!r}")
        if self.init == "lifting" and self.coupling != "quad":
            raise ValueError("lifting initialisation needs the 4-partition coupling")
        if self.context not in ("none", "checkerboard"):
            raise ValueError(f"unknown context {self.context!r}")
        if self.color not in ("rct", "none"):
            raise ValueError(f"unknown color {self.color!r}")
        if self.color == "rct" and self.channels != 3:
            raise ValueError("the colour transform needs 3 channels")
        if not (1 <= self.levels <= 8 and self.steps >= 1 and self.mixtures >= 1):
            raise ValueError("levels must be 1..8, steps and mixtures at least 1")

    @classmethod
    def from_dict(cls, d: dict) -> IDFConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class HierarchicalIDF(nn.Module):
    def __init__(self, config: IDFConfig):
        super().__init__()
        self.config = cfg = config
        C, K = cfg.channels, cfg.mixtures
        rng = random.Random(cfg.seed)
        self.color = None
        if cfg.color == "rct":
            self.color = Coupling(C, [([0, 2], [1]), ([1], [0, 2])], hidden=0, layers=0, kernel=1)
            init_rct(self.color)
        self.perms = nn.ModuleList()
        self.couplings = nn.ModuleList()
        for _ in range(cfg.levels):
            perms, coups = nn.ModuleList(), nn.ModuleList()
            for s in range(cfg.steps):
                if cfg.coupling == "quad":
                    # slot order (x11, x01, x10, x00) first, so the kept last slot is the low-pass x00
                    order = [3, 1, 2, 0] if s == 0 else [0, 1, 2, 3]
                    perm = sum((list(range(b * C, (b + 1) * C)) for b in order), [])
                    updates = quad_updates(C)
                else:
                    perm = list(range(4 * C))
                    rng.shuffle(perm)
                    updates = bipartite_updates(4 * C)
                coup = Coupling(4 * C, updates, cfg.coupling_hidden, cfg.coupling_layers, cfg.coupling_kernel)
                if cfg.init == "lifting" and s == 0:
                    init_lifting(coup, C)
                perms.append(Permute(perm))
                coups.append(coup)
            self.perms.append(perms)
            self.couplings.append(coups)
        self.n_ar = C * (C - 1) // 2 if cfg.channel_ar else 0
        self.passes = 2 if cfg.context == "checkerboard" else 1
        extra = C + 1 if self.passes == 2 else 0  # the slot's own anchors (zero elsewhere) and the anchor mask
        self.priors = nn.ModuleList(
            nn.ModuleList(
                ConvNet(
                    (1 + j) * C + extra, 3 * K * C + self.n_ar, cfg.prior_hidden, cfg.prior_layers, 3, zero_out=False
                )
                for j in range(3)
            )
            for _ in range(cfg.levels)
        )
        with torch.no_grad():
            for net in (n for level in self.priors for n in level):
                first = [net.linear] if net.linear is not None else []
                if extra:  # start blind to the anchors: both passes give the same parameters
                    for conv in first + list(net.convs[:1]):
                        conv.weight[:, -extra:] = 0.0
                if self.n_ar:  # start with no channel dependence
                    for conv in first + [net.convs[-1]]:
                        conv.weight[-self.n_ar :] = 0.0
                        conv.bias[-self.n_ar :] = 0.0
        top = torch.zeros(C, 3, K)
        top[:, 1] = torch.linspace(-64, 64, K) if K > 1 else 0.0
        top[:, 2] = 4.0
        self.top = nn.Parameter(top.reshape(C * 3 * K))

    @property
    def multiple(self) -> int:
        """Tile sides must be multiples of this."""
        return 1 << self.config.levels

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def load_weights(self, tensors: dict) -> None:
        """load_state_dict, where a model never calibrated for the integer mode may lack its act_exp tensors."""
        missing = set(self.state_dict()) - set(tensors)
        if any(not k.endswith(".act_exp") for k in missing):
            raise KeyError(f"missing {min(missing)}")
        self.load_state_dict(tensors, strict=not missing)

    # ------------------------------------------------------------------ integer mode (nets.py)
    def _hidden_nets(self) -> list[ConvNet]:
        return [m for m in self.modules() if isinstance(m, ConvNet) and len(m.convs) > 1]

    @property
    def integer(self) -> bool:
        """Whether every network can run in its integer mode (container version 5): all are calibrated."""
        return all(net.calibrated for net in self._hidden_nets())

    @torch.no_grad()
    def calibrate(self, batches, samples: int = 1 << 14, seed: int = 0) -> None:
        """Calibrate every network's integer mode on the float activations of ``batches`` (integer-valued
        images (B, C, H, W)): up to ``samples`` positions of each hidden layer per network call are kept."""
        nets = self._hidden_nets()
        g = torch.Generator().manual_seed(seed)
        kept = {id(n): [[] for _ in n.convs[:-1]] for n in nets}
        try:
            for x in batches:
                for n in nets:
                    n._observe = []
                self(x.float())
                for n in nets:
                    layers = len(n.convs) - 1
                    for i, h in enumerate(n._observe):
                        h = h.transpose(0, 1).reshape(h.shape[1], -1)
                        pick = torch.randperm(h.shape[1], generator=g)[:samples]
                        kept[id(n)][i % layers].append(h[:, pick])
        finally:
            for n in nets:
                n._observe = None
        for n in nets:
            n.calibrate([torch.cat(a, 1) for a in kept[id(n)]])
            n.freeze(n.act_exp.device)

    # ------------------------------------------------------------------ training (float32)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Total ideal code length in bits of integer-valued images x (B, C, H, W), differentiable."""
        C, K = self.config.channels, self.config.mixtures
        if self.color is not None:
            x = self.color(x)
        bits = x.new_zeros(())
        for level in range(self.config.levels):
            x = squeeze(x)
            for perm, coup in zip(self.perms[level], self.couplings[level]):
                x = coup(perm(x))
            kept, z = x[:, 3 * C :], x[:, : 3 * C]
            ctx = kept
            for j in range(3):
                zj = z[:, j * C : (j + 1) * C]
                net = self.priors[level][j]
                if self.passes == 2:
                    a = self.anchors(ctx)
                    raw = torch.where(a > 0, net(self.slot_input(ctx, zj, 0)), net(self.slot_input(ctx, zj, 1)))
                else:
                    raw = net(ctx)
                if self.n_ar:
                    for c in range(C):
                        bits = bits + nll_bits(zj[:, c : c + 1], self.channel_raw(raw, c, zj[:, :c]), K)
                else:
                    bits = bits + nll_bits(zj, raw, K)
                ctx = torch.cat([ctx, zj], 1)
            x = kept
        bits = bits + nll_bits(x, self.top_raw(x.shape), K)
        return bits

    # ------------------------------------------------------------------ coding (int64, exact)
    def top_raw(self, shape) -> torch.Tensor:
        B, _, h, w = shape
        return self.top.view(1, -1, 1, 1).expand(B, -1, h, w)

    # ``integer`` below: the networks in their integer mode (version 5), else in float64 fixed point
    def color_encode(self, x: torch.Tensor, integer: bool = False) -> torch.Tensor:
        return self.color.encode(x, integer) if self.color is not None else x

    def color_decode(self, x: torch.Tensor, integer: bool = False) -> torch.Tensor:
        return self.color.decode(x, integer) if self.color is not None else x

    def level_encode(self, level: int, x: torch.Tensor, integer: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, h, w) int64 -> kept (B, C, h/2, w/2), z (B, 3C, h/2, w/2)."""
        C = self.config.channels
        x = squeeze(x)
        for perm, coup in zip(self.perms[level], self.couplings[level]):
            x = coup.encode(perm.encode(x), integer)
        return x[:, 3 * C :], x[:, : 3 * C]

    def level_decode(self, level: int, kept: torch.Tensor, z: torch.Tensor, integer: bool = False) -> torch.Tensor:
        y = torch.cat([z, kept], 1)
        for perm, coup in reversed(list(zip(self.perms[level], self.couplings[level]))):
            y = perm.decode(coup.decode(y, integer))
        return unsqueeze(y)

    def channel_raw(self, raw: torch.Tensor, c: int, prev: torch.Tensor) -> torch.Tensor:
        """Mixture parameters (B, 3K, h, w) of channel c of a slot, given that slot's channels < c (``prev``).

        With ``channel_ar`` the means of channel c are shifted by sum_{c' < c} a_{c,c'} z_{c'} (PixelCNN++'s
        linear channel dependence), the coefficients a being the last C(C-1)/2 network outputs times AR_SCALE.
        In the exact path the coefficients lie on a fixed-point grid and z are integers, so the shift is exact.
        """
        K = self.config.mixtures
        out = raw[:, c * 3 * K : (c + 1) * 3 * K]
        if not self.n_ar or c == 0:
            return out
        # scaled by 2**-6 (exact) so that training moves the coefficients gently; bounded to [-2, 2]
        coef = torch.clamp(raw[:, 3 * K * self.config.channels :] * AR_SCALE, -2.0, 2.0)
        first = c * (c - 1) // 2  # coefficients of channel c start here
        shift = (coef[:, first : first + c] * prev.to(coef.dtype)).sum(1, keepdim=True)
        return torch.cat([out[:, :K], out[:, K : 2 * K] + shift, out[:, 2 * K :]], 1)

    @staticmethod
    def anchors(like: torch.Tensor) -> torch.Tensor:
        """(1, 1, h, w) mask, 1 where x + y is even (a checkerboard context's first pass), of like's dtype."""
        h, w = like.shape[-2:]
        y = torch.arange(h, device=like.device).view(h, 1)
        x = torch.arange(w, device=like.device).view(1, w)
        return ((x + y) % 2 == 0).to(like.dtype).view(1, 1, h, w)

    def slot_input(self, ctx: torch.Tensor, zj: torch.Tensor | None, group: int) -> torch.Tensor:
        """The prior network's input for pass ``group`` of a slot: ctx, and with a checkerboard context
        [slot values at the anchors, anchor mask] for the second pass (zeros for the first)."""
        if self.passes == 1:
            return ctx
        B, _, h, w = ctx.shape
        if group == 0:
            return torch.cat([ctx, ctx.new_zeros(B, self.config.channels + 1, h, w)], 1)
        a = self.anchors(ctx)
        return torch.cat([ctx, zj.to(ctx.dtype) * a, a.expand(B, 1, h, w)], 1)

    def groups(self, h: int, w: int) -> list[torch.Tensor | None]:
        """Flat position indices of each pass of a slot of size h x w, in coding order (None: all, in order)."""
        if self.passes == 1:
            return [None]
        a = self.anchors(torch.zeros(h, w)).flatten()
        return [torch.nonzero(a > 0).flatten(), torch.nonzero(a == 0).flatten()]

    def prior_raw(
        self,
        level: int,
        slot: int,
        ctx: torch.Tensor,
        zj: torch.Tensor | None = None,
        group: int = 0,
        integer: bool = False,
        feats: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Exact mixture parameters of slot ``slot`` of z_level given ctx = [kept, slots < slot], for pass
        ``group`` (with a checkerboard context the second pass also needs the slot's anchors, ``zj``);
        ``feats`` receives the net's last hidden activations; ``pos``: at those positions only (``ConvNet.exact``)."""
        return self.priors[level][slot].exact(self.slot_input(ctx, zj, group), integer, feats, pos)
