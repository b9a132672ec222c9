"""Safe sample decoders: an explicit handler per extension, so nothing is ever unpickled.

webdataset's default decoders call `pickle.loads` on .pkl/.pyd and `torch.load` on .pth; a shard
is untrusted input, so only the formats below are decoded and every other field is dropped.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from PIL import Image

# A featurized image is at most a few megapixels; anything far larger is a decompression bomb.
MAX_IMAGE_PIXELS = 64_000_000


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"image of {image.width}x{image.height} exceeds the pixel limit")
        return image.convert("RGB")


def decode_text(data: bytes) -> str:
    return data.decode("utf-8")


def decode_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


def decode_npy(data: bytes) -> np.ndarray:
    # allow_pickle=False refuses object arrays, the one way .npy can carry code.
    return np.load(io.BytesIO(data), allow_pickle=False)


def _handler_for(ext: str) -> Callable[[bytes], Any] | None:
    last = ext.rsplit(".", 1)[-1]
    if last in ("jpg", "jpeg", "png", "webp"):
        return decode_image
    if last in ("txt", "text"):
        return decode_text
    if last == "json":
        return decode_json
    if last == "npy":
        return decode_npy
    return None


def decode_sample(raw: dict[str, Any], wanted: Iterable[str] | None = None) -> dict[str, Any]:
    """Raw tar members of one key → decoded fields; unknown extensions are dropped, never parsed.

    `wanted` limits decoding to the listed extensions (a text-only recipe need not decode jpg).
    """
    wanted_set = None if wanted is None else set(wanted)
    out: dict[str, Any] = {"__key__": raw["__key__"]}
    for ext, value in raw.items():
        if ext.startswith("__"):
            continue
        if wanted_set is not None and ext not in wanted_set:
            continue
        handler = _handler_for(ext)
        if handler is not None:
            out[ext] = handler(value)
    return out
