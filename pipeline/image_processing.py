"""Bytes from the web to a stored JPEG: decode once, img2dataset's resize, encode once.

image_decode.py turns any accepted image into upright sRGB pixels (Pillow; orientation, colour
spaces, bit depths, transparency), image_resize.py applies img2dataset's resize modes and
geometry to them, and the JPEG is encoded once as img2dataset encodes it. The perceptual hash
is taken from the same pixels, so nothing is decoded twice.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from vlforge.pipeline.image_decode import DecodeFailure, decode_upright_rgb, sniff_format
from vlforge.pipeline.image_resize import RESIZE_MODES, encode_jpeg, needed_size, resize_rgb

__all__ = [
    "RESIZE_MODES",
    "ImageProcessor",
    "ProcessedImage",
    "ResizeConfig",
    "perceptual_hash",
    "pixels_hash",
    "sniff_format",
]


@dataclass(frozen=True)
class ResizeConfig:
    image_size: int = 256  # img2dataset defaults: 256 px, border mode, jpg quality 95
    resize_mode: str = "border"
    resize_only_if_bigger: bool = False
    encode_quality: int = 95
    max_pixels: int = 100_000_000  # decompression-bomb guard, checked from the header alone


@dataclass
class ProcessedImage:
    ok: bool
    reason: str = ""
    detail: str = ""
    jpg: bytes = b""
    format: str = ""
    original_width: int = 0  # upright, as a viewer shows the original
    original_height: int = 0
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: str = ""


class ImageProcessor:
    """One per worker, shared by its threads: it holds only the settings."""

    def __init__(self, config: ResizeConfig):
        if config.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}")
        self.config = config
        self._needed = needed_size(
            config.image_size, config.resize_mode, config.resize_only_if_bigger
        )
        # As img2dataset does: the crawl's threads are the parallelism, not cv2's own pool.
        cv2.setNumThreads(1)

    def process(self, data: bytes) -> ProcessedImage:
        """Never raises: every failure is a failed result with a reason and a detail."""
        try:
            return self._process(data)
        except DecodeFailure as err:
            return ProcessedImage(False, err.reason, str(err), format=sniff_format(data))
        except Exception as err:  # a bug or an exotic input must fail one row, not the crawl
            detail = f"{type(err).__name__}: {err}"[:300]
            return ProcessedImage(False, "decode_error", detail, format=sniff_format(data))

    def _process(self, data: bytes) -> ProcessedImage:
        cfg = self.config
        decoded = decode_upright_rgb(data, cfg.max_pixels, self._needed)
        rgb = resize_rgb(
            decoded.rgb,
            decoded.width,
            decoded.height,
            cfg.image_size,
            cfg.resize_mode,
            cfg.resize_only_if_bigger,
        )
        height, width = rgb.shape[:2]
        return ProcessedImage(
            True,
            jpg=encode_jpeg(rgb, cfg.encode_quality),
            format=decoded.format,
            original_width=decoded.width,
            original_height=decoded.height,
            width=width,
            height=height,
            sha256=hashlib.sha256(data).hexdigest(),
            phash=pixels_hash(rgb),
        )


def pixels_hash(rgb: np.ndarray) -> str:
    """64-bit DCT perceptual hash of RGB pixels, as 16 hex digits: imagehash.phash's definition
    (grey 32x32, 2-D DCT-II, the 8x8 lowest frequencies above their median, row-major bits)."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    return _dct_hash(grey)


def perceptual_hash(jpg: bytes) -> str:
    """The same hash from an encoded image (a stored JPEG), for callers holding bytes only."""
    with Image.open(io.BytesIO(jpg)) as img:
        img.draft("L", (64, 64))  # JPEG DCT-domain downscale: the hash needs only 32x32 grey
        return _dct_hash(np.asarray(img.convert("L")))


_SQRT2 = float(np.sqrt(2.0))


def _dct_hash(grey: np.ndarray) -> str:
    """Written out with cv2 rather than called through imagehash.phash (0.5 ms an image, most of
    it Python around a 32x32 transform, holding the GIL the crawl's threads share; this is
    ~50 us). cv2.dct is the orthonormal DCT-II: scipy's unnormalized one, which imagehash uses,
    differs by a constant factor and by sqrt(2) more on the first row and column; scaling those
    back gives the same bits as imagehash on the same 32x32 input."""
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8]
    low[0, :] *= _SQRT2
    low[:, 0] *= _SQRT2
    return np.packbits(low > np.median(low)).tobytes().hex()
