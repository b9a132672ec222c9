"""Plain JPEGs decoded by OpenCV give Pillow's own pixels, and only plain JPEGs go that way.

The oracle is Pillow's decode of the same bytes (with the same `draft` request), compared pixel
for pixel; the routing is checked by counting what the OpenCV path returned.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from vlforge.pipeline import image_decode
from vlforge.pipeline.image_processing import ImageProcessor, ResizeConfig
from vlforge.pipeline.jpeg_fast_decode import decode_plain_jpeg, scan_is_complete

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from photo_samples import sample_photos  # noqa: E402

PHOTO = sample_photos()[0].convert("RGB").resize((613, 411), Image.Resampling.LANCZOS)


def jpeg(img: Image.Image, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **params)
    return buf.getvalue()


def pillow_view(data: bytes, draft: tuple[int, int] | None) -> np.ndarray:
    """Pillow's own RGB pixels of `data`, DCT-downscaled as `draft` asks."""
    with Image.open(io.BytesIO(data)) as img:
        if draft:
            img.draft(None, draft)
        return np.asarray(img.convert("RGB"))


PLAIN = {
    "baseline_420": jpeg(PHOTO, quality=90),
    "baseline_444": jpeg(PHOTO, quality=95, subsampling=0),
    "progressive": jpeg(PHOTO, quality=85, progressive=True),
    "optimized_422": jpeg(PHOTO, quality=80, optimize=True, subsampling=1),
    "grey": jpeg(PHOTO.convert("L"), quality=90),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
@pytest.mark.parametrize("draft", [None, (300, 200), (150, 100), (70, 50)])
def test_pixels_equal_pillows_at_every_dct_scale(name, draft):
    data = PLAIN[name]
    expected = pillow_view(data, draft)
    decoded_size = (expected.shape[1], expected.shape[0])  # what Pillow's draft reduced it to
    got = decode_plain_jpeg(data, PHOTO.size, decoded_size)
    assert got is not None
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


@pytest.fixture
def fast_path_results(monkeypatch):
    """What each call of the OpenCV path returned, as seen by image_decode."""
    results: list[bool] = []

    def counted(*args):
        rgb = decode_plain_jpeg(*args)
        results.append(rgb is not None)
        return rgb

    monkeypatch.setattr(image_decode, "decode_plain_jpeg", counted)
    return results


def test_a_plain_jpeg_is_decoded_by_the_fast_path(fast_path_results):
    processor = ImageProcessor(ResizeConfig(image_size=128, resize_mode="keep_ratio"))
    out = processor.process(PLAIN["baseline_420"])
    assert out.ok and fast_path_results == [True]
    assert (out.original_width, out.original_height) == PHOTO.size


def _with_exif_orientation(data: bytes, orientation: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        exif = img.getexif()
        exif[0x0112] = orientation
        return jpeg(img, quality=90, exif=exif.tobytes())


def _with_icc(img: Image.Image) -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return jpeg(img, quality=90, icc_profile=profile)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(_with_exif_orientation(PLAIN["baseline_420"], 6), id="rotated"),
        pytest.param(_with_icc(PHOTO), id="icc"),
        pytest.param(jpeg(PHOTO.convert("CMYK"), quality=90), id="cmyk"),
    ],
)
def test_what_opencv_would_decode_differently_stays_with_pillow(data, fast_path_results):
    out = ImageProcessor(ResizeConfig(image_size=128, resize_mode="keep_ratio")).process(data)
    assert out.ok
    assert fast_path_results == []


def _thumbnail_then_cut_scan(data: bytes) -> bytes:
    """A COM segment holding a small complete JPEG (as an EXIF thumbnail would sit in APP1)
    right after SOI, and the main image's scan data cut off halfway."""
    thumb = jpeg(PHOTO.resize((40, 27)), quality=70)
    segment = b"\xff\xfe" + (len(thumb) + 2).to_bytes(2, "big") + thumb
    whole = data[:2] + segment + data[2:]
    scan = whole.rfind(b"\xff\xda")
    return whole[: scan + (len(whole) - scan) // 2]


def test_cut_scan_data_after_a_thumbnail_is_truncated_not_grey(fast_path_results):
    cut = _thumbnail_then_cut_scan(PLAIN["baseline_420"])
    assert cut.rfind(b"\xff\xd9") > 0  # the thumbnail's end marker is still in the file
    assert not scan_is_complete(cut)
    out = ImageProcessor(ResizeConfig(image_size=128, resize_mode="keep_ratio")).process(cut)
    assert not out.ok and out.reason == "truncated", (out.reason, out.detail)
    assert fast_path_results == [False]


def test_scan_markers_decide_completeness():
    data = PLAIN["progressive"]
    assert scan_is_complete(data)
    assert scan_is_complete(data + b"\0" * 100)  # padding after the end marker is common
    assert not scan_is_complete(data[: len(data) - 200])
    assert not scan_is_complete(b"\xff\xd8\xff\xd9")  # no scan at all
