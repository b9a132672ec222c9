"""Samples grouped by text without gathering the corpus: text buckets, row numbers, keyed look-ups.

Each shard's samples go, as one TextPart per (space, bucket), to the bucket their text hashes to
(space: "captions" or "tags"; n_buckets ≈ the number of shards, so a bucket is about a shard's
size). A GroupByKey puts every sample of a text in one TextBucket: its distinct texts sorted,
their members and rings (mine_groups), the representative's term counts and graph. Global row
ids are a bucket's first row (bucket sizes, combined: RowStarts) plus the text's place in the
bucket, so ids are contiguous and the same on every runner.

From each bucket come, keyed by shard, the rows and ring partners of that shard's samples
(SampleRows); and, keyed by (space, bucket), the answers to the search step's requests for the
texts it chose (resolve): the representative's key and caption for a negative, members of a
near-duplicate text for positives, the key for an image positive. Keys and captions thus travel
only to the shards that cite them, never to every worker.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import scipy.sparse as sp

from vlforge.pipeline.mine_groups import TextGroups, group_texts, ring_others
from vlforge.pipeline.mine_scan import PickledBatch, ShardScan
from vlforge.pipeline.tfidf import stable_hash

CAPTIONS, TAGS = "captions", "tags"
SPACES = (CAPTIONS, TAGS)
POSITIVE_MEMBERS = 16  # samples of one near-duplicate text a neighbour carries as positives
# Request kinds: a hard negative, a near-duplicate text (positives), an image positive.
NEGATIVE, DUPLICATE, IMAGE = 0, 1, 2
_MASK = (1 << 63) - 1


def image_hash(name: str) -> int:
    """An image's id as a non-negative int64 (same image ⇔ same id; collisions ~ n² / 2^63)."""
    return stable_hash(name) & _MASK


def pair_codes(rows: np.ndarray, images: np.ndarray) -> np.ndarray:
    """uint64 codes of (row, image) pairs: "row r has a member showing image i"."""
    with np.errstate(over="ignore"):
        return rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ images.astype(np.uint64)


@dataclass
class TextPart:
    """One shard's samples of one space whose texts hash to one bucket."""

    space: str
    bucket: int
    shard: str
    positions: np.ndarray  # int64: the samples' places in the shard's scan
    texts: list[str]
    keys: list[str]
    captions: list[str] | None  # captions space only
    images: np.ndarray  # int64 image_hash
    graphs: list | None  # captions space only: compact graphs
    counts: sp.csr_matrix  # hashed term counts, one row per sample here


def text_parts(scan: ShardScan, n_buckets: int, seed: int):
    """ShardScan → ((space, bucket), TextPart) for every non-empty bucket of each space."""
    images = np.fromiter((image_hash(i) for i in scan.images), np.int64, len(scan.images))
    tagged = np.asarray([i for i, t in enumerate(scan.tag_texts) if t], np.int64)
    spaces = [
        (CAPTIONS, np.arange(len(scan.texts)), scan.texts, scan.caption_counts),
        (TAGS, tagged, [scan.tag_texts[i] for i in tagged.tolist()], scan.tag_counts),
    ]
    for space, positions, texts, counts in spaces:
        buckets = np.fromiter(
            (stable_hash(t, seed) % n_buckets for t in texts), np.int64, len(texts)
        )
        for bucket in np.unique(buckets).tolist():
            at = np.flatnonzero(buckets == bucket)
            where = positions[at]
            yield (
                (space, bucket),
                TextPart(
                    space=space,
                    bucket=bucket,
                    shard=scan.shard,
                    positions=where,
                    texts=[texts[i] for i in at.tolist()],
                    keys=[scan.keys[i] for i in where.tolist()],
                    captions=[scan.captions[i] for i in where.tolist()]
                    if space == CAPTIONS
                    else None,
                    images=images[where],
                    graphs=[scan.graphs[i] for i in where.tolist()] if space == CAPTIONS else None,
                    counts=counts[at],
                ),
            )


@dataclass
class TextBucket:
    """Every sample of the texts of one bucket, grouped by text (rows: distinct texts, sorted)."""

    space: str
    bucket: int
    groups: TextGroups  # over members 0..m-1 below
    hashes: np.ndarray  # uint64 stable_hash(text, seed) per row
    shards: list[str]  # per member
    positions: np.ndarray  # per member: place in its shard's scan
    keys: list[str]
    captions: list[str] | None
    images: np.ndarray  # int64 per member
    counts: sp.csr_matrix  # per row: the representative's term counts
    graphs: list | None  # per row: the representative's compact graph (captions)

    @property
    def size(self) -> int:
        return len(self.groups.texts)


def group_bucket(item, seed: int) -> TextBucket:
    """((space, bucket), [TextPart]) → TextBucket, the same whatever order the parts came in."""
    (space, bucket), parts = item
    parts = list(parts)
    texts = [t for p in parts for t in p.texts]
    keys = [k for p in parts for k in p.keys]
    shards = [p.shard for p in parts for _ in p.texts]
    positions = np.concatenate([p.positions for p in parts]).astype(np.int64)
    order = sorted(
        range(len(texts)), key=lambda i: (texts[i], keys[i], shards[i], int(positions[i]))
    )
    take = np.asarray(order, np.int64)
    texts = [texts[i] for i in order]
    keys = [keys[i] for i in order]
    captions = None
    graphs = None
    if space == CAPTIONS:
        all_captions = [c for p in parts for c in p.captions]
        captions = [all_captions[i] for i in order]
        all_graphs = [g for p in parts for g in p.graphs]
        graphs = [all_graphs[i] for i in order]
    counts = sp.vstack([p.counts for p in parts], format="csr")[take]
    # group_texts sorts by (text, key), stably: the order above (shard, position) breaks ties.
    groups = group_texts(texts, keys, seed)
    first = groups.first
    return TextBucket(
        space=space,
        bucket=bucket,
        groups=groups,
        hashes=np.fromiter((stable_hash(t, seed) for t in groups.texts), np.uint64),
        shards=[shards[i] for i in order],
        positions=positions[take],
        keys=keys,
        captions=captions,
        images=np.concatenate([p.images for p in parts]).astype(np.int64)[take],
        counts=counts[first],
        graphs=[graphs[i] for i in first.tolist()] if graphs is not None else None,
    )


@dataclass
class RowStarts:
    """Each bucket's first global row id, per space (len n_buckets + 1: the last is the total)."""

    starts: dict[str, np.ndarray]

    def total(self, space: str) -> int:
        return int(self.starts[space][-1])

    def start(self, space: str, bucket: int) -> int:
        return int(self.starts[space][bucket])

    def bucket_of(self, space: str, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.starts[space], rows, side="right") - 1


def row_starts(sizes: dict, n_buckets: int) -> RowStarts:
    """{(space, bucket): distinct texts} → RowStarts."""
    starts = {}
    for space in SPACES:
        counts = np.zeros(n_buckets, np.int64)
        for (s, bucket), n in sizes.items():
            if s == space:
                counts[bucket] = n
        starts[space] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return RowStarts(starts)


@dataclass
class SampleRows:
    """For one shard's samples in one bucket: their text's global row and their ring partners."""

    space: str
    positions: np.ndarray
    rows: np.ndarray
    ring: list  # per sample: [(key, caption)] (captions) or [key] (tags)


def sample_rows(bucket: TextBucket, starts: RowStarts, limit: int):
    """TextBucket → (shard, SampleRows) for each shard with samples in it."""
    groups = bucket.groups
    m = len(bucket.keys)
    members = np.arange(m, dtype=np.int64)
    rows = groups.row[members] + starts.start(bucket.space, bucket.bucket)
    partners = ring_others(groups, members, bucket.images, limit)
    if bucket.space == CAPTIONS:
        ring = [[(bucket.keys[g], bucket.captions[g]) for g in p] for p in partners]
    else:
        ring = [[bucket.keys[g] for g in p] for p in partners]
    by_shard: dict[str, list[int]] = {}
    for i, shard in enumerate(bucket.shards):
        by_shard.setdefault(shard, []).append(i)
    for shard in sorted(by_shard):
        at = np.asarray(by_shard[shard], np.int64)
        yield (
            shard,
            SampleRows(
                bucket.space, bucket.positions[at], rows[at], [ring[i] for i in at.tolist()]
            ),
        )


@dataclass
class Requests:
    """The texts one shard's search chose in one bucket: one entry per (sample, slot)."""

    shard: str
    kind: np.ndarray  # NEGATIVE, DUPLICATE or IMAGE
    sample: np.ndarray  # the sample's place in the shard's scan
    slot: np.ndarray  # the entry's place in that sample's list of its kind
    row: np.ndarray  # global row id of the chosen text
    image: np.ndarray  # the sample's own image (near-duplicate members showing it are skipped)


@dataclass
class Resolved:
    """Requests answered: per entry, its texts (keys / (key, caption) pairs)."""

    kind: np.ndarray
    sample: np.ndarray
    slot: np.ndarray
    values: list  # NEGATIVE: (key, caption); DUPLICATE: [(key, caption)]; IMAGE: key


def resolve(item, starts: RowStarts):
    """((space, bucket), {"bucket": [TextBucket], "requests": [Requests]}) → (shard, Resolved)."""
    (space, bucket_id), joined = item
    buckets = list(joined["bucket"])
    requests = list(joined["requests"])
    if not requests:
        return
    bucket = buckets[0]
    groups = bucket.groups
    start = starts.start(space, bucket_id)
    for req in requests:
        local = req.row - start
        values = []
        for kind, r, own in zip(req.kind.tolist(), local.tolist(), req.image.tolist(), strict=True):
            lo, hi = int(groups.offsets[r]), int(groups.offsets[r + 1])
            g = int(groups.members[lo])
            if kind == NEGATIVE:
                values.append((bucket.keys[g], bucket.captions[g]))
            elif kind == IMAGE:
                values.append(bucket.keys[g])
            else:
                values.append(
                    [
                        (bucket.keys[m], bucket.captions[m])
                        for m in groups.members[lo : min(hi, lo + POSITIVE_MEMBERS)].tolist()
                        if bucket.images[m] != own
                    ]
                )
        yield req.shard, Resolved(req.kind, req.sample, req.slot, values)


class ConcatDict(beam.CombineFn):
    """(key, value) pairs → one dict (small: one entry per bucket); None, a pipeline's
    guarantee of one input when there may be no pairs, adds nothing."""

    def create_accumulator(self):
        return {}

    def add_input(self, acc, pair):
        if pair is not None:
            acc[pair[0]] = pair[1]
        return acc

    def merge_accumulators(self, accumulators):
        out: dict = {}
        for acc in accumulators:
            out.update(acc)
        return out

    def extract_output(self, acc):
        return acc


for _type in (TextPart, TextBucket, RowStarts, SampleRows, Requests, Resolved):
    beam.coders.registry.register_coder(_type, PickledBatch)
