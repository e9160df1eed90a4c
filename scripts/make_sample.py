"""Make examples/sample.png, the image the README's first command compresses.

A synthetic 256x256 scene (sky gradient, sun, hills, textured ground, a tree) rendered with a fixed seed:
photo-like statistics without shipping anyone's photograph. Run: python scripts/make_sample.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

W = H = 256
rng = np.random.default_rng(2026)
y, x = np.mgrid[0:H, 0:W].astype(np.float64)
img = np.zeros((H, W, 3))
sky = np.stack([90 + 0.35 * y, 140 + 0.3 * y, 235 - 0.1 * y], -1)
img[:] = sky
sun = np.exp(-((x - 190) ** 2 + (y - 50) ** 2) / 300.0)[..., None]
img = img * (1 - sun) + np.array([255, 240, 200]) * sun
for k, (amp, base, col) in enumerate([(18, 150, (70, 110, 60)), (12, 175, (60, 125, 45))]):
    ridge = base + amp * np.sin(x / (23 + 9 * k) + k) + 6 * np.sin(x / 7.0 + 2 * k)
    mask = (y > ridge)[..., None]
    shade = (1 + 0.002 * (y - ridge))[..., None]
    img = np.where(mask, np.array(col) * shade, img)
ground = (y > 200)[..., None]
tex = rng.normal(0, 1, (H, W))
tex = np.asarray(Image.fromarray(((tex * 40) + 128).clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)))
img = np.where(ground, np.array([120, 95, 60]) + (tex[..., None].astype(np.float64) - 128) * 0.8, img)
trunk = (np.abs(x - 60) < 4) & (y > 120) & (y < 205)
img[trunk] = [80, 55, 35]
crown = ((x - 60) ** 2 / 900 + (y - 110) ** 2 / 700) < 1
leaf = rng.normal(0, 18, (H, W))
img[crown] = np.stack([40 + leaf, 100 + leaf, 40 + 0.5 * leaf], -1)[crown]
img = np.asarray(Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7)), np.float64)
img += rng.normal(0, 2.5, img.shape)  # sensor noise
out = Path(__file__).resolve().parent.parent / "examples" / "sample.png"
out.parent.mkdir(exist_ok=True)
Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(out, optimize=True)
print(out)
