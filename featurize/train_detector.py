"""Train the small Faster R-CNN from scratch on demo-world images, deterministically, on CPU.

Images are rendered in memory and passed through the corpus's own resizer (img2dataset, 256 px,
`border` mode: longest side to 256, centred white padding, JPEG q95), and the truth boxes follow
the same map, so the detector learns exactly the pixels featurize will later see.

Determinism: one seed drives the model init, the sample order and the flips; the thread count is
fixed (default 1) and recorded; deterministic algorithms are requested (warn-only, since a CPU
kernel without a deterministic variant must not stop a run).
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from PIL import Image

from vlforge.featurize.attribute_head import NO_ATTRIBUTE
from vlforge.featurize.detector import BACKGROUND, DetectorConfig, build_detector, save_detector
from vlforge.featurize.detector_eval import attribute_accuracy, map50
from vlforge.world.render import render_scene
from vlforge.world.scene import COLOURS, SHAPES, SIZES, sample_scene

Log = Callable[[str], None]

CLASS_NAMES = [BACKGROUND, *SHAPES]  # label i ↔ CLASS_NAMES[i]; 0 is the background
# The attribute head's vocabulary: every world object has one colour and one size.
ATTRIBUTE_NAMES = [NO_ATTRIBUTE, *COLOURS, *SIZES]
ATTRIBUTE_GROUPS = {"colour": list(COLOURS), "size": list(SIZES)}


@dataclass
class Example:
    key: str
    jpg: bytes  # the corpus's resized JPEG
    image: np.ndarray  # H×W×3 uint8 RGB, decoded from jpg
    boxes: np.ndarray  # float32 K×4 xyxy pixels of `image`
    labels: np.ndarray  # int64 K, indices into CLASS_NAMES
    attributes: np.ndarray  # float32 K×A multi-hot over ATTRIBUTE_NAMES


@cache
def _processor(image_size: int):
    # Imported lazily: the resizer pulls in cv2 and albumentations, seconds that only training needs.
    from vlforge.pipeline.image_processing import ImageProcessor, ResizeConfig

    return ImageProcessor(ResizeConfig(image_size=image_size))


def border_geometry(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """(x scale, y scale, x offset, y offset) of img2dataset's `border` resize (albumentations
    LongestMaxSize, then PadIfNeeded centred)."""
    scale = size / max(width, height)
    new_w, new_h = round(width * scale), round(height * scale)
    return (
        new_w / width,
        new_h / height,
        float(int((size - new_w) / 2)),
        float(int((size - new_h) / 2)),
    )


def world_example(seed: int, index: int, image_size: int = 256) -> Example:
    """World image (seed, index) as the corpus stores it, with its truth boxes and labels."""
    scene = sample_scene(seed, index)
    buffer = io.BytesIO()
    render_scene(scene).save(buffer, "JPEG", quality=95)
    processed = _processor(image_size).process(buffer.getvalue())
    if not processed.ok:  # cannot happen for a rendered scene; say so loudly if it does
        raise RuntimeError(f"world image {seed}/{index} failed to resize: {processed.reason}")
    sx, sy, ox, oy = border_geometry(scene.width, scene.height, image_size)
    boxes = np.array(
        [
            [o.box[0] * sx + ox, o.box[1] * sy + oy, o.box[2] * sx + ox, o.box[3] * sy + oy]
            for o in scene.objects
        ],
        np.float32,
    ).reshape(-1, 4)
    labels = np.array([CLASS_NAMES.index(o.shape) for o in scene.objects], np.int64)
    attributes = np.zeros((len(scene.objects), len(ATTRIBUTE_NAMES)), np.float32)
    for k, o in enumerate(scene.objects):
        attributes[k, ATTRIBUTE_NAMES.index(o.colour)] = 1.0
        attributes[k, ATTRIBUTE_NAMES.index(o.size)] = 1.0
    with Image.open(io.BytesIO(processed.jpg)) as img:
        image = np.array(img.convert("RGB"), np.uint8)  # writable: torch.from_numpy needs it
    return Example(f"world-{seed}-{index:06d}", processed.jpg, image, boxes, labels, attributes)


def world_examples(seed: int, n: int, start: int = 0, image_size: int = 256) -> list[Example]:
    return [world_example(seed, i, image_size) for i in range(start, start + n)]


def _batch(examples: list[Example], flips: torch.Tensor) -> tuple[list[torch.Tensor], list[dict]]:
    images, targets = [], []
    for ex, flip in zip(examples, flips.tolist(), strict=True):
        image = torch.from_numpy(ex.image).permute(2, 0, 1).float().div_(255.0)
        boxes = torch.from_numpy(ex.boxes.copy())
        if flip:  # every world shape is mirror-symmetric, so a horizontal flip keeps its label
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack(
                [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1
            )
        images.append(image)
        targets.append(
            {
                "boxes": boxes,
                "labels": torch.from_numpy(ex.labels.copy()),
                "attributes": torch.from_numpy(ex.attributes.copy()),
            }
        )
    return images, targets


def _describe(figures: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3f}" for name, value in figures.items())


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine to 2% of the peak


def evaluate_world(model: torch.nn.Module, seed: int, n: int) -> dict[str, float]:
    """mAP@0.5 of the detector and, with an attribute head, its colour and size accuracy on the
    true boxes of `n` world images of `seed`."""
    examples = world_examples(seed, n)
    truth = [{"boxes": e.boxes, "labels": e.labels, "attributes": e.attributes} for e in examples]
    images = [e.image for e in examples]
    figures = {"map50": map50(model, images, truth)}
    if hasattr(model.roi_heads, "attribute_head"):
        for group, names in ATTRIBUTE_GROUPS.items():
            columns = [ATTRIBUTE_NAMES.index(a) for a in names]
            figures[f"{group}_accuracy"] = attribute_accuracy(model, images, truth, columns)
    return figures


def train_detector(
    out: str | None,
    n_train: int = 1600,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 2e-3,
    threads: int = 1,
    eval_n: int = 200,
    eval_seed: int | None = None,
    eval_every: int = 0,
    max_steps: int | None = None,
    config: DetectorConfig | None = None,
    with_attributes: bool = True,
    log: Log = print,
) -> tuple[torch.nn.Module, dict]:
    """Train, evaluate mAP@0.5 on `eval_n` world images of `eval_seed`, save to `out` (if given).

    `with_attributes` adds the bottom-up-attention attribute head (colour and size), which also
    makes the pooled region features carry colour and size.

    Returns (model, report): the loss curve (per 25 steps, and every step under `losses`),
    the mAP curve and timings; the sidecar keeps all but the per-step losses.
    """
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(
            out,
            n_train=n_train,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            lr=lr,
            threads=threads,
            eval_n=eval_n,
            eval_seed=eval_seed,
            eval_every=eval_every,
            max_steps=max_steps,
            config=config,
            with_attributes=with_attributes,
            log=log,
        )
    finally:  # a library call leaves the process as it found it
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(deterministic_before)


def _train(
    out: str | None,
    *,
    n_train: int,
    epochs: int,
    seed: int,
    batch_size: int,
    lr: float,
    threads: int,
    eval_n: int,
    eval_seed: int | None,
    eval_every: int,
    max_steps: int | None,
    config: DetectorConfig | None,
    with_attributes: bool,
    log: Log,
) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    eval_seed = seed + 1000 if eval_seed is None else eval_seed
    config = config or DetectorConfig()
    started = time.perf_counter()
    train = world_examples(seed, n_train)
    render_s = time.perf_counter() - started
    log(f"rendered {n_train} training images in {render_s:.1f}s")
    attributes = ATTRIBUTE_NAMES if with_attributes else None
    model = build_detector(CLASS_NAMES, config, attributes)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(n_train / batch_size)
    total = (
        epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    )
    warmup = min(100, max(1, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, total, warmup))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    part_sums: dict[str, float] = {}  # per-loss sums since the last log line
    curve: list[dict] = []
    step = 0
    train_started = time.perf_counter()
    model.train()
    while step < total:
        order = torch.randperm(n_train, generator=generator).tolist()
        for start in range(0, n_train, batch_size):
            if step >= total:
                break
            chunk = [train[i] for i in order[start : start + batch_size]]
            flips = torch.rand(len(chunk), generator=generator) < 0.5
            images, targets = _batch(chunk, flips)
            parts = model(images, targets)
            loss = sum(parts.values())
            for name, value in parts.items():
                part_sums[name] = part_sums.get(name, 0.0) + float(value.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 10.0)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 25 == 0 or step == total:
                recent = float(np.mean(losses[-25:]))
                span = (step - 1) % 25 + 1
                detail = ", ".join(
                    f"{k.removeprefix('loss_')} {v / span:.3f}" for k, v in part_sums.items()
                )
                part_sums.clear()
                log(
                    f"step {step}/{total} loss {recent:.4f} ({detail}; {time.perf_counter() - train_started:.0f}s)"
                )
            if eval_every and step % eval_every == 0 and step < total:
                figures = evaluate_world(model, eval_seed, eval_n)
                curve.append(
                    {"step": step, **figures, "train_s": time.perf_counter() - train_started}
                )
                log(f"step {step}: {_describe(figures)}")
                model.train()
    train_s = time.perf_counter() - train_started
    figures = evaluate_world(model, eval_seed, eval_n) if eval_n else {"map50": float("nan")}
    curve.append({"step": step, **figures, "train_s": train_s})
    model.eval()
    report = {
        "seed": seed,
        "n_train": n_train,
        "epochs": epochs,
        "steps": step,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "eval": {"seed": eval_seed, "n": eval_n, **figures},
        "map50_curve": curve,
        # Mean loss per 25 steps keeps the sidecar small and still shows the curve.
        "loss_curve": [
            round(float(np.mean(losses[i : i + 25])), 4) for i in range(0, len(losses), 25)
        ],
    }
    log(
        f"trained {step} steps in {train_s:.0f}s; on {eval_n} held-out images (seed {eval_seed}): {_describe(figures)}"
    )
    if out:
        save_detector(model, out, CLASS_NAMES, config, attributes, training=report)
        log(f"saved {out} and {out}.json")
    return model, {**report, "losses": losses}
