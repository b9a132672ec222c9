"""Real photos in web shapes: the sample photos installed packages ship, cut and scaled.

The demo world's renders are flat synthetic scenes; web images are camera photos, 500–2000 px
on the long side, JPEG at various qualities. No photo data set can be downloaded here, so the
few real photos that our dependencies install (matplotlib's Grace Hopper portrait, scikit-learn's
China and flower pictures) are cropped and rescaled into as many web-sized JPEGs as needed.
The bench and the image tests both use them.
"""

from __future__ import annotations

import importlib.util
import io
import random
from pathlib import Path

from PIL import Image

# (package, path inside the package): real camera photos, shipped by dependencies of vlforge.
_SAMPLES = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)


def sample_photo_paths() -> list[Path]:
    """Paths of the installed sample photos (found without importing the packages: sklearn is slow)."""
    paths = []
    for package, inner in _SAMPLES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        path = Path(list(spec.submodule_search_locations)[0]) / inner
        if path.is_file():
            paths.append(path)
    if not paths:
        raise FileNotFoundError("no sample photos: matplotlib and scikit-learn are not installed")
    return paths


def sample_photos() -> list[Image.Image]:
    """The sample photos, decoded to RGB."""
    photos = []
    for path in sample_photo_paths():
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return photos


def real_photo_jpegs(
    n: int, min_side: int = 500, max_side: int = 2000, seed: int = 0
) -> list[bytes]:
    """`n` JPEGs cut from the sample photos, long side uniform in [min_side, max_side].

    Each is a random crop (half to all of each side, so aspect ratios vary), mirrored at random,
    scaled with Lanczos so its long side is in range, saved at a random quality 75–95 as web
    encoders do. Deterministic for a given seed.
    """
    rng = random.Random(seed)
    photos = sample_photos()
    out = []
    for _ in range(n):
        photo = rng.choice(photos)
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = photo.crop((x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        long_side = rng.randint(min_side, max_side)
        scale = long_side / max(cw, ch)
        size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=rng.randint(75, 95))
        out.append(buf.getvalue())
    return out
