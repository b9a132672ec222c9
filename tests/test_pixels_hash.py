"""The crawl's perceptual hash is imagehash.phash's, computed without its Python overhead."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import cv2
import imagehash
import numpy as np
import pytest
from PIL import Image

from vlforge.pipeline.dedup import hamming
from vlforge.pipeline.image_processing import perceptual_hash, pixels_hash

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from photo_samples import sample_photos  # noqa: E402

PHOTOS = [np.asarray(photo.convert("RGB")) for photo in sample_photos()]


def _views(photo: np.ndarray) -> list[np.ndarray]:
    """The photo and a few crops and flips of it: different hashes to compare bit for bit."""
    h, w = photo.shape[:2]
    return [
        photo,
        photo[: h // 2, : w // 2],
        photo[h // 3 :, w // 4 :],
        np.ascontiguousarray(photo[:, ::-1]),
        np.ascontiguousarray(photo[::-1]),
    ]


@pytest.mark.parametrize("index", range(len(PHOTOS)))
def test_hash_equals_imagehash_phash_on_the_same_32x32_grey(index):
    for rgb in _views(PHOTOS[index]):
        grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
        # imagehash resizes a 32x32 input to 32x32: a copy, so both hash the same pixels.
        assert pixels_hash(rgb) == str(imagehash.phash(Image.fromarray(small, "L")))


def test_hashes_tell_photos_apart_and_survive_a_reencode():
    hashes = [pixels_hash(rgb) for rgb in PHOTOS]
    assert len(hashes) >= 3
    assert all(hamming(a, b) > 10 for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    for rgb, expected in zip(PHOTOS, hashes, strict=True):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=60)
        assert hamming(perceptual_hash(buf.getvalue()), expected) <= 6


def test_hash_equals_imagehash_phash_on_noise():
    # Noise puts DCT coefficients near their median, where any scaling slip flips bits.
    rng = np.random.default_rng(0)
    for _ in range(60):
        rgb = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
        assert pixels_hash(rgb) == str(imagehash.phash(Image.fromarray(small, "L")))
