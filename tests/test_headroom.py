"""scripts/headroom.py: fitting a part of a model to one image lowers that image's float code length, and
leaves the model it was given as it was."""

from pathlib import Path

import numpy as np
import torch
from headroom import fit_part  # scripts/, on the path through conftest
from PIL import Image

from idfzip import zoo


def test_fitting_the_output_layers_lowers_the_image_s_code_length():
    flow = zoo.load("natural").flow
    a = np.asarray(Image.open(Path(__file__).parent.parent / "examples" / "sample.png").convert("RGB"))[:64, :64]
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
    weights = {k: v.clone() for k, v in flow.state_dict().items()}
    before, after, n = fit_part(flow, x, "out", 8)
    assert after < before * 0.999
    assert 0 < n < sum(p.numel() for p in flow.parameters())
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in weights.items())
