"""Our resize against img2dataset's own `Resizer`: same modes, same geometry, same pixels.

On plain 8-bit RGB inputs both decoders see the same pixels, so every mode, image size and
aspect ratio must give img2dataset's output size exactly and (nearly) its pixels. JPEG inputs
much larger than the target go through our DCT-domain downscale: same size, pixels close.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlforge.pipeline.image_processing import RESIZE_MODES, ImageProcessor, ResizeConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from photo_samples import sample_photos  # noqa: E402


def _img2dataset_resizer_module():
    """img2dataset's resizer.py alone (the package __init__ pulls in wandb, torch, fsspec)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    package = importlib.util.find_spec("img2dataset")
    path = Path(list(package.submodule_search_locations)[0]) / "resizer.py"
    spec = importlib.util.spec_from_file_location("_i2d_resizer_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


I2D = _img2dataset_resizer_module()
PHOTO = sample_photos()[0]  # a real photo: resampling differences show on real texture


def _reference(data: bytes, size: int, mode: str, only_if_bigger: bool) -> np.ndarray:
    resizer = I2D.Resizer(
        image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger, encode_quality=95
    )
    jpg, width, height, _, _, err = resizer(io.BytesIO(data))
    assert err is None
    arr = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    assert arr.shape[:2] == (height, width)
    return arr


def _ours(data: bytes, size: int, mode: str, only_if_bigger: bool):
    cfg = ResizeConfig(image_size=size, resize_mode=mode, resize_only_if_bigger=only_if_bigger)
    out = ImageProcessor(cfg).process(data)
    assert out.ok, out
    arr = np.asarray(Image.open(io.BytesIO(out.jpg)).convert("RGB"))
    assert arr.shape[:2] == (out.height, out.width)
    return out, arr


def _encoded(width: int, height: int, fmt: str) -> bytes:
    img = PHOTO.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=92) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def test_resize_modes_are_img2dataset_s():
    assert set(RESIZE_MODES) == {m.name for m in I2D.ResizeMode}


# Up- and downscales, portrait, landscape, square, odd sizes (rounding and crop/pad offsets).
SHAPES = [(301, 207), (207, 301), (150, 150), (97, 61), (640, 203)]


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize("size", [64, 128, 255])
@pytest.mark.parametrize("only_if_bigger", [False, True])
def test_png_inputs_match_img2dataset_resizer(mode, size, only_if_bigger):
    for width, height in SHAPES:
        data = _encoded(width, height, "PNG")
        expected = _reference(data, size, mode, only_if_bigger)
        out, got = _ours(data, size, mode, only_if_bigger)
        assert got.shape == expected.shape, (mode, size, width, height)
        assert (out.original_width, out.original_height) == (width, height)
        # Same pixels, same resize, same encoder: at most JPEG rounding noise.
        assert np.abs(got.astype(int) - expected).mean() < 0.5, (mode, size, width, height)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_big_jpegs_downscaled_in_dct_domain_keep_the_geometry(mode):
    # 1000+ px to 128: draft decodes at 1/4 or 1/8 scale; size must not move, pixels stay close.
    for width, height in [(1201, 803), (803, 1201), (1024, 1024)]:
        data = _encoded(width, height, "JPEG")
        expected = _reference(data, 128, mode, False)
        out, got = _ours(data, 128, mode, False)
        assert got.shape == expected.shape, (mode, width, height)
        assert (out.original_width, out.original_height) == (width, height)
        assert np.abs(got.astype(int) - expected).mean() < 4.0, (mode, width, height)
        if mode in ("keep_ratio", "keep_ratio_largest"):  # whole picture: a fair resample
            full = Image.open(io.BytesIO(data)).convert("RGB")
            size = (got.shape[1], got.shape[0])
            fair = np.asarray(full.resize(size, Image.Resampling.LANCZOS)).astype(int)
            # The shortcut may not be visibly worse than img2dataset's full-size INTER_AREA.
            ours_err, theirs_err = np.abs(got - fair).mean(), np.abs(expected - fair).mean()
            assert ours_err < 1.2 * theirs_err + 0.3, (mode, width, height)


def test_border_pads_white_and_center_crop_is_square():
    data = _encoded(300, 100, "PNG")
    _, border = _ours(data, 120, "border", False)
    assert border.shape == (120, 120, 3)
    assert border[:30].min() > 245 and border[-30:].min() > 245  # white bands above and below
    assert border[40:80].mean() < 200  # the photo between them
    _, crop = _ours(data, 120, "center_crop", False)
    assert crop.shape == (120, 120, 3)
    _, kept = _ours(data, 120, "keep_ratio", False)
    assert kept.shape == (120, 360, 3)
    _, largest = _ours(data, 120, "keep_ratio_largest", False)
    assert largest.shape == (40, 120, 3)
    _, small = _ours(data, 400, "keep_ratio_largest", True)  # already small enough: untouched
    assert small.shape == (100, 300, 3)
