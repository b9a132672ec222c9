"""First pass over one shard: the columns mining needs, and the shard's share of corpus statistics.

One ShardScan per shard is the Beam element (not one per sample: per-element overhead was most of
the old stage's time). It holds the samples' keys, captions, image ids, compact scene graphs and
tag texts, hashed term counts for captions and tags (so document frequencies and TF-IDF rows come
from one hashing pass), the slot vocabulary seen in the shard, and the tar's byte index for the
writer, which then copies the input instead of parsing it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from vlforge.errors import UserError
from vlforge.pipeline import storage
from vlforge.pipeline.mine_filter import Graph, compact_graph
from vlforge.pipeline.mine_tar import SampleIndex, TarFormatError, index_samples, unpack
from vlforge.pipeline.rewrites import SlotVocabulary, slot_surfaces
from vlforge.pipeline.tfidf import N_FEATURES, term_counts

_SPACES = re.compile(r"\s+")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for a block of per-shard work.

    Mining allocates millions of small acyclic containers (parsed JSON, per-sample dicts),
    which reference counting frees; but every 700 allocations the collector also walks the
    young ones, and now and then the whole heap, which holds the corpus. Parsing 10,000 sg.json
    took 4x as long with it running. Cycles made meanwhile are collected once it resumes.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def normalize_text(text: str) -> str:
    return _SPACES.sub(" ", text.strip().lower())


def tag_text(tags: dict | None) -> str:
    """Tags as words: names, plus attribute_name pairs ("red_circle") so colour binding counts."""
    words = []
    for tag in (tags or {}).get("tags", []):
        name = str(tag.get("name", "")).replace(" ", "_")
        words.append(name)
        for attr in tag.get("attributes", []):
            attr_name = attr if isinstance(attr, str) else attr.get("name", "")
            words.append(f"{attr_name}_{name}".replace(" ", "_"))
    return " ".join(sorted(words))


def parse_json(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def read_shard(path: str) -> bytes:
    try:
        with FileSystems.open(path, compression_type=storage.RAW) as handle:
            return unpack(handle.read())
    except OSError as err:
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


def index_shard(path: str, data: bytes) -> SampleIndex:
    try:
        return index_samples(data)
    except (TarFormatError, ValueError) as err:
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


class PickledBatch(beam.coders.Coder):
    """Pickle for the stage's per-shard elements, with a size estimate that does not pickle.

    Beam estimates the size of (nearly) every element of a small PCollection by encoding it,
    and elements here are whole shards' columns: a default coder pickled each one several
    times over just to count bytes. Only our own pipeline's values pass through it.
    """

    def encode(self, value: Any) -> bytes:
        return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)

    def decode(self, encoded: bytes) -> Any:
        return pickle.loads(encoded)  # written by encode above, never read from input

    def is_deterministic(self) -> bool:
        return False

    def estimate_size(self, value: Any) -> int:
        return approximate_size(value)

    def to_type_hint(self):
        return Any


def approximate_size(value: Any) -> int:
    """Bytes of a value's arrays, plus a flat guess per Python object in its lists."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if sp.issparse(value):
        return int(value.data.nbytes + value.indices.nbytes + value.indptr.nbytes)
    if isinstance(value, list | tuple):
        if value and not isinstance(value[0], str | int | float | tuple | None):
            return sum(approximate_size(v) for v in value)  # e.g. a list of TextParts
        return 64 * len(value)
    if dataclasses.is_dataclass(value):
        return sum(approximate_size(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict | set):
        return 128 * len(value)
    return 64


@dataclass
class ShardScan:
    shard: str
    index: SampleIndex
    rows: np.ndarray  # int64: which of the tar's samples have a caption (the mined ones)
    keys: list[str]
    captions: list[str]
    texts: list[str]  # normalised captions
    images: list[str]  # same image ⇒ never each other's negatives
    graphs: list[Graph | None]
    tag_texts: list[str]
    has_tags: np.ndarray  # bool: a tags.json was there
    caption_counts: sp.csr_matrix
    tag_counts: sp.csr_matrix  # rows only for non-empty tag texts
    vocabulary: dict = field(default_factory=dict)  # SlotVocabulary.table
    tag_names: set[str] = field(default_factory=set)


@dataclass
class MineInput:
    """The part of a ShardScan that the second pass reads: where each sample lies in the tar.

    Graphs and tags are parsed again there from the tar (cheaper than pickling them through
    the pipeline, and memory stays per shard).
    """

    shard: str
    index: SampleIndex
    rows: np.ndarray
    keys: list[str]
    captions: list[str]
    images: list[str] = field(default_factory=list)


def mine_input(scan: ShardScan) -> MineInput:
    return MineInput(scan.shard, scan.index, scan.rows, scan.keys, scan.captions, scan.images)


def scan_shard(path: str, n_features: int = N_FEATURES) -> ShardScan:
    data = read_shard(path)
    index = index_shard(path, data)
    rows, keys, captions, texts, images, graphs, tag_texts, has_tags = ([] for _ in range(8))
    vocab = SlotVocabulary()
    tag_names: set[str] = set()
    for i, key in enumerate(index.keys):
        txt = index.field(data, i, "txt")
        if txt is None:
            continue  # nothing to mine; the writer still copies it through
        caption = txt.decode("utf-8", errors="replace").strip()
        meta_bytes = index.field(data, i, "json")
        # The metadata can be large (the world's truth rides in it) and only its sha256 is read.
        meta = parse_json(meta_bytes) if meta_bytes and b'"sha256"' in meta_bytes else None
        meta = meta or {}
        sg = parse_json(index.field(data, i, "sg.json"))
        tags = parse_json(index.field(data, i, "tags.json"))
        rows.append(i)
        keys.append(key)
        captions.append(caption)
        texts.append(normalize_text(caption))
        images.append(str(meta.get("sha256") or key))
        graphs.append(compact_graph(sg))
        tag_texts.append(tag_text(tags))
        has_tags.append(tags is not None)
        if sg:
            for kind, name, form, surface in slot_surfaces(caption, sg):
                vocab.add(kind, name, form, surface)
        if tags:
            tag_names.update(str(t.get("name")) for t in tags.get("tags", []))
    non_empty = [t for t in tag_texts if t]
    return ShardScan(
        shard=path,
        index=index,
        rows=np.asarray(rows, np.int64),
        keys=keys,
        captions=captions,
        texts=texts,
        images=images,
        graphs=graphs,
        tag_texts=tag_texts,
        has_tags=np.asarray(has_tags, bool),
        caption_counts=term_counts(texts, n_features),
        tag_counts=term_counts(non_empty, n_features),
        vocabulary=vocab.table,
        tag_names=tag_names,
    )


class ScanShards(beam.DoFn):
    """Shard path → its ShardScan."""

    def __init__(self, n_features: int = N_FEATURES):
        self.n_features = n_features
        self.samples = Metrics.counter("mine", "samples_in")

    def process(self, path: str):
        with gc_paused():
            scan = scan_shard(path, self.n_features)
        self.samples.inc(len(scan.keys))
        yield scan


@dataclass
class CorpusStats:
    """Corpus-wide sums: document counts and frequencies, slot vocabulary, detector names."""

    n_captions: int
    caption_df: np.ndarray
    n_tags: int
    tag_df: np.ndarray
    vocabulary: dict  # SlotVocabulary.table, capped (cap_vocabulary)
    tag_names: list[str]
    n_untagged: int = 0  # samples without a tags.json


class SumStats(beam.CombineFn):
    """ShardScans → CorpusStats: per-shard partial counts summed, never the shards themselves.

    Document frequencies are dense int64 vectors over the hashed terms (N_FEATURES: bounded
    whatever the corpus); the slot vocabulary is capped at extraction (cap_vocabulary).
    """

    def __init__(
        self, n_features: int = N_FEATURES, max_names: int = 20_000, max_surfaces: int = 8
    ):
        self.n_features = n_features
        self.max_names = max_names
        self.max_surfaces = max_surfaces

    def create_accumulator(self):
        zeros = np.zeros(self.n_features, np.int64)
        return [0, zeros, 0, zeros.copy(), SlotVocabulary(), set(), 0]

    def add_input(self, acc, scan: ShardScan):
        acc[0] += scan.caption_counts.shape[0]
        acc[1] += np.bincount(scan.caption_counts.indices, minlength=self.n_features)
        acc[2] += scan.tag_counts.shape[0]
        acc[3] += np.bincount(scan.tag_counts.indices, minlength=self.n_features)
        acc[4].merge(SlotVocabulary(scan.vocabulary))
        acc[5] |= scan.tag_names
        acc[6] += int((~scan.has_tags).sum())
        return acc

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        merged = next(accumulators)
        for other in accumulators:
            merged[0] += other[0]
            merged[1] += other[1]
            merged[2] += other[2]
            merged[3] += other[3]
            merged[4].merge(other[4])
            merged[5] |= other[5]
            merged[6] += other[6]
        return merged

    def get_accumulator_coder(self) -> beam.coders.Coder:
        return PickledBatch()

    def extract_output(self, acc) -> CorpusStats:
        vocabulary = cap_vocabulary(acc[4].table, self.max_names, self.max_surfaces)
        return CorpusStats(acc[0], acc[1], acc[2], acc[3], vocabulary, sorted(acc[5]), acc[6])


def cap_vocabulary(table: dict, max_names: int, max_surfaces: int) -> dict:
    """The slot vocabulary cut to each kind's `max_names` commonest names (ties by name) and
    each form's `max_surfaces` commonest surfaces (ties by surface): the same table whatever
    order the shards were combined in, and bounded whatever the corpus' size."""
    out: dict = {}
    for kind, names in table.items():
        totals = {n: sum(sum(s.values()) for s in forms.values()) for n, forms in names.items()}
        kept = sorted(totals, key=lambda n: (-totals[n], n))[:max_names]
        out[kind] = {}
        for name in sorted(kept):
            out[kind][name] = {
                form: dict(sorted(surfaces.items(), key=lambda kv: (-kv[1], kv[0]))[:max_surfaces])
                for form, surfaces in sorted(names[name].items())
            }
    return out


for _type in (ShardScan, MineInput, CorpusStats):
    beam.coders.registry.register_coder(_type, PickledBatch)
