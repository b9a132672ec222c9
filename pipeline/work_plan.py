"""The run's work directory: input split into chunks, and per-chunk crawl checkpoints.

Layout under `OUT/_work/`: `plan.json` (fingerprint of the input and of the settings that shape
crawl results, the pieces the input was read in), `input/chunk-N.parquet` (normalized rows,
written by the workers: pipeline/plan_stage.py), `fetched/chunk-N.parquet` (crawl results with
image bytes). A chunk is done exactly when its fetched file exists: that is what lets a rerun
resume where it stopped, and a rerun after completion make no request at all.

The launcher plans from metadata only (pipeline/input_splits.py): it never reads a row.
`plan.json` is written last, once every input chunk is, so a run stopped while planning plans
again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import pyarrow as pa

from vlforge.errors import UserError
from vlforge.pipeline import storage
from vlforge.pipeline.input_lists import ListFile, Piece
from vlforge.pipeline.input_splits import number_pieces, plan_pieces

# Columns of an input chunk.
INPUT_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("dup_of", pa.int64()),  # the first row with the same normalized URL, or -1
        ("extra", pa.string()),
        ("source", pa.string()),
    ]
)
PLAN_VERSION = 2  # 1: the launcher read every row and wrote the chunks itself


@dataclass(frozen=True)
class WorkPlan:
    out_dir: str
    n_rows: int
    chunk_size: int
    n_chunks: int

    @property
    def work_dir(self) -> str:
        return storage.join(self.out_dir, "_work")

    def input_path(self, chunk: int) -> str:
        return storage.join(self.work_dir, "input", f"chunk-{chunk:06d}.parquet")

    def fetched_path(self, chunk: int) -> str:
        return storage.join(self.work_dir, "fetched", f"chunk-{chunk:06d}.parquet")

    def done_chunks(self) -> set[int]:
        done = storage.glob(storage.join(self.work_dir, "fetched", "chunk-*.parquet"))
        return {int(p.rsplit("chunk-", 1)[1].split(".")[0]) for p in done}


@dataclass(frozen=True)
class InputSpec:
    """Which lists, which columns, and whether repeated URLs are marked."""

    label: str  # what the user passed (--urls), for messages
    files: list[ListFile]
    url_col: str = "url"
    caption_col: str = "caption"
    dedup_urls: bool = True


def fingerprint(spec: InputSpec, settings: dict) -> str:
    """From each list's path, size and head/tail digest (metadata: the rows are not read)."""
    digest = hashlib.sha256(f"v{PLAN_VERSION}\x00{spec.url_col}\x00{spec.caption_col}".encode())
    for f in spec.files:
        digest.update(f"{f.digest}\x00{','.join(f.columns)}\x00".encode())
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:24]


# run(build, items): build a Beam pipeline with `build(pipeline)` and run it to the end, spread
# over `items` work items.
Runner = Callable[[Callable[[Any], Any], int], Any]


def prepare(
    out_dir: str, spec: InputSpec, chunk_size: int, settings: dict, overwrite: bool, run: Runner
) -> WorkPlan:
    """Have the workers write the chunked input once; on a rerun check it is the same input and
    settings (and read nothing)."""
    from vlforge.pipeline.plan_stage import build_count, build_split

    probe = WorkPlan(out_dir, 0, chunk_size, 0)
    plan_path = storage.join(probe.work_dir, "plan.json")
    print_fp = fingerprint(spec, {**settings, "chunk_size": chunk_size})
    if storage.exists(plan_path) and not overwrite:
        previous = storage.read_json(plan_path)
        if previous.get("fingerprint") != print_fp:
            raise UserError(
                f"{out_dir} holds a run of a different list or different settings; "
                "use another --out or pass --overwrite to start it again"
            )
        return WorkPlan(out_dir, previous["n_rows"], chunk_size, previous["n_chunks"])
    pieces = plan_pieces(spec.files, chunk_size)
    if all(p.n_rows >= 0 for p in pieces) and sum(p.n_rows for p in pieces) == 0:
        raise UserError(f"{spec.label}: the list has no rows")  # known from metadata alone
    if overwrite:
        stale = storage.glob(storage.join(probe.work_dir, "*", "chunk-*.parquet"))
        storage.delete(stale + storage.glob(plan_path))
    for sub in ("input", "fetched"):
        storage.makedirs(storage.join(probe.work_dir, sub))
    uncounted = [p for p in pieces if p.n_rows < 0]
    if uncounted:
        path = storage.join(probe.work_dir, "count-summary.json")
        run(lambda p: build_count(p, uncounted, spec.url_col, path), len(uncounted))
        pieces = _counted(pieces, _summary(path))
    pieces, n_rows, n_chunks = number_pieces(pieces, chunk_size)
    if n_rows == 0:
        raise UserError(f"{spec.label}: the list has no rows")
    plan = WorkPlan(out_dir, n_rows, chunk_size, n_chunks)
    path = storage.join(plan.work_dir, "split-summary.json")
    run(
        lambda p: build_split(
            p, pieces, plan, spec.url_col, spec.caption_col, spec.dedup_urls, path
        ),
        len(pieces),
    )
    split = _summary(path)
    if (split["rows"], split["chunks"]) != (n_rows, n_chunks):
        raise UserError(
            f"{spec.label}: planned {n_rows} rows in {n_chunks} chunks, the workers wrote "
            f"{split['rows']} in {split['chunks']} (did a list change during the run?)"
        )
    storage.write_json(
        plan_path,
        {
            "version": PLAN_VERSION,
            "fingerprint": print_fp,
            "n_rows": n_rows,
            "n_chunks": n_chunks,
            "chunk_size": chunk_size,
            "duplicate_urls": split["duplicate_urls"],
            "settings": settings,
            "pieces": [_piece_json(p) for p in pieces],
        },
    )
    return plan


def _summary(path: str) -> dict:
    summary = storage.read_json(path)
    if summary["errors"]:
        raise UserError(summary["errors"][0].splitlines()[0])
    return summary


def _counted(pieces: list[Piece], summary: dict) -> list[Piece]:
    counts = {c["index"]: c for c in summary["pieces"]}
    out = []
    for piece in pieces:
        if piece.n_rows < 0:
            c = counts[piece.index]
            piece = replace(piece, n_rows=c["n_rows"], byte_range=tuple(c["byte_range"]))
        out.append(piece)
    return out


def _piece_json(piece: Piece) -> dict:
    out = asdict(piece)
    del out["columns"]
    return out
