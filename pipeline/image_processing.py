"""Bytes from the web to a resized, re-encoded image: magic check, bomb guard, img2dataset resize.

Resizing is img2dataset's own `Resizer` (its modes, defaults and interpolation), so corpora match
what img2dataset users expect; this module only adds the checks img2dataset leaves out.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

import importlib.util  # noqa: E402
import sys  # noqa: E402

import imagehash  # noqa: E402
from PIL import Image  # noqa: E402


def _load_img2dataset_resizer():
    """img2dataset's resizer module alone, without the package's __init__.

    `import img2dataset` pulls in its whole downloader: wandb (which wraps sys.stdout), fsspec
    and torch, seconds per worker process. The resizer module needs only cv2, numpy and
    albumentations, so it is loaded from the installed package's file by itself.
    """
    name = "vlforge._img2dataset_resizer"
    if name in sys.modules:
        return sys.modules[name]
    package = importlib.util.find_spec("img2dataset")
    if package is None or not package.submodule_search_locations:
        raise ImportError("img2dataset is not installed")
    path = os.path.join(list(package.submodule_search_locations)[0], "resizer.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_i2d_resizer = _load_img2dataset_resizer()

# img2dataset wraps each resize in SuppressStdoutStderr, which dup2()s file descriptors 1 and 2
# process-wide. Two threads doing that at once can leave stdout pointing at /dev/null for good
# (our progress bar and summary vanish), so inside our threaded crawler it becomes a no-op.
_i2d_resizer.SuppressStdoutStderr = lambda: _NullContext()  # type: ignore[assignment]

RESIZE_MODES = tuple(m.name for m in _i2d_resizer.ResizeMode)

# Leading bytes of the formats we accept (what `file` would call an image).
_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


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
    original_width: int = 0
    original_height: int = 0
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: str = ""


def sniff_format(data: bytes) -> str:
    """Image format from magic bytes, '' when the bytes are not a known image."""
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


class ImageProcessor:
    """One per worker: img2dataset's Resizer is built once and reused across threads."""

    def __init__(self, config: ResizeConfig):
        self.config = config
        mode = _i2d_resizer.ResizeMode[config.resize_mode]
        self._resizer = _i2d_resizer.Resizer(
            image_size=config.image_size,
            resize_mode=mode,
            resize_only_if_bigger=config.resize_only_if_bigger,
            encode_quality=config.encode_quality,
            encode_format="jpg",
        )

    def process(self, data: bytes) -> ProcessedImage:
        fmt = sniff_format(data)
        if not fmt:
            return ProcessedImage(False, "bad_magic", f"leading bytes {data[:8]!r}")
        if fmt == "jpeg" and data.rfind(b"\xff\xd9") < 0:
            return ProcessedImage(False, "truncated", "JPEG without end-of-image marker")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = Image.open(io.BytesIO(data))  # reads the header only, decodes nothing
                width, height = header.size
        except Exception as err:
            return ProcessedImage(False, "decode_error", f"{type(err).__name__}: {err}"[:300])
        if width * height > self.config.max_pixels:
            return ProcessedImage(
                False, "decompression_bomb", f"{width}x{height} over {self.config.max_pixels} px"
            )
        jpg, new_w, new_h, orig_w, orig_h, err = self._resizer(io.BytesIO(data))
        if err is not None or jpg is None:
            return ProcessedImage(False, "decode_error", str(err)[:300], format=fmt)
        return ProcessedImage(
            True,
            jpg=jpg,
            format=fmt,
            original_width=int(orig_w),
            original_height=int(orig_h),
            width=int(new_w),
            height=int(new_h),
            sha256=hashlib.sha256(data).hexdigest(),
            phash=perceptual_hash(jpg),
        )


def perceptual_hash(jpg: bytes) -> str:
    """64-bit DCT perceptual hash (imagehash.phash) of the resized image, as 16 hex digits."""
    with Image.open(io.BytesIO(jpg)) as img:
        img.draft("L", (64, 64))  # JPEG DCT-domain downscale: the hash needs only 32x32 grey
        return str(imagehash.phash(img.convert("L")))
