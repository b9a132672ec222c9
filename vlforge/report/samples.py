"""One pass over the shards: per-sample figures for the distributions (boxes per image, tag
frequencies, scene-graph sizes, mined negatives) and a spread of full samples for the grid.

Shards are read with tarfile in stream mode, grouped by key the way webdataset does (the part of
the file name before its first dot), so no torch import is needed; only the small members are
decoded, and images only for the samples the grid shows.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The fields a grid sample keeps; every other member (feats.npy, …) is skipped unread.
GRID_FIELDS = ("jpg", "png", "jpeg", "webp", "txt", "json", "boxes.npy", "cls_prob.npy")
FIGURE_FIELDS = ("txt", "tags.json", "sg.json", "mine.json", "boxes.npy")
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


@dataclass
class ShardFigures:
    shards: int = 0  # shards given
    shards_read: int = 0  # shards opened before both the scan and the grid were done
    scanned: int = 0  # samples counted into the distributions (at most max_scan)
    boxes_per_image: list[int] = field(default_factory=list)
    tags: Counter = field(default_factory=Counter)
    sg_objects: list[int] = field(default_factory=list)
    sg_attributes: list[int] = field(default_factory=list)
    sg_relations: list[int] = field(default_factory=list)
    hard_negatives: list[int] = field(default_factory=list)
    rewrites: list[int] = field(default_factory=list)
    rewrite_kinds: Counter = field(default_factory=Counter)
    fields: Counter = field(default_factory=Counter)  # how many samples carry each field
    grid: list[dict[str, Any]] = field(default_factory=list)


def split_name(name: str) -> tuple[str, str] | None:
    """webdataset's key/extension split: `dir/key.boxes.npy` → ("dir/key", "boxes.npy")."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None
    return name[:dot], name[dot + 1 :]


def iter_samples(path: Path, wanted: Callable[[str], bool]) -> Iterator[dict[str, Any]]:
    """Samples of one shard as {"__key__", ext: bytes, "__fields__": all extensions}; members
    `wanted` rejects are listed but not read. A damaged shard ends early with a warning."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = split_name(member.name)
                if split is None:
                    continue
                key, ext = split
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__fields__": []}
                current["__fields__"].append(ext)
                if wanted(ext):
                    handle = tar.extractfile(member)
                    if handle is not None:
                        current[ext] = handle.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        warnings.warn(f"shard {path}: {err}; skipping the rest of it", stacklevel=2)
    if current is not None:
        yield current


def _json(sample: dict, ext: str) -> Any:
    raw = sample.get(ext)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _npy(sample: dict, ext: str) -> np.ndarray | None:
    raw = sample.get(ext)
    if raw is None:
        return None
    try:
        # allow_pickle=False: a shard is untrusted input.
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except ValueError:
        return None


def _count_into(figures: ShardFigures, sample: dict) -> None:
    figures.fields.update(sample["__fields__"])
    boxes = _npy(sample, "boxes.npy")
    if boxes is not None:
        figures.boxes_per_image.append(int(boxes.shape[0]) if boxes.ndim else 0)
    tags = _json(sample, "tags.json")
    if isinstance(tags, dict):
        figures.tags.update(str(t.get("name")) for t in tags.get("tags", []) if isinstance(t, dict))
    sg = _json(sample, "sg.json")
    if isinstance(sg, dict):
        figures.sg_objects.append(len(sg.get("objects") or []))
        figures.sg_attributes.append(len(sg.get("attributes") or []))
        figures.sg_relations.append(len(sg.get("relations") or []))
    mine = _json(sample, "mine.json")
    if isinstance(mine, dict):
        figures.hard_negatives.append(len(mine.get("hard_negatives") or []))
        rewrites = mine.get("rewrites") or []
        figures.rewrites.append(len(rewrites))
        figures.rewrite_kinds.update(str(r.get("kind")) for r in rewrites if isinstance(r, dict))


def grid_sample(sample: dict) -> dict[str, Any]:
    """The decoded fields the grid shows for one sample."""
    image_ext = next((e for e in IMAGE_FIELDS if e in sample), None)
    text = sample.get("txt")
    return {
        "key": sample["__key__"].rsplit("/", 1)[-1],
        "image": sample.get(image_ext) if image_ext else None,
        "caption": text.decode("utf-8", errors="replace") if text else "",
        "meta": _json(sample, "json") or {},
        "boxes": _npy(sample, "boxes.npy"),
        "cls_prob": _npy(sample, "cls_prob.npy"),
        "tags": (_json(sample, "tags.json") or {}).get("tags", []),
        "sg": _json(sample, "sg.json"),
        "mine": _json(sample, "mine.json"),
    }


def scan_shards(
    shards: list[Path],
    grid_size: int = 48,
    max_scan: int = 20_000,
    progress: Callable[[int, int], None] | None = None,
) -> ShardFigures:
    """Figures over the first `max_scan` samples; the grid takes the first few samples of every
    shard (so it spans the corpus rather than showing one shard) up to `grid_size`. Reading stops
    once both are done, so a web-scale corpus costs a bounded pass."""
    figures = ShardFigures(shards=len(shards))
    per_shard = math.ceil(grid_size / len(shards)) if shards else 0
    for index, path in enumerate(shards):
        if figures.scanned >= max_scan and len(figures.grid) >= grid_size:
            break
        state = {"taken": 0}

        def wanted(ext: str, state: dict = state) -> bool:
            counting = figures.scanned < max_scan and ext in FIGURE_FIELDS
            showing = state["taken"] < per_shard and len(figures.grid) < grid_size
            return counting or (showing and ext in GRID_FIELDS)

        for sample in iter_samples(path, wanted):
            if figures.scanned < max_scan:
                _count_into(figures, sample)
                figures.scanned += 1
            if state["taken"] < per_shard and len(figures.grid) < grid_size:
                figures.grid.append(grid_sample(sample))
                state["taken"] += 1
        figures.shards_read = index + 1
        if progress is not None:
            progress(index + 1, len(shards))
    return figures
