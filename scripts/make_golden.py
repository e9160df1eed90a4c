"""Write the golden files of the current container version: tests/golden/{rgb,rgba,tiled,rgb_e7,rgb_e8,la,mixed,graphic}.idfz from
the PNGs beside them, with the shipped `natural` model and, for la.png (an LA image: rgb.png as L with a gradient
alpha plane), the shipped `grey` model (tests/test_golden.py decodes them and requires re-encoding to give the same
bytes). Run only when the container version, the encoder's choices or a shipped model change (as the adaptation
search's did in ce6cf96, in the commit that set adapt.MIN_GAIN and in the one that set
adapt.COARSE_STEPS = 5, and as the default effort's did when it began to fit offsets), never to make a failing
test pass.

rgb_v8.idfz is the rgb.idfz that commit 3a01e4e wrote (version 8: the default effort before it fitted
offsets; effort 4 writes it still). The {rgb,rgba,tiled}_v5.idfz, rgb_e7_v6.idfz and rgb_e8_v7.idfz files were written the same way by commit
df9838d (versions 5-7, before split windows), the {rgb,rgba,tiled}_v4.idfz files by commit 88ca5f9 (version 4, float64
networks) with the shipped model before its calibration. The legacy_v{1,2,3}.idfz files were written by idfzip at commit b7424ea (version 3, the last float-table
build) from legacy.png: v3 as `idfzip.compress(im, "natural")`, v2 and v1 as that build's unadapted stream in
the older layouts."""

from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
from PIL import Image

import idfzip
from idfzip import adapt
from idfzip.flowcode import schedule
from idfzip.zoo import load_shipped

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"
FLOW = {"flow_only": True}  # the flow's own files: WebP would be smaller for these small crops (versions 8-10)
FILES = {
    "rgb": FLOW,
    "rgba": FLOW,
    "tiled": {"tile": 32, **FLOW},
    "rgb_e7": {"effort": 7, **FLOW},
    "rgb_e8": {"effort": 8, **FLOW},
    "la": FLOW,
    "mixed": {"tile": 128},
    "graphic": {},
}
# name -> compress options. rgb_e7.idfz (version 9: adaptation with offsets) and rgb_e8.idfz (version 10: output
# updates, written under ``updates_kept``) are written from rgb.png. mixed.idfz (version 12): mixed.png's left tile
# (a smooth field with noise) by the flow with offsets, its right (graphic.png, enlarged) as WebP; graphic.idfz
# (version 11): graphic.png (flat colour, text, a gradient, bars) stored whole as WebP


@contextmanager
def updates_kept():
    """Output updates (versions 7 and 10) fitted for every slot and kept whatever they save: by default only slots of
    adapt.DELTA_MIN_SYMBOLS symbols or more get them (where they pay), and a small golden image has none."""
    saved_state = adapt.DELTA_MIN_SYMBOLS, adapt.fit_slot
    fit_slot = adapt.fit_slot

    def keep(segments, C, K, *plan, **kw):
        p, saved = fit_slot(segments, C, K, *plan, **kw)
        return p, saved + (1 << 40) if len(plan) > 3 else saved  # plan[3]: the updates

    adapt.DELTA_MIN_SYMBOLS, adapt.fit_slot = 0, keep
    try:
        yield
    finally:
        adapt.DELTA_MIN_SYMBOLS, adapt.fit_slot = saved_state


@contextmanager
def fitted_as(params: adapt.Params, updates: adapt.Deltas):
    """The float fits' integers taken from a file's one tile instead of fitted: each slot's offsets and gains
    from ``params`` ((level, slot) -> (C, 4 + 6K); zeros for a slot it lacks), its output updates from
    ``updates``. Those fits can choose other integers on another kind of CPU: an AMD EPYC with AVX2 chose other
    offsets for rgb_e7 than the AVX-512 Xeon that wrote it, and effort 8's float32 Adam fit of the updates
    (before 2026-12-07) wrote rgb_e8 in 37,415 bytes on such an EPYC, 37,407 and 37,411 on the Xeon with its
    AVX-512 and default kernels. All that follows from the integers must be the same everywhere."""
    flow = load_shipped("natural").flow
    levels = flow.config.levels
    slots = list(dict.fromkeys((s.level, s.slot) for s in reversed(schedule(flow)) if s.level < levels))
    saved_state = adapt.fit_slot, adapt._offsets, adapt.fit_delta
    fit_slot, at = adapt.fit_slot, [-1]

    def tracked(segments, C, K, *plan, **kw):  # the encoder fits the slots in reversed schedule order ...
        if len(plan) < 4 or plan[3] is None:  # ... each first without updates (plan[3])
            at[0] = (at[0] + 1) % len(slots)
        return fit_slot(segments, C, K, *plan, **kw)

    def offsets(q, z, p, K, *steps):
        stored = params.get(slots[at[0]])
        if stored is None or stored.shape[1] == 4:
            return np.zeros((q.shape[0], 6 * K), dtype=np.int64)
        return stored[:, 4:].numpy()

    def stored_updates(segments, f, C, K, *plan):
        return updates.get(slots[at[0]], np.zeros((C, 3 * K, f.shape[0]), dtype=np.int64))

    adapt.fit_slot, adapt._offsets, adapt.fit_delta = tracked, offsets, stored_updates
    try:
        yield
    finally:
        adapt.fit_slot, adapt._offsets, adapt.fit_delta = saved_state


def write(name: str, fitted: tuple[adapt.Params, adapt.Deltas] | None = None) -> bytes:
    """The golden file ``name``'s bytes as this build writes them; ``fitted``: with a file's own float-fitted
    integers (``fitted_as``)."""
    kw = FILES[name]
    im = Image.open(GOLDEN / f"{name.split('_')[0]}.png")
    with fitted_as(*fitted) if fitted else nullcontext(), updates_kept() if kw.get("effort", 0) >= 8 else nullcontext():
        return idfzip.compress(im, "natural", **kw)


if __name__ == "__main__":
    for name in FILES:
        data = write(name)
        (GOLDEN / f"{name}.idfz").write_bytes(data)
        print(name, len(data), idfzip.inspect(data))
