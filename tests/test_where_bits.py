"""scripts/where_bits.py: its per-slot code lengths add up to the encoder's own for a tile."""

import numpy as np
from conftest import photo
from where_bits import bits_per_slot, tiles_by_activity  # scripts/, on the path through conftest

from idfzip import flowcode
from idfzip.container import FLOW_VERSION


def test_per_slot_bits_add_up_to_the_encoders(tiny):
    px = photo(64, 64, seed=3)
    per = bits_per_slot(tiny, px, 1)
    levels = tiny.flow.config.levels
    assert set(per) == {f"L{lv}s{j}" for lv in range(levels) for j in range(3)} | {f"L{levels}"}
    whole = flowcode.encode_tile(tiny, px, "cpu", FLOW_VERSION, flowcode.fit_plan(1))[3]
    assert abs(sum(per.values()) - whole) < 1e-6 * whole
    flat = np.zeros((64, 128, 3), np.uint8)
    flat[:, 64:] = px
    assert [(y, x) for _, y, x in tiles_by_activity(flat, 64)] == [(0, 0), (0, 64)]
