"""Image bytes to upright 8-bit sRGB pixels: one decode path for every format we accept.

Pillow decodes everything (cv2.imdecode, which img2dataset uses, ignores ICC profiles and
mishandles 16-bit, palette and CMYK inputs: blank or off-colour images stored as ok); only plain
upright JPEGs, where the two give the same pixels, go through cv2 (jpeg_fast_decode.py). Around
Pillow this module adds what a corpus needs: the format decided by magic bytes, the bomb guard
from the header alone, JPEG DCT-domain downscaling (`draft`) when the caller needs far fewer
pixels, EXIF orientation, ICC profiles to sRGB, bit depths scaled rather than clipped, and
transparency matted on white as img2dataset does.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import ExifTags, Image, ImageCms, ImageOps

from vlforge.pipeline.jpeg_fast_decode import decode_plain_jpeg

# Pillow warns (from several threads at once) about big images and odd metadata; warnings.
# catch_warnings is not thread-safe, so Pillow's warnings are silenced once, for the process.
# Our own pixel limit (ResizeConfig.max_pixels) replaces Pillow's bomb warning.
warnings.filterwarnings("ignore", module=r"PIL\.")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Our format name -> the Pillow plugin that may open it (Image.open tries only that one).
PILLOW_FORMATS = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "avif": "AVIF",
    "heif": "HEIF",  # only with the optional pillow-heif plugin registered
    "bmp": "BMP",
    "tiff": "TIFF",
    "ico": "ICO",
    "jpeg2000": "JPEG2000",
}

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
    (b"\x00\x00\x01\x00", "ico"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000"),  # JP2 container
    (b"\xff\x4f\xff\x51", "jpeg2000"),  # raw J2K codestream
)
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


def sniff_format(data: bytes) -> str:
    """Image format from magic bytes, '' when the bytes are not an image we accept."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":  # VP8 (lossy), VP8L (lossless), VP8X
        return "webp"
    if data[4:8] == b"ftyp":  # ISO-BMFF: the major brand, then the compatible ones, decide
        size = struct.unpack(">I", data[:4])[0]
        brands = {data[8:12]} | {data[i : i + 4] for i in range(16, min(size, 256), 4)}
        if brands & _AVIF_BRANDS:
            return "avif"
        if brands & _HEIF_BRANDS:
            return "heif"
    return ""


class DecodeFailure(Exception):
    """A row's image cannot be used: `reason` is its status reason, str(self) the detail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass
class Decoded:
    rgb: np.ndarray  # H x W x 3 uint8, upright, sRGB, alpha matted on white
    format: str
    width: int  # upright size at full resolution (before any DCT-domain downscale)
    height: int


# The JPEG decoder may downscale (by 2, 4, 8) only while it keeps this many times the pixels the
# resize needs on each side. Pillow's own Image.thumbnail uses 2.0 by default ("very close to
# fair resampling while still being faster"): measured on real-photo JPEGs to 256 px, the stored
# thumbnail is within ~1 grey level (mean) of img2dataset's full decode, at 2.3x less CPU.
DRAFT_REDUCING_GAP = 2.0

# EXIF orientations that swap width and height (transpose, rotations by 90 or 270 degrees).
_SWAPS_AXES = {5, 6, 7, 8}

# Callback: upright full size -> the smallest upright size the caller will resize to, or None
# when it needs every pixel (no resize, or an upscale).
NeededSize = Callable[[int, int], "tuple[int, int] | None"]


def decode_upright_rgb(data: bytes, max_pixels: int, needed: NeededSize | None = None) -> Decoded:
    """Decode once to upright sRGB pixels; raises DecodeFailure with a status reason."""
    fmt = sniff_format(data)
    if not fmt:
        raise DecodeFailure("bad_magic", f"leading bytes {data[:8]!r}")
    if fmt == "jpeg" and data.rfind(b"\xff\xd9") < 0:
        raise DecodeFailure("truncated", "JPEG without end-of-image marker")
    try:
        img = Image.open(io.BytesIO(data), formats=[PILLOW_FORMATS[fmt]])  # header only
    except Image.DecompressionBombError as err:
        raise DecodeFailure("decompression_bomb", str(err)[:300]) from err
    except Exception as err:
        raise DecodeFailure("decode_error", f"{fmt}: {type(err).__name__}: {err}"[:300]) from err
    with img:
        stored_w, stored_h = img.size
        if stored_w * stored_h > max_pixels:
            raise DecodeFailure("decompression_bomb", f"{stored_w}x{stored_h} over {max_pixels} px")
        try:
            orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # broken EXIF: the pixels are still good, keep them as stored
            orientation = 1
        swaps = orientation in _SWAPS_AXES
        width, height = (stored_h, stored_w) if swaps else (stored_w, stored_h)
        if fmt == "jpeg" and needed is not None:
            size = needed(width, height)
            if size is not None:
                # DCT-domain downscale by 2, 4 or 8 while still at least DRAFT_REDUCING_GAP
                # times `size`: the later resize keeps its exact geometry (computed from the
                # full size) and only starts from fewer pixels. Orientation is applied after,
                # on the small image, so the request is in stored orientation.
                w, h = (math.ceil(s * DRAFT_REDUCING_GAP) for s in size)
                img.draft(None, (h, w) if swaps else (w, h))
        if (
            fmt == "jpeg"
            and orientation == 1
            and img.mode in ("RGB", "L")
            and not img.info.get("icc_profile")
        ):
            rgb = decode_plain_jpeg(data, (stored_w, stored_h), img.size)
            if rgb is not None:
                return Decoded(rgb=rgb, format=fmt, width=width, height=height)
        try:
            img.load()
            if orientation != 1:
                ImageOps.exif_transpose(img, in_place=True)
            rgb = to_srgb_array(img)
        except Image.DecompressionBombError as err:
            raise DecodeFailure("decompression_bomb", str(err)[:300]) from err
        except Exception as err:
            reason = "truncated" if "truncat" in str(err).lower() else "decode_error"
            raise DecodeFailure(reason, f"{fmt}: {type(err).__name__}: {err}"[:300]) from err
    return Decoded(rgb=rgb, format=fmt, width=width, height=height)


def to_srgb_array(img: Image.Image) -> np.ndarray:
    """Any Pillow mode as H x W x 3 uint8 sRGB: bit depths scaled, palettes expanded,
    transparency matted on white, ICC profiles applied."""
    icc = img.info.get("icc_profile")
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "RGBa", "RGBX"):
        img = img.convert("RGBA" if mode != "RGBX" else "RGB")
    elif mode == "La":
        img = img.convert("LA")
    elif mode == "LAB":
        img = ImageCms.applyTransform(img, _lab_to_srgb())
    if img.mode in ("RGBA", "LA"):
        img = _matte_on_white(img)
    if icc and img.mode in ("RGB", "L", "CMYK"):
        transform = _icc_to_srgb(bytes(icc), img.mode)
        if transform is not None:
            img = ImageCms.applyTransform(img, transform)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, CMYK (Adobe inverted CMYK is undone by the decoder), YCbCr
    return np.asarray(img)


def _matte_on_white(img: Image.Image) -> Image.Image:
    """Alpha-composite on white, as img2dataset does (alpha * colour + (255 - alpha) * white)."""
    base = img.mode[:-1]  # RGBA -> RGB, LA -> L
    out = Image.new(base, img.size, (255,) * len(base))
    out.paste(img.convert(base), mask=img.getchannel("A"))
    return out


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grey to 8 bits by scaling, never by clipping.

    Pillow's own convert('L') clips these modes at 255, which turns a 16-bit photo white. The
    mode does not say the value range, so it is read from the data: I;16 is 0..65535; I and F
    hold 8-bit values when they fit (some decoders widen 8-bit data), 16-bit values when they
    fit, else their own min..max; F in 0..1 is the usual float convention.
    """
    arr = np.asarray(img).astype(np.float64)
    if not np.isfinite(arr).all():
        arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scale, offset = 255 / 65535, 0.0
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535:
        scale, offset = 255 / 65535, 0.0
    else:
        scale, offset = 255 / max(hi - lo, 1e-12), lo
    out = np.rint((arr - offset) * scale).clip(0, 255).astype(np.uint8)
    return Image.fromarray(out, "L")


_SRGB = ImageCms.createProfile("sRGB")


@lru_cache(maxsize=64)
def _icc_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A cached transform from an embedded profile to sRGB; None when it is sRGB already or
    unusable (a broken or mismatched profile must not fail a good image: the pixels stay as
    they are, which is what every viewer without colour management shows)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if "srgb" in ImageCms.getProfileDescription(profile).lower().replace(" ", ""):
            return None  # most web JPEGs carry an sRGB profile: skip an identity pass
        # NOCACHE: the transform is shared by the crawl's threads; lcms's one-pixel cache is
        # per transform and not safe to share.
        return ImageCms.buildTransform(profile, _SRGB, mode, "RGB", flags=ImageCms.Flags.NOCACHE)
    except Exception:
        return None


@lru_cache(maxsize=1)
def _lab_to_srgb() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(
        ImageCms.createProfile("LAB"), _SRGB, "LAB", "RGB", flags=ImageCms.Flags.NOCACHE
    )
