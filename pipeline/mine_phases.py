"""`vlforge mine` as five pipelines over staged files: each shard is read and scanned once.

Why phases and not one pipeline with side inputs: on DaskRunner a side input is computed by
persisting its bag, which recomputes everything upstream of it (dask_fixes, point 2). Mining's
five side inputs (statistics, row starts, reducers, trained index, filled index) each scanned
every shard again and grouped every text bucket again: at 300k rows ScanShards was a third of
the workers' time, and holding the recomputed bags is where their memory went. Here every
value that more than one later step reads is written once, as a file (staged_values: arrays and
JSON, no pickle), and later phases read it by path; each worker reads a small value once
(Staged.get). Within a phase nothing is read twice, so no phase needs a side input.

  1. scan    shards → ScanShards → scans/<i>.npz; SumStats (combiner) → stats
  2. group   scans → TextParts → GroupByKey(text bucket), parts staged (staged_shuffle)
             → buckets/<space>-<b>.npz;
             bucket sizes → row starts; lowest-hash texts (bounded combiner) → SVD reducers
  3. train   buckets → a bounded sample of vectors per space → trained faiss index
  4. fill    buckets → index parts → assembled index files (mine_index_files) → IndexFiles
  5. mine    scans + each bucket's SampleRows (join by shard; every shuffle here moves staged
             files' paths: staged_shuffle) → SearchShards (each shard's
             search staged) → the texts asked of each bucket (GroupByKey(bucket), answered
             from its file) → WriteShards

The work directory is `<out>/.mine-work`; run_mine deletes it before and after a run.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, replace

import apache_beam as beam
import numpy as np
import scipy.sparse as sp
from apache_beam.typehints import Any, Tuple

from vlforge.pipeline import staged_values, storage
from vlforge.pipeline.mine_buckets import (
    CAPTIONS,
    SPACES,
    ConcatDict,
    Requests,
    Resolved,
    RowStarts,
    SampleRows,
    TextBucket,
    TextPart,
    group_bucket,
    resolve,
    row_starts,
    sample_rows,
    text_parts,
)
from vlforge.pipeline.mine_config import MineConfig
from vlforge.pipeline.mine_corpus import (
    ConcatSamples,
    LowestHashes,
    assemble,
    fit_space_reducer,
    index_part,
    svd_candidates,
    train_candidates,
    train_space,
)
from vlforge.pipeline.mine_filter import Relations
from vlforge.pipeline.mine_groups import TextGroups
from vlforge.pipeline.mine_index_files import IndexFiles
from vlforge.pipeline.mine_scan import (
    CorpusStats,
    MineInput,
    PickledBatch,
    ScanShards,
    ShardScan,
    SumStats,
    mine_input,
)
from vlforge.pipeline.mine_shard import SearchShards, ShardSearch, WriteShards, requests
from vlforge.pipeline.mine_tar import SampleIndex
from vlforge.pipeline.staged_shuffle import (
    StagedCoGroupByKey,
    StagedGroupByKey,
    read_group,
    stage_value,
)
from vlforge.pipeline.staged_values import Staged, WithStaged
from vlforge.pipeline.tfidf import Reducer

WORK_DIR = ".mine-work"  # under --out
for _type in (ShardScan, SampleIndex, TextBucket, TextGroups, CorpusStats, RowStarts, Reducer):
    staged_values.register(_type)
for _type in (IndexFiles, ShardSearch, MineInput, TextPart, SampleRows, Requests, Resolved):
    staged_values.register(_type)


@dataclass(frozen=True)
class MineWork:
    """Where one run's staged values lie."""

    root: str  # <out>/.mine-work
    run: str  # this run's id: a worker's cached values of an earlier run are not reused

    @classmethod
    def under(cls, out: str) -> MineWork:
        return cls(storage.join(out, WORK_DIR), uuid.uuid4().hex)

    def create(self) -> None:
        """Make the directories the phases write into, once, before the first phase."""
        for name in ("scans", "buckets", "searches", "requests"):
            storage.makedirs(storage.join(self.root, name))

    def value(self, name: str) -> Staged:
        return Staged(storage.join(self.root, f"{name}.npz"), self.run)

    def scan(self, number: int) -> str:
        return storage.join(self.root, "scans", f"{number:06d}.npz")

    def search(self, shard: str) -> str:
        name = hashlib.sha256(shard.encode()).hexdigest()[:20]
        return storage.join(self.root, "searches", f"{name}.npz")

    def bucket(self, space: str, bucket: int) -> str:
        return storage.join(self.root, "buckets", f"{space}-{bucket:06d}.npz")

    @property
    def index(self) -> str:
        return storage.join(self.root, "index")

    def per_space(self, name: str) -> dict[str, Staged]:
        """{space: handle} for the spaces whose `name` value a phase wrote."""
        handles = {space: self.value(f"{name}-{space}") for space in SPACES}
        return {space: h for space, h in handles.items() if storage.exists(h.path)}


def _finish(*branches) -> None:
    """One last step that every branch of a phase feeds: DaskRunner computes only the graph of
    the pipeline's last transform (DaskRunner.run_pipeline), so a branch that it does not
    depend on would silently never run."""
    _ = (
        branches
        | "Branches" >> beam.Flatten()
        | "Done" >> combine_globally(beam.combiners.CountCombineFn())
    )


def combine_globally(combine: beam.CombineFn) -> beam.PTransform:
    """CombineGlobally without its default for an empty input: Beam injects that default
    through a side input, which DaskRunner persists (dask_fixes, 2); a phase's persist could
    wait forever on keys named like the previous phase's ("Done", "Branches"), seen as a hung
    test. Every phase has input (run_mine refuses an empty --in), so no default is needed."""
    return beam.CombineGlobally(combine).without_defaults()


def _write(value: Any, path: str) -> str:
    return staged_values.write(path, value)


def _write_per_space(item: tuple, work: MineWork, name: str) -> str:
    space, value = item
    return staged_values.write(work.value(f"{name}-{space}").path, value)


class _ScanAndStage(ScanShards):
    """(number, shard path) → its ShardScan, after writing it to scans/<number>.npz."""

    def __init__(self, work: MineWork):
        super().__init__()
        self.work = work

    def process(self, item):
        number, path = item
        for scan in super().process(path):
            staged_values.write(self.work.scan(number), scan)
            yield _for_stats(scan)


def _for_stats(scan: ShardScan) -> ShardScan:
    """The scan without what SumStats does not read (texts, keys, graphs, the tar index, term
    counts' values): the runner holds every shard's element until the combiner has read it."""

    def terms_only(counts):
        return sp.csr_matrix(
            (np.ones(counts.nnz, np.int8), counts.indices, counts.indptr), shape=counts.shape
        )

    return replace(
        scan,
        index=None,
        keys=[],
        captions=[],
        texts=[],
        images=[],
        graphs=[],
        tag_texts=[],
        caption_counts=terms_only(scan.caption_counts),
        tag_counts=terms_only(scan.tag_counts),
    )


def scan_phase(pipeline: beam.Pipeline, shards: list[str], work: MineWork) -> None:
    """1: every shard scanned once; its scan staged; corpus statistics combined."""
    scans = (
        pipeline
        | "Shards" >> beam.Create(list(enumerate(shards)))
        | "Scan" >> beam.ParDo(_ScanAndStage(work)).with_output_types(ShardScan)
    )
    stats = (
        scans
        | "Stats" >> combine_globally(SumStats()).with_output_types(CorpusStats)
        | "StageStats" >> beam.Map(_write, work.value("stats").path)
    )
    _finish(scans | "Scanned" >> beam.Map(lambda scan: scan.shard), stats)


def _stage_bucket(bucket: TextBucket, stats: CorpusStats, work: MineWork, config: MineConfig):
    """TextBucket → ((space, bucket), its size, its SVD candidates), after writing its file.

    One step reads the bucket and both branches get small values: a bucket read by two steps
    is held by DaskRunner until the second has run, so every bucket was in memory at once.
    """
    staged_values.write(work.bucket(bucket.space, bucket.bucket), bucket)
    (candidates,) = svd_candidates(bucket, stats, config.svd_sample)
    return (bucket.space, bucket.bucket), bucket.size, candidates


def _size(staged: tuple):
    return staged[0], staged[1]


def _svd_candidates(staged: tuple):
    return staged[2]


def group_phase(pipeline: beam.Pipeline, n_shards: int, work: MineWork, config: MineConfig) -> None:
    """2: texts grouped into buckets (staged); row starts; an SVD reducer per space."""
    n_buckets = max(1, n_shards)
    stats = work.value("stats")
    staged = (
        pipeline
        | "Scans" >> beam.Create([work.scan(i) for i in range(n_shards)])
        | "ReadScans" >> beam.Map(staged_values.read).with_output_types(ShardScan)
        | "TextParts"
        >> beam.FlatMap(text_parts, n_buckets, config.seed).with_output_types(
            Tuple[Tuple[str, int], TextPart]
        )
        | "GroupTexts" >> StagedGroupByKey(storage.join(work.root, "parts"))
        | "Buckets" >> beam.Map(group_bucket, config.seed).with_output_types(TextBucket)
        | "StageBuckets" >> beam.Map(WithStaged(_stage_bucket, stats, args=(work, config)))
    )
    # None: one input even if no shard has a caption, so that row starts are always written
    # (the combine has no default: combine_globally).
    no_sizes = pipeline | "AtLeastOne" >> beam.Create([None])
    starts = (
        (staged | "Sizes" >> beam.Map(_size), no_sizes)
        | "WithNone" >> beam.Flatten()
        | "AllSizes" >> combine_globally(ConcatDict())
        | "RowStarts" >> beam.Map(row_starts, n_buckets).with_output_types(RowStarts)
        | "StageStarts" >> beam.Map(_write, work.value("starts").path)
    )
    reducers = (
        staged
        | "SvdSample" >> beam.Map(_svd_candidates)
        | "LowestHashes" >> beam.CombinePerKey(LowestHashes(config.svd_sample))
        | "Reducer" >> beam.Map(WithStaged(fit_space_reducer, stats, args=(config,)))
        | "StageReducers" >> beam.Map(_write_per_space, work, "reducer")
    )
    _finish(starts, reducers)


def bucket_paths(work: MineWork) -> list[str]:
    """The buckets phase 2 wrote (a bucket no text hashed to has no file)."""
    starts: RowStarts = staged_values.read(work.value("starts").path)
    return [
        work.bucket(space, b)
        for space in SPACES
        for b in range(len(starts.starts[space]) - 1)
        if starts.starts[space][b + 1] > starts.starts[space][b]
    ]


def _buckets(pipeline: beam.Pipeline, work: MineWork):
    return (
        pipeline
        | "BucketFiles" >> beam.Create(bucket_paths(work))
        | "ReadBuckets" >> beam.Map(staged_values.read).with_output_types(TextBucket)
    )


def train_phase(pipeline: beam.Pipeline, work: MineWork, config: MineConfig) -> None:
    """3: each space's faiss index trained on a bounded sample of its vectors."""
    stats, starts, reducers = work.value("stats"), work.value("starts"), work.per_space("reducer")
    _ = (
        _buckets(pipeline, work)
        | "TrainSample"
        >> beam.FlatMap(WithStaged(train_candidates, reducers, stats, starts, args=(config,)))
        | "AllTrainSample" >> beam.CombinePerKey(ConcatSamples())
        | "Train" >> beam.Map(WithStaged(train_space, starts, args=(config,)))
        | "StageTrained" >> beam.Map(_write_per_space, work, "trained")
    )


def fill_phase(
    pipeline: beam.Pipeline, work: MineWork, config: MineConfig, relations: Relations
) -> None:
    """4: the index filled bucket by bucket into part files, assembled per space."""
    stats, starts = work.value("stats"), work.value("starts")
    reducers, trained = work.per_space("reducer"), work.per_space("trained")
    fill = WithStaged(
        index_part, reducers, trained, stats, starts, args=(config, relations, work.index)
    )
    _ = (
        _buckets(pipeline, work)
        | "Fill" >> beam.FlatMap(fill)
        | "Parts" >> beam.CombinePerKey(beam.combiners.ToListCombineFn())
        | "Index"
        >> beam.Map(WithStaged(assemble, reducers, trained, starts, args=(config, work.index)))
        | "StageIndex" >> beam.Map(_write_per_space, work, "index")
    )


def _sample_rows(bucket: TextBucket, starts: RowStarts, config: MineConfig):
    limit = config.k_positives if bucket.space == CAPTIONS else config.k_image_positives
    return sample_rows(bucket, starts, limit)


@dataclass
class SearchedShard:
    """A shard's search, staged: where its ShardSearch lies, and the texts it asks for."""

    shard: str
    path: str
    requests: list  # ((space, bucket), path of its staged Requests)


beam.coders.registry.register_coder(SearchedShard, PickledBatch)


class _SearchAndStage(SearchShards):
    """SearchShards reading its shard's scan from its file, whose ShardSearch (every sample's
    mine dict, rings, chosen rows: the stage's largest per-shard value) and the texts it asks
    of each bucket go to files until they are read, instead of being held by the runner: on
    DaskRunner every shard's search stayed in worker memory until the last shard's texts
    were resolved (staged_shuffle says why for the requests)."""

    def __init__(self, config: MineConfig, indexes: dict, stats: Staged, starts: Staged, work):
        super().__init__(config, indexes, stats)
        self.starts = starts
        self.work = work

    def process(self, item):
        shard, joined = item
        (scan_path,) = joined["input"]
        scan_input = mine_input(staged_values.read(scan_path))
        for search in super().process((shard, {"input": [scan_input], "rows": joined["rows"]})):
            path = self.work.search(search.scan.shard)
            staged_values.write(path, search)
            staged = [
                (bucket, stage_value(storage.join(self.work.root, "requests"), value))
                for bucket, value in requests(search, self.starts.get())
            ]
            yield SearchedShard(search.scan.shard, path, staged)


class _WriteStaged(WriteShards):
    """WriteShards reading each shard's staged search."""

    def process(self, item):
        shard, joined = item
        (path,) = joined["search"]
        yield from super().process(
            (shard, {"search": [staged_values.read(path)], "texts": joined["texts"]})
        )


def _requests(searched: SearchedShard) -> list:
    return searched.requests


def _keyed_search(searched: SearchedShard):
    return searched.shard, searched.path


def _resolve_from_file(item, starts: RowStarts, work: MineWork):
    """((space, bucket), [path of Requests]) → (shard, Resolved), the texts read from the
    bucket's file."""
    (space, bucket), asked = read_group(item)
    joined = {"bucket": [staged_values.read(work.bucket(space, bucket))], "requests": list(asked)}
    return resolve(((space, bucket), joined), starts)


def mine_phase(
    pipeline: beam.Pipeline, shards: list[str], work: MineWork, config: MineConfig, out: str
):
    """5: search each shard against the index, look up the chosen texts, write the shards.

    Returns the PCollection of written shards' summaries.
    """
    stats, starts = work.value("stats"), work.value("starts")
    rows = _buckets(pipeline, work) | "SampleRows" >> beam.FlatMap(
        WithStaged(_sample_rows, starts, args=(config,))
    )
    inputs = pipeline | "Scans" >> beam.Create(
        [(shard, work.scan(i)) for i, shard in enumerate(shards)]
    )
    searched = (
        {"input": inputs, "rows": rows}
        | "JoinRows" >> StagedCoGroupByKey(storage.join(work.root, "rows"), staged=("rows",))
        | "Search"
        >> beam.ParDo(
            _SearchAndStage(config, work.per_space("index"), stats, starts, work)
        ).with_output_types(SearchedShard)
    )
    texts = (
        searched
        | "Requests" >> beam.FlatMap(_requests)
        | "GroupRequests" >> beam.GroupByKey()
        | "Resolve" >> beam.FlatMap(WithStaged(_resolve_from_file, starts, args=(work,)))
    )
    return (
        {"search": searched | "KeySearch" >> beam.Map(_keyed_search), "texts": texts}
        | "JoinWrite" >> StagedCoGroupByKey(storage.join(work.root, "texts"), staged=("texts",))
        | "Write" >> beam.ParDo(_WriteStaged(config, out))
    )
