"""The search index as files that each worker maps, not a value that every task copies.

Why files: on DaskRunner every task that reads a side input computes the side input's whole bag
again inside the task (DaskBagWindowedIterator), so the old SearchIndex value (vectors, TF-IDF
rows, claims: ~0.5 GB per space at 1M captions) was transferred and unpickled once per shard,
and one task gathered every part to build it. Now:

- each text bucket's part (index_part) is written as one `.npz` of plain arrays (no pickle) by
  the task that made it: `write_part` → a PartFile handle of a few numbers;
- the index step (`assemble_files`) streams the parts, in bucket order, into one `.npy` per
  column (np.lib.format.open_memmap: one part in memory at a time) and, for IVF, merges the
  parts' inverted lists on disk (faiss.contrib.ondisk.merge_ondisk, faiss's own recipe for
  indexes larger than RAM); its output is IndexFiles, a handle of a few paths and numbers (staged by mine_phases);
- each worker process opens the files once (`open_index`: np.load(mmap_mode="r"), faiss
  IO_FLAG_MMAP) and keeps them for its life. Mapped pages are page cache shared by the
  processes of a machine, not heap each task allocates again.

The (text, image) pair codes stay sorted per bucket (with per-bucket offsets) rather than
globally: sorting every member's code in one task is what the index step must not do.

With a remote `--out` (gs://, s3://) the assembled files are written locally and uploaded, and a
worker copies the directory to local disk once before mapping it (mmap needs a local file).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import threading
import uuid
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from apache_beam.io.filesystems import FileSystems

from vlforge.pipeline import storage
from vlforge.pipeline.mine_filter import Claims
from vlforge.pipeline.mine_scan import PickledBatch
from vlforge.pipeline.neighbour_config import NeighbourConfig

_CLAIM_FIELDS = tuple(Claims.__dataclass_fields__)


@dataclass
class PartFile:
    """Where one bucket's part of a space's index lies, and its column lengths."""

    space: str
    bucket: int
    start: int  # its first global row
    path: str
    lengths: dict  # column name → length (and "rows", "n_features")
    dtypes: dict  # column name → numpy dtype string


@dataclass
class IndexFiles:
    """One space's assembled index, as the search step reads it (no arrays of size n)."""

    space: str
    n: int
    n_features: int
    reducer: object  # tfidf.Reducer (dim × its kept columns: bounded)
    directory: str
    kind: str  # "flat" or "ivf"
    columns: tuple  # the .npy columns written
    fingerprint: str  # identifies this index, so a worker opens it once


def _encode_graphs(graphs: list) -> tuple[np.ndarray, np.ndarray]:
    """Compact graphs → (uint8 JSON bytes, int64 offsets): arrays an npz holds without pickle."""
    encoded = [json.dumps(g, separators=(",", ":")).encode() for g in graphs]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), np.uint8), offsets


def write_part(
    directory: str,
    space: str,
    bucket: int,
    start: int,
    sparse: sp.csr_matrix,
    pair_codes: np.ndarray,
    first_image: np.ndarray,
    vectors: np.ndarray | None,
    faiss_part: np.ndarray | None,
    claims: Claims | None,
    graphs: list | None,
) -> PartFile:
    """One bucket's rows of a space's index → an .npz under `directory`, and its handle."""
    arrays = {
        "sparse_data": sparse.data.astype(np.float32, copy=False),
        "sparse_indices": sparse.indices.astype(np.int32, copy=False),
        "sparse_indptr": sparse.indptr.astype(np.int64, copy=False),
        "pair_codes": np.sort(pair_codes.astype(np.uint64, copy=False)),
        "first_image": first_image.astype(np.int64, copy=False),
    }
    if vectors is not None:
        arrays["vectors"] = np.ascontiguousarray(vectors, np.float32)
    if faiss_part is not None:
        arrays["faiss_part"] = np.asarray(faiss_part, np.uint8)
    if claims is not None:
        arrays.update({f"claims_{name}": getattr(claims, name) for name in _CLAIM_FIELDS})
    if graphs is not None:
        arrays["graphs_json"], arrays["graphs_offsets"] = _encode_graphs(graphs)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = storage.join(directory, space, f"part-{bucket:06d}.npz")
    storage.makedirs(storage.join(directory, space))
    storage.write_bytes(path, buffer.getvalue())
    lengths = {name: len(value) for name, value in arrays.items()}
    lengths["rows"] = sparse.shape[0]
    lengths["n_features"] = sparse.shape[1]
    dtypes = {name: value.dtype.str for name, value in arrays.items()}
    return PartFile(space, bucket, start, path, lengths, dtypes)


def _load_part(path: str) -> dict:
    with np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


# ---- the index step: parts → one file per column ----------------------------------------------


def _concatenated_columns(parts: list[PartFile]) -> list[str]:
    """Columns every part has (optional ones, e.g. claims, only when all parts carry them)."""
    names = set(parts[0].lengths)
    for part in parts[1:]:
        names &= set(part.lengths)
    skip = {"rows", "n_features", "vectors", "faiss_part"}
    return sorted(names - skip)


def _is_pointer(name: str) -> bool:
    """CSR pointer columns: concatenated without their parts' leading zeros, and offset."""
    return name.endswith("_indptr") or name.endswith("_ptr") or name == "graphs_offsets"


def _total_length(parts: list[PartFile], name: str) -> int:
    if _is_pointer(name):
        return sum(p.lengths[name] - 1 for p in parts) + 1  # pointer columns share their zeros
    return sum(p.lengths[name] for p in parts)


def assemble_files(
    parts: list[PartFile],
    directory: str,
    n: int,
    reducer,
    trained: np.ndarray | None,
    kind: str,
) -> IndexFiles:
    """A space's parts, taken in bucket (= row) order, → its index files under `directory`."""
    parts = sorted(parts, key=lambda p: p.bucket)
    space = parts[0].space
    assert sum(p.lengths["rows"] for p in parts) == n and all(
        p.start == q.start + q.lengths["rows"] for q, p in zip(parts, parts[1:], strict=False)
    ), "index parts must cover the rows once, in order"
    final = storage.join(directory, space, "index")
    remote = "://" in final
    local = tempfile.mkdtemp(prefix="vlforge-index-") if remote else final
    os.makedirs(local, exist_ok=True)
    columns = _concatenated_columns(parts)
    out = {}
    for name in columns:
        out[name] = np.lib.format.open_memmap(
            os.path.join(local, f"{name}.npy"),
            "w+",
            np.dtype(parts[0].dtypes[name]),
            (_total_length(parts, name),),
        )
    if "pair_codes" in out:
        pair_offsets = np.zeros(len(parts) + 1, np.int64)
        np.cumsum([p.lengths["pair_codes"] for p in parts], out=pair_offsets[1:])
        np.save(os.path.join(local, "pair_offsets.npy"), pair_offsets)
        np.save(os.path.join(local, "bucket_starts.npy"), np.asarray([p.start for p in parts]))
    at = dict.fromkeys(columns, 0)
    base = {}  # what each pointer column's values are offset by: its value column's length
    faiss_files = []
    flat_vectors = []
    for number, part in enumerate(parts):
        arrays = _load_part(part.path)
        for name in columns:
            values = arrays[name]
            if _is_pointer(name):
                if number:
                    values = values[1:]
                values = values + base.get(name, 0)
            out[name][at[name] : at[name] + len(values)] = values
            at[name] += len(values)
        for name in filter(_is_pointer, columns):
            base[name] = int(out[name][at[name] - 1])
        if kind == "flat":
            flat_vectors.append(arrays["vectors"])
        else:
            path = os.path.join(local, f"part-{number:06d}.faiss")
            arrays["faiss_part"].tofile(path)
            faiss_files.append(path)
        del arrays
    for array in out.values():
        array.flush()
    del out
    _write_faiss(local, kind, reducer.dim, flat_vectors, trained, faiss_files)
    files = [f for f in sorted(os.listdir(local)) if not f.startswith("part-")]
    if remote:
        for name in files:
            with (
                open(os.path.join(local, name), "rb") as src,
                storage.atomic_writer(storage.join(final, name)) as dst,
            ):
                shutil.copyfileobj(src, dst, 1 << 22)
        shutil.rmtree(local, ignore_errors=True)
    return IndexFiles(
        space=space,
        n=n,
        n_features=int(parts[0].lengths["n_features"]),
        reducer=reducer,
        directory=final,
        kind=kind,
        columns=tuple(c for c in files if c.endswith(".npy")),
        fingerprint=uuid.uuid4().hex,
    )


def _write_faiss(local, kind, dim, flat_vectors, trained, faiss_files) -> None:
    import faiss

    path = os.path.join(local, "index.faiss")
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        for vectors in flat_vectors:
            index.add(np.ascontiguousarray(vectors, np.float32))
        faiss.write_index(index, path)
        return
    # faiss.contrib.ondisk.merge_ondisk's recipe: the parts mapped (IO_FLAG_MMAP), their lists
    # merged, in part order, into one on-disk file beside the index (IO_FLAG_ONDISK_SAME_DIR when
    # read), so no task holds every list in memory. Written out here rather than called because
    # merge_ondisk disowns the parts' lists, which then stay mapped for the worker's life.
    index = faiss.deserialize_index(trained)
    ivf = faiss.extract_index_ivf(index)
    parts = [faiss.read_index(f, faiss.IO_FLAG_MMAP) for f in faiss_files]
    lists = faiss.InvertedListsPtrVector()
    for part in parts:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    merged = faiss.OnDiskInvertedLists(
        ivf.nlist, ivf.code_size, os.path.join(local, "index.ivfdata")
    )
    index.ntotal = ivf.ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    ivf.replace_invlists(merged, True)
    merged.this.disown()
    faiss.write_index(index, path)
    del index, ivf, lists, parts
    for part in faiss_files:
        os.remove(part)


# ---- the search step: a worker's mapped view ------------------------------------------------


class OpenIndex:
    """A space's index opened from its files: what the search step reads, by global row."""

    def __init__(self, files: IndexFiles, config: NeighbourConfig):
        import faiss

        from vlforge.pipeline.neighbours import NeighbourIndex

        self.files = files
        self.n = files.n
        self.reducer = files.reducer
        directory = _local_directory(files)
        column = {
            name[: -len(".npy")]: np.load(os.path.join(directory, name), mmap_mode="r")
            for name in files.columns
        }
        self.sparse = sp.csr_matrix(
            (column["sparse_data"], column["sparse_indices"], column["sparse_indptr"]),
            shape=(files.n, files.n_features),
            copy=False,
        )
        self.first_image = column["first_image"]
        self.pair_codes = column["pair_codes"]
        self.pair_offsets = column["pair_offsets"]
        self.bucket_starts = column["bucket_starts"]
        self.claims = (
            Claims(**{name: column[f"claims_{name}"] for name in _CLAIM_FIELDS})
            if "claims_has_objects" in column
            else None
        )
        self._graphs = (
            (column["graphs_json"], column["graphs_offsets"]) if "graphs_json" in column else None
        )
        # OnDiskInvertedLists map their .ivfdata themselves; IO_FLAG_MMAP (the index file mapped
        # too) hands back lists whose ids segfault when read (faiss 1.15).
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        index = faiss.read_index(os.path.join(directory, "index.faiss"), flags)
        self.neighbours = NeighbourIndex.from_index(index, config)

    @property
    def has_graphs(self) -> bool:
        return self._graphs is not None

    def text_graph(self, row: int):
        """The compact scene graph of text `row` (kept only when some sample has no tags)."""
        data, offsets = self._graphs
        return json.loads(bytes(data[offsets[row] : offsets[row + 1]]))

    def has_image(self, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """For each (row, pair code): is the code among its bucket's pair codes?"""
        found = np.zeros(len(codes), bool)
        bucket = np.searchsorted(self.bucket_starts, rows, side="right") - 1
        for b in np.unique(bucket).tolist():
            lo, hi = int(self.pair_offsets[b]), int(self.pair_offsets[b + 1])
            if hi == lo:
                continue
            at = np.flatnonzero(bucket == b)
            segment = self.pair_codes[lo:hi]
            where = np.minimum(np.searchsorted(segment, codes[at]), hi - lo - 1)
            found[at] = segment[where] == codes[at]
        return found


_OPEN: dict[str, OpenIndex] = {}
_OPEN_LOCK = threading.Lock()


def open_index(files: IndexFiles | None, config: NeighbourConfig) -> OpenIndex | None:
    """The worker's OpenIndex for `files`, opened on first use; one per space per process (a
    later run's index replaces the last one's, whose files that run has deleted)."""
    if files is None:
        return None
    with _OPEN_LOCK:
        held = _OPEN.get(files.space)
        if held is None or held.files.fingerprint != files.fingerprint:
            _OPEN.pop(files.space, None)
            held = _OPEN[files.space] = OpenIndex(files, config)
        return held


def _local_directory(files: IndexFiles) -> str:
    """The index directory on local disk: itself, or (remote --out) a copy made once."""
    if "://" not in files.directory:
        return files.directory
    local = os.path.join(tempfile.gettempdir(), "vlforge-mine-index", files.fingerprint)
    if os.path.isdir(local):
        return local
    partial = local + f".{uuid.uuid4().hex[:8]}"
    os.makedirs(partial)
    for path in storage.glob(storage.join(files.directory, "*")):
        with (
            FileSystems.open(path, compression_type=storage.RAW) as src,
            open(os.path.join(partial, path.rsplit("/", 1)[-1]), "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 22)
    with contextlib.suppress(OSError):  # another thread got there first: keep its copy
        os.rename(partial, local)
    shutil.rmtree(partial, ignore_errors=True)
    return local


for _type in (PartFile, IndexFiles):
    beam.coders.registry.register_coder(_type, PickledBatch)
