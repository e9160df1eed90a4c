"""Make examples/sample.png, the image the README's first command compresses.

A synthetic 384x256 "landscape": a sky gradient over hills and a textured foreground, built from 1/f (pink)
noise, whose power spectrum falls like that of natural photographs, plus mild sensor noise. Fixed seed;
no one's photograph is shipped. Run: python scripts/make_sample.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

W, H = 384, 256
rng = np.random.default_rng(2026)


def pink(h: int, w: int, beta: float = 1.0) -> np.ndarray:
    """Zero-mean unit-variance noise with amplitude spectrum 1/f**beta."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    spec = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f**beta
    spec[0, 0] = 0
    n = np.fft.irfft2(spec, s=(h, w))
    return (n - n.mean()) / n.std()


y, x = np.mgrid[0:H, 0:W].astype(np.float64)
clouds = pink(H, W, 1.2)
sky = np.stack([110 + 0.3 * y, 150 + 0.25 * y, 225 - 0.05 * y], -1) + 14 * clouds[..., None] * [1, 1, 0.6]
horizon = 130 + 25 * pink(1, W, 1.6)[0]
hill = 0.5 + 0.5 * pink(H, W, 1.1)[..., None]
ground = np.stack([70 + 50 * hill[..., 0], 100 + 45 * hill[..., 0], 45 + 25 * hill[..., 0]], -1)
ground *= (0.75 + 0.0025 * (y - horizon[None, :]).clip(0, 120))[..., None]
img = np.where((y > horizon[None, :])[..., None], ground, sky)
img += 2.0 * rng.normal(size=img.shape)  # sensor noise
out = Path(__file__).resolve().parent.parent / "examples" / "sample.png"
out.parent.mkdir(exist_ok=True)
Image.fromarray(img.clip(0, 255).round().astype(np.uint8)).save(out, optimize=True)
print(out)
