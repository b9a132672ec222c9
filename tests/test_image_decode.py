"""Stored JPEGs look like the photo: an independent oracle over many encodings.

From real photos (the sample photos installed packages ship) the test makes the same picture in
many encodings: every EXIF orientation, progressive, CMYK and grey JPEG, PNG in every mode, 16-bit
PNG/TIFF, GIF, BMP, WebP, AVIF, an embedded non-sRGB ICC profile. The expected upright RGB view
is known from how each encoding was made (the photo itself, its palette or its alpha over
white), not from our decoder; the stored JPEG must match it within a small mean error, and the
error threshold is checked to reject a sideways, mirrored, channel-swapped or blank image.
Failures (HTML, truncated, bombs, garbage) must come back as failed results, never as raises.
"""

from __future__ import annotations

import io
import random
import struct
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageCms, features

from vlforge.pipeline.image_processing import ImageProcessor, ResizeConfig, sniff_format

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from photo_samples import sample_photos  # noqa: E402

PHOTOS = sample_photos()
# Small and not square (orientation errors change the shape), from real photo texture.
PHOTO = np.asarray(PHOTOS[1].resize((150, 100), Image.Resampling.LANCZOS))
MAX_ERROR = 6.0  # mean absolute error, 0..255 levels, of a stored JPEG against the truth

AS_IS = ImageProcessor(ResizeConfig(image_size=256, resize_mode="no"))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.int32) - b.astype(np.int32)).mean())


def stored(data: bytes, processor: ImageProcessor = AS_IS) -> np.ndarray:
    out = processor.process(data)
    assert out.ok, (out.reason, out.detail)
    arr = np.asarray(Image.open(io.BytesIO(out.jpg)))
    assert arr.shape == (out.height, out.width, 3)  # always stored as 3-channel RGB
    return arr


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def as_rgb(grey_or_rgb: np.ndarray) -> np.ndarray:
    return np.repeat(grey_or_rgb[..., None], 3, axis=2) if grey_or_rgb.ndim == 2 else grey_or_rgb


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None].astype(np.float64) / 255
    return np.rint(rgb * a + 255 * (1 - a)).astype(np.uint8)


def test_threshold_rejects_wrong_views_of_the_photo():
    """Sideways shows as a shape change; these must show as errors well over the threshold."""
    wrong = {
        "mirrored": PHOTO[:, ::-1],
        "upside down": PHOTO[::-1],
        "rotated 180": PHOTO[::-1, ::-1],
        "BGR": PHOTO[..., ::-1],
        "white": np.full_like(PHOTO, 255),
        "black": np.zeros_like(PHOTO),
        "grey": as_rgb(grey(PHOTO)),
        "washed out": (PHOTO // 2 + 128).astype(np.uint8),
    }
    for name, view in wrong.items():
        assert mae(view, PHOTO) > 1.5 * MAX_ERROR, name


# --- EXIF orientation ------------------------------------------------------------------------
# The EXIF spec's meaning of each orientation: the transform a viewer applies to the stored
# pixels to show them upright (numpy, independent of Pillow's ImageOps).
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),  # rotate 90 degrees clockwise
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
# Stored pixels that show as PHOTO: the inverse transform (6 and 8 are each other's inverse).
STORED_AS = {**UPRIGHT, 6: UPRIGHT[8], 8: UPRIGHT[6]}


def oriented_jpeg(photo: np.ndarray, orientation: int, **params) -> bytes:
    pixels = np.ascontiguousarray(STORED_AS[orientation](photo))
    assert np.array_equal(UPRIGHT[orientation](pixels), photo)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes(), **params)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_stored_upright(orientation):
    got = stored(oriented_jpeg(PHOTO, orientation))
    assert got.shape == PHOTO.shape
    assert mae(got, PHOTO) < MAX_ERROR


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("mode", ["keep_ratio", "center_crop", "border"])
def test_orientation_with_dct_downscale_and_resize(orientation, mode):
    # A big JPEG drafted to a small size: orientation and geometry after the draft.
    big = np.asarray(PHOTOS[1].resize((1200, 800), Image.Resampling.LANCZOS))
    processor = ImageProcessor(ResizeConfig(image_size=96, resize_mode=mode))
    out = processor.process(oriented_jpeg(big, orientation))
    assert out.ok and (out.original_width, out.original_height) == (1200, 800)
    got = np.asarray(Image.open(io.BytesIO(out.jpg)))
    # Upright 1200x800 photo: keep_ratio -> 144x96, center_crop and border -> 96x96.
    assert got.shape == ((96, 144, 3) if mode == "keep_ratio" else (96, 96, 3))
    fair = Image.fromarray(big).resize((144, 96), Image.Resampling.LANCZOS)
    if mode == "center_crop":
        fair = fair.crop((24, 0, 120, 96))
    elif mode == "border":
        fair = Image.fromarray(big).resize((96, 64), Image.Resampling.LANCZOS)
        padded = Image.new("RGB", (96, 96), (255, 255, 255))
        padded.paste(fair, (0, 16))
        fair = padded
    assert mae(got, np.asarray(fair)) < MAX_ERROR


# --- Formats and modes -------------------------------------------------------------------------
ALPHA = np.tile(np.linspace(0, 255, PHOTO.shape[1]).astype(np.uint8), (PHOTO.shape[0], 1))
PALETTED = Image.fromarray(PHOTO).quantize(128)  # real palette image, adaptive colours
PALETTE_RGB = np.asarray(PALETTED.convert("RGB"))
# Make the darkest palette entry the transparent one, and paint the left third with it:
# showing it instead of white would be far off.
_palette = np.array(PALETTED.getpalette()[: 3 * 128]).reshape(-1, 3)
_CLEAR = int(_palette.sum(axis=1).argmin())
_indices = np.asarray(PALETTED).copy()
_indices[:, : PHOTO.shape[1] // 3] = _CLEAR
TRANSPARENT_P = Image.fromarray(_indices, "P")
TRANSPARENT_P.putpalette(PALETTED.getpalette())
TRANSPARENT_P.info["transparency"] = _CLEAR
TRANSPARENT_P_VIEW = np.asarray(TRANSPARENT_P.convert("RGB")).copy()
TRANSPARENT_P_VIEW[_indices == _CLEAR] = 255
# Under the transparent pixels, colours a viewer never shows: ignoring alpha must fail.
_UNDER = PHOTO.copy()
_UNDER[ALPHA < 128] = 0
RGBA = Image.fromarray(np.dstack([_UNDER, ALPHA]), "RGBA")
RGBA_VIEW = over_white(_UNDER, ALPHA)
GREY = grey(PHOTO)
LA = Image.fromarray(np.dstack([np.where(ALPHA < 128, 0, GREY).astype(np.uint8), ALPHA]), "LA")
LA_VIEW = as_rgb(over_white(np.where(ALPHA < 128, 0, GREY)[..., None], ALPHA)[..., 0])
BILEVEL = (GREY > 110).astype(np.uint8) * 255
GREY16 = Image.fromarray(GREY.astype(np.uint16) * 257)  # mode I;16, full 16-bit range
BGR16 = PHOTO[..., ::-1].astype(np.uint16) * 257  # cv2 writes 48-bit PNG / TIFF from this


def _cv2(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok
    return buf.tobytes()


def _gif_two_frames() -> bytes:
    second = Image.fromarray(np.zeros_like(PHOTO)).quantize(4)
    return encode(PALETTED, "GIF", save_all=True, append_images=[second], duration=100)


def _webp_two_frames() -> bytes:
    second = Image.fromarray(np.zeros_like(PHOTO))
    return encode(
        Image.fromarray(PHOTO), "WEBP", save_all=True, append_images=[second], lossless=True
    )


P = Image.fromarray(PHOTO)
CASES = {
    # name: (bytes, expected upright RGB, expected sniffed format)
    "jpeg": (encode(P, "JPEG", quality=95), PHOTO, "jpeg"),
    "jpeg progressive": (encode(P, "JPEG", quality=95, progressive=True), PHOTO, "jpeg"),
    "jpeg cmyk (adobe inverted)": (encode(P.convert("CMYK"), "JPEG", quality=95), PHOTO, "jpeg"),
    "jpeg grey": (encode(Image.fromarray(GREY), "JPEG", quality=95), as_rgb(GREY), "jpeg"),
    "png rgb": (encode(P, "PNG"), PHOTO, "png"),
    "png rgba": (encode(RGBA, "PNG"), RGBA_VIEW, "png"),
    "png la": (encode(LA, "PNG"), LA_VIEW, "png"),
    "png l": (encode(Image.fromarray(GREY), "PNG"), as_rgb(GREY), "png"),
    "png 1-bit": (encode(Image.fromarray(BILEVEL).convert("1"), "PNG"), as_rgb(BILEVEL), "png"),
    "png p": (encode(PALETTED, "PNG"), PALETTE_RGB, "png"),
    "png p transparency": (encode(TRANSPARENT_P, "PNG"), TRANSPARENT_P_VIEW, "png"),
    "png 16-bit grey": (encode(GREY16, "PNG"), as_rgb(GREY), "png"),
    "png 16-bit rgb": (_cv2(".png", BGR16), PHOTO, "png"),
    "gif": (encode(PALETTED, "GIF"), PALETTE_RGB, "gif"),
    "gif transparency": (encode(TRANSPARENT_P, "GIF"), TRANSPARENT_P_VIEW, "gif"),
    "gif animated: first frame": (_gif_two_frames(), PALETTE_RGB, "gif"),
    "bmp": (encode(P, "BMP"), PHOTO, "bmp"),
    "tiff": (encode(P, "TIFF"), PHOTO, "tiff"),
    "tiff 16-bit grey": (encode(GREY16, "TIFF"), as_rgb(GREY), "tiff"),
    "tiff 16-bit rgb": (_cv2(".tiff", BGR16), PHOTO, "tiff"),
    "tiff 32-bit int grey": (
        encode(Image.fromarray(GREY.astype(np.int32) * 257, "I"), "TIFF"),
        as_rgb(GREY),
        "tiff",
    ),
    "tiff float grey 0..1": (
        encode(Image.fromarray(GREY.astype(np.float32) / 255, "F"), "TIFF"),
        as_rgb(GREY),
        "tiff",
    ),
    "tiff cmyk": (encode(P.convert("CMYK"), "TIFF"), PHOTO, "tiff"),
    "webp lossy": (encode(P, "WEBP", quality=95), PHOTO, "webp"),
    "webp lossless": (encode(P, "WEBP", lossless=True), PHOTO, "webp"),
    "webp alpha": (encode(RGBA, "WEBP", lossless=True), RGBA_VIEW, "webp"),
    "webp animated: first frame": (_webp_two_frames(), PHOTO, "webp"),
    "ico": (encode(P, "ICO", sizes=[(150, 100)]), PHOTO, "ico"),
}
if features.check("avif"):  # Pillow >= 11.2 decodes AVIF natively
    CASES["avif"] = (encode(P, "AVIF", quality=95), PHOTO, "avif")


@pytest.mark.parametrize("name", list(CASES))
def test_stored_jpeg_matches_the_upright_rgb_view(name):
    data, expected, fmt = CASES[name]
    assert sniff_format(data) == fmt
    out = AS_IS.process(data)
    assert out.ok, (out.reason, out.detail)
    assert out.format == fmt
    assert (out.original_width, out.original_height) == (150, 100)
    assert mae(stored(data), expected) < MAX_ERROR, name


def test_alpha_and_transparency_cases_are_sharp():
    # Dropping alpha instead of matting on white would show the hidden colours: far off.
    assert mae(np.asarray(RGBA.convert("RGB")), RGBA_VIEW) > 2 * MAX_ERROR
    assert mae(as_rgb(np.asarray(LA.convert("L"))), LA_VIEW) > 2 * MAX_ERROR
    assert mae(np.asarray(TRANSPARENT_P.convert("RGB")), TRANSPARENT_P_VIEW) > 2 * MAX_ERROR
    # Clipping 16-bit grey at 255 (Pillow's own convert) gives a white image: far off.
    assert mae(as_rgb(np.asarray(GREY16.convert("L"))), as_rgb(GREY)) > 2 * MAX_ERROR


def test_keep_ratio_downscale_of_each_encoding():
    processor = ImageProcessor(ResizeConfig(image_size=50, resize_mode="keep_ratio"))
    for name, (data, expected, _) in CASES.items():
        got = stored(data, processor)
        assert got.shape == (50, 75, 3), name
        fair = np.asarray(Image.fromarray(expected).resize((75, 50), Image.Resampling.LANCZOS))
        assert mae(got, fair) < MAX_ERROR, name


# --- ICC profiles ------------------------------------------------------------------------------
def _s15(v: float) -> bytes:
    return struct.pack(">i", round(v * 65536))


def matrix_profile(description: str, colorants, gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile (matrix/TRC), written per the ICC.1 spec.

    Pillow can create only sRGB/LAB/XYZ profiles and none ships on this machine, so the test
    writes its own, as cameras and editors embed them (Adobe RGB is such a profile).
    """

    def xyz(x, y, z):
        return b"XYZ " + b"\0" * 4 + _s15(x) + _s15(y) + _s15(z)

    curve = b"curv" + b"\0" * 4 + struct.pack(">IH", 1, round(gamma * 256)) + b"\0\0"
    ascii_ = description.encode() + b"\0"
    desc = b"desc" + b"\0" * 4 + struct.pack(">I", len(ascii_)) + ascii_
    desc += struct.pack(">II", 0, 0) + struct.pack(">HB", 0, 0) + b"\0" * 67
    tags = [
        (b"desc", desc),
        (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(*colorants[0])),
        (b"gXYZ", xyz(*colorants[1])),
        (b"bXYZ", xyz(*colorants[2])),
        (b"rTRC", curve),
        (b"gTRC", curve),
        (b"bTRC", curve),
        (b"cprt", b"text" + b"\0" * 4 + b"no copyright, test data\0"),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = struct.pack(">I", len(tags)), b""
    for sig, data in tags:
        data += b"\0" * (-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000)
    header += b"mntrRGB XYZ " + b"\0" * 12 + b"acsp" + b"\0" * 24 + struct.pack(">I", 0)
    header += _s15(0.9642) + _s15(1.0) + _s15(0.8249)
    header += b"\0" * (128 - len(header))
    return header + table + body


# D50-adapted colorants and gamma of Adobe RGB (1998) (as in Adobe's published profile) and of
# ProPhoto RGB (ROMM, wide gamut).
ADOBE_RGB = matrix_profile(
    "Adobe RGB (1998) compatible",
    [(0.60974, 0.31111, 0.01947), (0.20528, 0.62567, 0.06087), (0.14919, 0.06322, 0.74457)],
    563 / 256,
)
PROPHOTO_RGB = matrix_profile(
    "ProPhoto RGB compatible",
    [(0.7977, 0.2880, 0.0), (0.1352, 0.7119, 0.0001), (0.0313, 0.0001, 0.8249)],
    1.8,
)


@pytest.mark.parametrize(
    "icc, ignored_error", [(ADOBE_RGB, 5.0), (PROPHOTO_RGB, 2 * MAX_ERROR)], ids=["adobe", "pro"]
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_embedded_icc_profile_is_converted_to_srgb(icc, ignored_error, fmt):
    photo = np.asarray(PHOTOS[0])  # full size: little JPEG noise next to the colour shift
    tagged = Image.fromarray(photo)
    data = encode(tagged, fmt, quality=95, icc_profile=icc)
    # Oracle: LittleCMS's own conversion of the original pixels from the profile to sRGB.
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = ImageCms.createProfile("sRGB")
    truth = np.asarray(ImageCms.profileToProfile(tagged, profile, srgb, outputMode="RGB"))
    assert mae(stored(data), truth) < 2.5
    # Ignoring the profile shows the numbers as if they were sRGB: visibly off the truth.
    assert mae(photo, truth) > ignored_error


def test_broken_icc_profile_keeps_the_pixels():
    data = encode(P, "JPEG", quality=95, icc_profile=b"not a profile" * 20)
    assert mae(stored(data), PHOTO) < MAX_ERROR


# --- Failures ----------------------------------------------------------------------------------
def _png_with_header_size(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_failures_have_their_reasons():
    jpeg = CASES["jpeg"][0]
    png = CASES["png rgb"][0]
    expected = {
        b"<!DOCTYPE html><html><body>Not Found</body></html>": "bad_magic",
        b"": "bad_magic",
        b"RIFF\x10\x00\x00\x00WAVEfmt ": "bad_magic",
        b"\x00\x00\x00\x18ftypisom\x00\x00\x00\x00isommp41": "bad_magic",  # an MP4 video
        jpeg[: len(jpeg) // 2]: "truncated",
        png[: len(png) // 2]: "truncated",
        _png_with_header_size(100_000, 100_000): "decompression_bomb",
        jpeg[:2] + b"\xff" + bytes(200) + b"\xff\xd9": "decode_error",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic": "decode_error",  # no HEIF decoder
    }
    for data, reason in expected.items():
        out = AS_IS.process(data)
        assert not out.ok and out.reason == reason and out.detail, (data[:20], out)
    small_cap = ImageProcessor(ResizeConfig(max_pixels=150 * 100 - 1))
    out = small_cap.process(png)
    assert (out.ok, out.reason) == (False, "decompression_bomb") and "150x100" in out.detail
    assert ImageProcessor(ResizeConfig(max_pixels=150 * 100)).process(png).ok


def test_sniff_format_recognises_each_container():
    assert sniff_format(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf") == "avif"
    assert sniff_format(b"\x00\x00\x00\x18ftypavis\x00\x00\x00\x00avismsf1") == "avif"
    assert sniff_format(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic") == "heif"
    assert sniff_format(b"II+\x00\x08\x00\x00\x00") == "tiff"  # BigTIFF
    assert sniff_format(b"\x00\x00\x00\x0cjP  \r\n\x87\n") == "jpeg2000"
    for webp in ("webp lossy", "webp lossless", "webp alpha"):
        assert sniff_format(CASES[webp][0]) == "webp"
    assert sniff_format(b"<html>") == sniff_format(b"%PDF-1.7") == ""


REASONS = {"bad_magic", "truncated", "decode_error", "decompression_bomb"}


def test_process_never_raises_on_mutated_files():
    rng = random.Random(16)
    originals = [data for data, _, _ in CASES.values()]
    processor = ImageProcessor(ResizeConfig(image_size=32, resize_mode="center_crop"))
    outcomes = {True: 0, False: 0}
    for i in range(300):
        data = bytearray(rng.choice(originals))
        kind = i % 4
        if kind == 0:  # truncated anywhere
            data = data[: rng.randrange(len(data))]
        elif kind == 1:  # bytes flipped, header included
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(min(len(data), 400))] = rng.randrange(256)
        elif kind == 2:  # garbage inserted in the middle
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 64))
        else:  # a valid magic followed by noise
            data = data[:12] + rng.randbytes(rng.randint(0, 2000))
        out = processor.process(bytes(data))  # must not raise
        outcomes[out.ok] += 1
        if out.ok:
            img = Image.open(io.BytesIO(out.jpg))
            assert img.size == (out.width, out.height) == (32, 32)
        else:
            assert out.reason in REASONS and out.detail
    assert outcomes[True] and outcomes[False]  # both kinds occurred: the fuzz reaches decoding
