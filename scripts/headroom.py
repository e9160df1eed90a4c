"""How much per-image fitting could still gain: a model's float code length of one image, before and after
Adam fits a chosen part of its weights to that image alone (no charge for sending them), against what the
codec's own adaptation gains on the same image (the file at effort 1, no adaptation, against effort 8).

    python scripts/headroom.py IMAGE [--model NAME] [--parts out,out0,biases,priors,couplings] [--steps 60]

Parts, each fitted from the shipped weights on its own:
    out        the output layers of every prior network (what the codec's offsets, gains and updates stand in for)
    out0       level 0's only
    biases     the output layers and every prior layer's biases
    priors     every weight of every prior network
    couplings  the flow's couplings and colour transform
The code length is the float training path's (``HierarchicalIDF.forward``, straight-through rounding), an
estimate: kodim01's effort 1 file is 0.05% larger. The fitted weights are not rounded to anything a file could
carry. Slow: each step runs the whole model forwards and backwards, 2-5 s for a 768x512 image on 2 cores.
"""

import argparse
import copy
import time

import numpy as np
import torch
from PIL import Image

import idfzip
from idfzip import zoo

PARTS = {
    "out": lambda name, net_out: name.startswith("priors.") and name.startswith(net_out),
    "out0": lambda name, net_out: name.startswith("priors.0.") and name.startswith(net_out),
    "biases": lambda name, net_out: name.startswith("priors.") and (name.startswith(net_out) or name.endswith(".bias")),
    "priors": lambda name, _: name.startswith("priors."),
    "couplings": lambda name, _: name.startswith(("couplings.", "color.")),
}
LR = {"out": 3e-3, "out0": 3e-3, "biases": 3e-3, "priors": 1e-3, "couplings": 1e-3}


def fit_part(flow, x: torch.Tensor, part: str, steps: int) -> tuple[float, float, int]:
    """A copy of ``flow`` with ``part``'s weights fitted to the integer image x (1, C, H, W) by ``steps`` of
    Adam: its float code length in bytes before and after, and how many weights were fitted."""
    flow = copy.deepcopy(flow)
    flow.train()
    params = []
    for name, p in flow.named_parameters():
        net_out = ""
        if name.startswith("priors."):  # priors.L.J.convs.N.*: the last conv is the output layer
            net = flow.get_submodule(".".join(name.split(".")[:3]))
            net_out = ".".join(name.split(".")[:3]) + f".convs.{len(net.convs) - 1}."
        on = PARTS[part](name, net_out)
        p.requires_grad_(on)
        params += [p] if on else []
    with torch.no_grad():
        before = float(flow(x)) / 8
    opt = torch.optim.Adam(params, lr=LR[part])
    for _ in range(steps):
        opt.zero_grad()
        flow(x).backward()
        opt.step()
    with torch.no_grad():
        after = float(flow(x)) / 8
    return before, after, sum(p.numel() for p in params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("image")
    ap.add_argument("--model", default=None, help="default: grey for L and LA images, else natural")
    ap.add_argument("--parts", default="out,priors")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    im = Image.open(args.image)
    im.load()
    model = zoo.load(args.model or ("grey" if im.mode in ("L", "LA") else "natural"))
    im = im.convert("L" if model.flow.config.channels == 1 else "RGB")
    files = {e: len(idfzip.compress(im, effort=e, model=model.path)) for e in (1, 8)}
    a = np.atleast_3d(np.asarray(im))
    m = model.flow.multiple
    h, w = a.shape[0] // m * m, a.shape[1] // m * m
    x = torch.from_numpy(a[:h, :w].astype(np.float32)).permute(2, 0, 1)[None]
    print(f"{args.image}: {im.width}x{im.height} {im.mode}, model {model.name}, fitted on its top-left {w}x{h}")
    print(f"  codec: effort 1 {files[1]:,} bytes, effort 8 {files[8]:,} ({(files[8] / files[1] - 1) * 100:+.2f}%)")
    for part in args.parts.split(","):
        t = time.perf_counter()
        before, after, n = fit_part(model.flow, x, part, args.steps)
        print(
            f"  {part:9s} {n:>9,} weights: float {before:,.0f} -> {after:,.0f} bytes "
            f"({(after / before - 1) * 100:+.2f}%), {args.steps} steps, {time.perf_counter() - t:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
