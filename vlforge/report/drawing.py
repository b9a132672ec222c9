"""Detected boxes drawn on a sample's image, returned as an inline `data:` URI (no files beside
the page, so the report stays one self-contained HTML file).

Labels come from `cls_prob.npy` with the class names and background column that featurize
records in the sample's json (`regions.class_names`, `regions.cls_prob_background_column`): the
label is the best non-background class, and the box's score is that class's probability.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Small crawled images are scaled up so boxes and labels stay readable in the grid.
DISPLAY_SIDE = 256
# Boxes at or above this score are drawn; if none is, the few best are, so a weak detector still
# shows what it found. Featurize keeps 10-100 boxes per image, too many to draw all.
DRAW_SCORE = 0.5
MIN_DRAWN = 3
MAX_DRAWN = 20
COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")


@dataclass
class Box:
    xyxy: tuple[float, float, float, float]
    label: str
    class_id: int
    score: float


def label_boxes(
    boxes: np.ndarray | None,
    cls_prob: np.ndarray | None,
    class_names: list[str] | None,
    background_column: int | None,
) -> list[Box]:
    """Every box with its best foreground class; boxes without class probabilities get "box"."""
    if boxes is None or boxes.ndim != 2 or boxes.shape[1] != 4:
        return []
    out = []
    for i, xyxy in enumerate(boxes.astype(np.float64)):
        label, class_id, score = "box", -1, 1.0
        if cls_prob is not None and cls_prob.ndim == 2 and i < cls_prob.shape[0]:
            probs = cls_prob[i].astype(np.float64)
            if background_column is not None and 0 <= background_column < probs.shape[0]:
                probs = probs.copy()
                probs[background_column] = -1.0
            class_id = int(np.argmax(probs))
            score = float(probs[class_id])
            names = class_names or []
            label = names[class_id] if class_id < len(names) else f"class {class_id}"
        out.append(Box(tuple(float(v) for v in xyxy), label, class_id, score))
    return out


def boxes_to_draw(boxes: list[Box]) -> list[Box]:
    ranked = sorted(boxes, key=lambda b: -b.score)
    strong = [b for b in ranked if b.score >= DRAW_SCORE]
    return (strong if strong else ranked[:MIN_DRAWN])[:MAX_DRAWN]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def draw_boxes(image_bytes: bytes, boxes: list[Box]) -> tuple[str, int, int]:
    """The image (RGB, scaled so its longer side is DISPLAY_SIDE) with boxes and labels, as a
    base64 JPEG data URI; also the original width and height."""
    with Image.open(io.BytesIO(image_bytes)) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    scale = DISPLAY_SIDE / max(width, height)
    image = image.resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC
    )
    draw = ImageDraw.Draw(image)
    font = _font(11)
    for box in boxes:
        colour = COLOURS[box.class_id % len(COLOURS)] if box.class_id >= 0 else COLOURS[0]
        x0, y0, x1, y1 = (v * scale for v in box.xyxy)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=2)
        text = f"{box.label} {box.score:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text, font=font)
        # The label sits above the box, or inside its top edge when the box touches the border.
        lift = bottom - top + 2 if y0 >= bottom - top + 2 else 0
        draw.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        draw.text((x0 + 1, y0 - lift), text, fill="white", font=font)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return (
        "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii"),
        width,
        height,
    )
