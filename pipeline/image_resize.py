"""img2dataset's resize geometry on decoded RGB pixels.

img2dataset's `Resizer` takes bytes and decodes them with cv2 (losing orientation); we decode
with Pillow (image_decode.py) and apply the same geometry here, with the same functions its
resizer.py reaches: albumentations' SmallestMaxSize / LongestMaxSize sizes
(max(1, round(side * scale))) resized by cv2 with INTER_AREA down and INTER_LANCZOS4 up,
albumentations' CenterCrop offsets, PadIfNeeded centred white padding, JPEG quality 95.
The two offset formulas (`_center_crop_box`, `_centred_padding`) are albumentations' own,
written out here: importing albumentations costs ~0.6 s in every crawl worker, for two lines
of arithmetic. tests/test_image_resize.py checks the result against img2dataset's `Resizer`
itself, which runs the real albumentations transforms.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

RESIZE_MODES = ("no", "keep_ratio", "center_crop", "border", "keep_ratio_largest")

_WHITE = (255, 255, 255)


def scaled_size(
    width: int, height: int, image_size: int, mode: str, only_if_bigger: bool
) -> tuple[int, int, bool] | None:
    """(new width, new height, downscale) of the scaling step, None when there is none.

    keep_ratio and center_crop bring the short side to image_size, border and
    keep_ratio_largest the long side; resize_only_if_bigger skips images already small enough.
    """
    if mode in ("keep_ratio", "center_crop"):
        side = min(width, height)
    elif mode in ("border", "keep_ratio_largest"):
        side = max(width, height)
    else:
        return None
    downscale = side > image_size
    if only_if_bigger and not downscale:
        return None
    scale = image_size / side
    return max(1, round(width * scale)), max(1, round(height * scale)), downscale


def resize_rgb(
    rgb: np.ndarray,
    full_width: int,
    full_height: int,
    image_size: int,
    mode: str,
    only_if_bigger: bool,
) -> np.ndarray:
    """Resize `rgb` as img2dataset would resize an image of the full size.

    `rgb` may be smaller than full_width x full_height (JPEG DCT-domain downscale): the output
    size is computed from the full size, so the geometry is img2dataset's exactly either way.
    """
    planned = scaled_size(full_width, full_height, image_size, mode, only_if_bigger)
    if planned is None:
        return rgb
    new_w, new_h, downscale = planned
    if rgb.shape[:2] != (new_h, new_w):
        interpolation = cv2.INTER_AREA if downscale else cv2.INTER_LANCZOS4
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)
    if mode == "center_crop":
        y0, x0 = (
            _center_crop_box(rgb.shape[0], image_size),
            _center_crop_box(rgb.shape[1], image_size),
        )
        rgb = rgb[y0 : y0 + image_size, x0 : x0 + image_size]
    elif mode == "border":
        top, bottom = _centred_padding(rgb.shape[0], image_size)
        left, right = _centred_padding(rgb.shape[1], image_size)
        if top or bottom or left or right:
            rgb = cv2.copyMakeBorder(
                rgb, top, bottom, left, right, cv2.BORDER_CONSTANT, value=_WHITE
            )
    return rgb


def _center_crop_box(size: int, crop: int) -> int:
    """albumentations' get_center_crop_coords, one axis: where a centred crop starts."""
    return (size - crop) // 2


def _centred_padding(size: int, target: int) -> tuple[int, int]:
    """albumentations' PadIfNeeded (get_dimension_padding), one axis: (before, after)."""
    if size >= target:
        return 0, 0
    before = int((target - size) / 2.0)
    return before, target - size - before


def needed_size(
    image_size: int, mode: str, only_if_bigger: bool
) -> Callable[[int, int], tuple[int, int] | None]:
    """For image_decode's `draft`: the scaled size when the resize is a downscale, else None."""

    def needed(width: int, height: int) -> tuple[int, int] | None:
        planned = scaled_size(width, height, image_size, mode, only_if_bigger)
        if planned is None or not planned[2]:
            return None
        return planned[0], planned[1]

    return needed


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """JPEG as img2dataset writes it: cv2.imencode (libjpeg-turbo, 4:2:0) at `quality`."""
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("cv2.imencode failed")
    return buf.tobytes()
