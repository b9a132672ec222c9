"""The demo world's URL list: one row per (seed, index), with the truth in a `world` column.

Nothing is rendered here (the server renders lazily), so a million rows take minutes, not hours.

URL scheme (paths under `base_url`; the server needs nothing but the path to answer):

    /w/{seed}/img/{i}.jpg            scene i, JPEG quality 90 (clean, mismatched and the rows a
                                     caption filter drops before any request)
    /w/{seed}/dupimg/{src}-{i}.jpg   byte-identical to /w/{seed}/img/{src}.jpg
    /w/{seed}/near/{src}-{i}.jpg     scene src re-rendered with jitter 1-2 px at quality 75-85
    /w/{seed}/tiny/{i}.jpg           scene i drawn at 48x36
    /w/{seed}/wide/{i}.jpg           scene i drawn at 960x240 (aspect 4; shorter side >= 200)
    /w/{seed}/fault/{kind}/{i}.jpg   one of mess.FAULT_KINDS (redirect_ok adds ?hop=1, ?hop=2)
    /w/{seed}/fault/hold/{i}.jpg     test-only: blocks until WorldServer.release_holds()
    /private/{seed}/{i}.jpg          scene i, under a prefix /robots.txt disallows for everyone
    http://10.23.0.1/w/{seed}/img/{i}.jpg   private_url rows: never served, must never be asked

A dup_url row repeats its source row's URL and caption exactly. Sources of dup_url, dup_image
and near_dup rows are clean rows with a smaller index.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from vlforge.errors import UserError
from vlforge.world.captions import caption_scene, foreign_caption, short_caption
from vlforge.world.mess import DEFAULT_MESS_FRACTION, FAULT_KINDS, allocate
from vlforge.world.questions import scene_questions
from vlforge.world.scene import Scene, image_graph, sample_scene, scene_rng

JPEG_QUALITY = 90
TINY_SIZE = (48, 36)
WIDE_SIZE = (960, 240)  # aspect 4 > 3 while the shorter side stays >= 200, so only aspect fails
PRIVATE_BASE = "http://10.23.0.1"
PRIVATE_REDIRECT_TARGET = "http://169.254.169.254/latest/meta-data/x.jpg"
ROBOTS_DISALLOWED_PREFIX = "/private/"
FORMATS = (".parquet", ".csv", ".tsv", ".jsonl")
COLUMNS = ("url", "caption", "world", "questions")
_BATCH = 20_000


# ---- paths ------------------------------------------------------------------------------------


def image_path(seed: int, index: int) -> str:
    return f"/w/{seed}/img/{index}.jpg"


def dup_image_path(seed: int, source: int, index: int) -> str:
    return f"/w/{seed}/dupimg/{source}-{index}.jpg"


def near_path(seed: int, source: int, index: int) -> str:
    return f"/w/{seed}/near/{source}-{index}.jpg"


def tiny_path(seed: int, index: int) -> str:
    return f"/w/{seed}/tiny/{index}.jpg"


def wide_path(seed: int, index: int) -> str:
    return f"/w/{seed}/wide/{index}.jpg"


def fault_path(seed: int, kind: str, index: int) -> str:
    return f"/w/{seed}/fault/{kind}/{index}.jpg"


def robots_disallowed_path(seed: int, index: int) -> str:
    return f"{ROBOTS_DISALLOWED_PREFIX}{seed}/{index}.jpg"


def near_params(index: int) -> tuple[int, int]:
    """(jitter px, JPEG quality) of a near-duplicate row: byte-different, perceptually equal."""
    return 1 + index % 2, 75 + 5 * (index % 3)


# ---- rows -------------------------------------------------------------------------------------


def _truth(scene: Scene, index: int, kind: str, caption_graph: dict, jitter: int = 0) -> dict:
    return {
        "index": index,
        "kind": kind,
        "width": scene.width,
        "height": scene.height,
        "boxes": [[round(v + jitter, 1) for v in o.box] for o in scene.objects],
        "labels": [o.shape for o in scene.objects],
        "colours": [o.colour for o in scene.objects],
        "sizes": [o.size for o in scene.objects],
        "scene_graph": caption_graph,  # what the caption says
        "image_graph": image_graph(scene),  # everything true of the image
    }


def clean_caption(seed: int, index: int) -> tuple[str, dict]:
    """The caption (and graph) a clean row at `index` carries: a pure function of (seed, index)."""
    return caption_scene(sample_scene(seed, index), scene_rng(seed, index, "caption"))


def _row(seed: int, index: int, kind: str, n: int, base: str, clean_before: list[int]) -> dict:
    rng = scene_rng(seed, index, "caption")
    extra: dict = {}
    jitter = 0
    if kind in ("dup_url", "dup_image", "near_dup"):
        source = clean_before[scene_rng(seed, index, "source").randrange(len(clean_before))]
        scene = sample_scene(seed, source)
        extra["source"] = source
        if kind == "dup_url":
            caption, graph = clean_caption(seed, source)
            url = base + image_path(seed, source)
        elif kind == "dup_image":
            caption, graph = caption_scene(scene, rng)
            url = base + dup_image_path(seed, source, index)
        else:
            caption, graph = caption_scene(scene, rng)
            url = base + near_path(seed, source, index)
            jitter, extra["jpeg_quality"] = near_params(index)
            extra["jitter"] = jitter
    else:
        size = TINY_SIZE if kind == "tiny" else WIDE_SIZE if kind == "extreme_aspect" else None
        scene = sample_scene(seed, index, *size) if size else sample_scene(seed, index)
        url = base + image_path(seed, index)
        if kind == "mismatched" and n > 1:
            other = rng.randrange(n - 1)
            other += other >= index
            # A fresh caption of the other scene (another stream), not a copy of its row's caption.
            caption, graph = caption_scene(
                sample_scene(seed, other), scene_rng(seed, index, "mismatch")
            )
            extra["caption_of"] = other
        elif kind == "short_caption":
            caption, graph = short_caption(scene, rng)
        elif kind == "non_english":
            caption, graph = foreign_caption(scene, rng)
        else:
            caption, graph = caption_scene(scene, rng)
        if kind == "blocklisted":
            caption = rng.choice(("nsfw ", "NSFW: ")) + caption
        elif kind == "tiny":
            url = base + tiny_path(seed, index)
        elif kind == "extreme_aspect":
            url = base + wide_path(seed, index)
        elif kind == "robots_disallowed":
            url = base + robots_disallowed_path(seed, index)
        elif kind == "private_url":
            url = PRIVATE_BASE + image_path(seed, index)
        elif kind in FAULT_KINDS:
            url = base + fault_path(seed, kind, index)
    truth = _truth(scene, index, kind, graph, jitter)
    truth.update(extra)
    # Questions about the image (its scene, whatever the caption says), for image-QA heads.
    questions = scene_questions(scene, scene_rng(seed, index, "questions"))
    return {
        "url": url,
        "caption": caption,
        "world": json.dumps(truth, separators=(",", ":")),
        "questions": json.dumps(questions, separators=(",", ":")),
    }


def iter_rows(
    n: int, seed: int, base_url: str, mess_fraction: float = DEFAULT_MESS_FRACTION
) -> Iterator[dict]:
    """Rows {url, caption, world, questions}; deterministic given (n, seed, mess_fraction)."""
    base = base_url.rstrip("/")
    clean_before: list[int] = []
    for index, kind in enumerate(allocate(n, seed, mess_fraction)):
        yield _row(seed, index, kind, n, base, clean_before)
        if kind == "clean":
            clean_before.append(index)


# ---- writing ----------------------------------------------------------------------------------


def _batches(rows: Iterator[dict], size: int = _BATCH) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write(rows: Iterator[dict], path: Path, suffix: str) -> None:
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([(c, pa.string()) for c in COLUMNS])
        with pq.ParquetWriter(path, schema, compression="zstd") as writer:
            for batch in _batches(rows):
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        return
    with path.open("w", encoding="utf-8", newline="") as handle:
        if suffix == ".jsonl":
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            return
        writer = csv.writer(handle, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([row[c] for c in COLUMNS])


def make_url_list(
    n: int,
    seed: int,
    base_url: str,
    out: str | Path,
    mess_fraction: float = DEFAULT_MESS_FRACTION,
) -> Path:
    """Write n rows to `out` (format from its extension), atomically; returns the path."""
    out = Path(out)
    if n < 1:
        raise UserError(f"--n must be a positive number of rows, got {n}")
    if not 0.0 <= mess_fraction <= 0.8:
        raise UserError(f"--mess-fraction must be within 0..0.8, got {mess_fraction}")
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(
            f"cannot write {out.name!r}: the extension must be one of {', '.join(FORMATS)}"
        )
    if out.is_dir():
        raise UserError(f"{out} is a directory; give a file name such as {out / 'urls.parquet'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out.parent}: {err.strerror or err}") from err
    # Same directory as the target so the final rename is atomic; readers never see half a list.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}")
    try:
        _write(iter_rows(n, seed, base_url, mess_fraction), tmp, suffix)
        os.replace(tmp, out)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror or err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return out


def summarize(n: int, seed: int, mess_fraction: float = DEFAULT_MESS_FRACTION) -> Counter:
    """Rows per kind of the list make_url_list would write (cheap: no rows are built)."""
    return Counter(allocate(n, seed, mess_fraction))
