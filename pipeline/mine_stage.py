"""`vlforge mine`: TF-IDF hard negatives, retrieved positives and scene-graph rewrites per sample.

run_mine runs the stage as five pipelines over staged files (mine_phases: scan, group, train,
fill, mine; its docstring says why not one pipeline with side inputs) and writes a manifest.
Elements are shards, text buckets or index parts, never samples (per-element overhead was most
of an older stage's cost), and no element holds every caption:

  shards ─ ScanShards (one read: captions, graphs, tags, term counts, tar byte index), staged
     ├─ SumStats (combiner of per-shard sums): document frequencies → IDF, slot vocabulary
     │    (capped), detector names
     ├─ TextParts ─ GroupByKey(text bucket) ─ TextBucket: a bucket's texts, members, rings
     │    ├─ RowStarts (combiner of bucket sizes): contiguous global row ids
     │    ├─ SampleRows, keyed by shard: each sample's text row and ring partners
     │    └─ per space: SVD on the lowest-hash texts (bounded combiner), k-means on a bounded
     │       sample, index filled bucket by bucket into part files, merged into one file per
     │       column (mine_index_files) → IndexFiles (a handle; workers map the files: vectors,
     │       ids, TF-IDF rows, claims; no texts)
     ├─ CoGroupByKey(shard) ─ SearchShards: batched faiss search + exact rerank, vectorised
     │    filters → chosen rows; their texts asked of their buckets (GroupByKey(bucket))
     └─ CoGroupByKey(shard) ─ WriteShards: the input tar's bytes + mine.json, parquet counts

Elements are coded with mine_scan.PickledBatch, and per-shard work runs with the cyclic garbage
collector paused (mine_scan.gc_paused); their docstrings say why.

"Certainly false of the image" (see certainly_false) uses the detector's tags: a mined caption
mentions an object the image lacks, too many of one, or contradicts the sample's own caption
about an object the image has only one of. How many of a name the image has is the larger of
the tag's `count` (detected instances) and the own caption's count: either one seeing an object
is evidence that it is there (the detector misses objects; "two hexagons" in the own caption
means the image may well have two). Captions that might be true are left out (neither negative
nor positive); without tags only captions whose scene graph says nothing beyond the sample's
own are left out. mine_filter.certainly_false_pairs applies the same rules to arrays.

Each mine.json also says how well the sample's own caption fits its image (`alignment`, see
alignment.py); with MineConfig.drop_misaligned set, samples whose caption the tags contradict
that much are left out of the written shards (counted as `dropped_misaligned`). Other samples'
mine.json may still name a dropped sample's key (as a negative or positive caption).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections import Counter
from dataclasses import asdict

import apache_beam as beam
from tqdm import tqdm

from vlforge.errors import UserError
from vlforge.pipeline import progress, storage
from vlforge.pipeline.mine_config import MineConfig, check_config
from vlforge.pipeline.mine_scan import normalize_text, tag_text
from vlforge.pipeline.redact import redact
from vlforge.pipeline.rewrites import attribute_category, tag_count
from vlforge.versions import package_versions

__all__ = ["MineConfig", "certainly_false", "normalize_text", "run_mine", "tag_text"]

# ---- is a mined caption certainly false of this image? ---------------------------------------

OPPOSITE = {
    "left of": {"right of"},
    "right of": {"left of"},
    "above": {"below", "under"},
    "on": {"below", "under"},
    "below": {"above", "on"},
    "under": {"above", "on"},
    "in front of": {"behind"},
    "behind": {"in front of"},
}
ASYMMETRIC = frozenset(OPPOSITE)


def _graph(sg: dict | None) -> tuple[dict, list[tuple[str, str]], list[tuple[str, str, str]]]:
    """(object name → count, [(object name, attribute)], [(subject name, relation, object name)])."""
    sg = sg or {}
    names = {o["id"]: o["name"] for o in sg.get("objects", [])}
    counts: dict[str, int] = Counter()
    for obj in sg.get("objects", []):
        counts[obj["name"]] += int(obj.get("count", 1))
    attrs = [
        (names[a["object"]], a["name"]) for a in sg.get("attributes", []) if a["object"] in names
    ]
    rels = [
        (names[r["subject"]], r["name"], names[r["object"]])
        for r in sg.get("relations", [])
        if r["subject"] in names and r["object"] in names
    ]
    return dict(counts), attrs, rels


def certainly_false(
    candidate: dict | None, own: dict | None, tags: dict | None, detectable: set[str] | None = None
) -> bool:
    """True when the candidate caption's scene graph cannot hold for this image.

    `detectable`: the detector's object names (every tag name in the corpus). Only those can be
    called absent: a "background" or a "photo" the detector has no class for proves nothing.
    """
    if candidate and detectable is not None:
        keep = {o["id"] for o in candidate.get("objects", []) if o["name"] in detectable}
        candidate = {
            "objects": [o for o in candidate.get("objects", []) if o["id"] in keep],
            "attributes": [a for a in candidate.get("attributes", []) if a["object"] in keep],
            "relations": [
                r
                for r in candidate.get("relations", [])
                if r["subject"] in keep and r["object"] in keep
            ],
        }
    c_counts, c_attrs, c_rels = _graph(candidate)
    o_counts, o_attrs, o_rels = _graph(own)
    if not c_counts:
        return False  # nothing we can check ("a photo", unparsed text): might be true
    if tags is None:
        # No detector evidence: the only safe call is "says nothing the own caption doesn't".
        subgraph = (
            all(o_counts.get(n, 0) >= c for n, c in c_counts.items())
            and set(c_attrs) <= set(o_attrs)
            and set(c_rels) <= set(o_rels)
        )
        return not subgraph
    present: Counter = Counter()
    for tag in tags.get("tags", []):
        # A name is listed once with its instance count: "two squares" needs count ≥ 2.
        present[str(tag.get("name"))] += tag_count(tag)
    for name, count in o_counts.items():
        # What the own caption names may be there though the detector missed it.
        present[name] = max(present[name], count)
    for name, count in c_counts.items():
        if present[name] == 0 or present[name] < min(count, 2):
            return True  # an object the detector does not see, or "two" of a single one
    unique = {n for n, c in present.items() if c == 1}
    tag_attrs = {
        (str(t["name"]), a if isinstance(a, str) else a.get("name", ""))
        for t in tags.get("tags", [])
        for a in t.get("attributes", [])
    }
    known = set(o_attrs) | tag_attrs
    for name, attr in c_attrs:
        if name not in unique or (name, attr) in known:
            continue  # two of them may differ; a known attribute is no contradiction
        category = attribute_category(attr)
        for k_name, k_attr in known:
            same_slot = k_name == name and k_attr != attr and category != "other"
            if same_slot and attribute_category(k_attr) == category:
                return True  # the one circle is red, the candidate says blue
    for s, r, o in c_rels:
        if s not in unique or o not in unique or s == o:
            continue
        for os_, orel, oo in o_rels:
            if (os_, oo) == (s, o) and r in OPPOSITE.get(orel, ()):
                return True
            if (os_, oo) == (o, s) and r == orel and r in ASYMMETRIC:
                return True
    return False


# ---- the stage on its own: shards in, shards out --------------------------------------------


def _versions() -> dict[str, str]:
    return package_versions(
        "apache-beam", "webdataset", "scikit-learn", "faiss-cpu", "numpy", "scipy"
    )


class _Progress:
    """A tqdm bar over samples written, fed by the in-process writer DoFns."""

    def __init__(self, total: int | None, enabled: bool):
        self.bar = tqdm(
            total=total, unit="sample", desc="mine", disable=not enabled, mininterval=0.5
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            self.bar.update(progress.rows_done() - self.bar.n)

    def __enter__(self) -> _Progress:
        progress.reset()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.bar.update(progress.rows_done() - self.bar.n)
        self.bar.close()


def _count_rows(shards: list[str]) -> int | None:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    total = 0
    for shard in shards:
        parquet = shard[: -len(".tar")] + ".parquet"
        if not storage.exists(parquet):
            return None
        with FileSystems.open(parquet, compression_type=storage.RAW) as handle:
            total += pq.ParquetFile(handle).metadata.num_rows
    return total


def run_mine(
    source: str,
    out: str,
    config: MineConfig = MineConfig(),
    beam_args: list[str] | None = None,
    workers: int = 1,
    show_progress: bool = True,
) -> dict:
    """Mine every shard under `source` into `out`; returns the manifest it wrote."""
    from vlforge.pipeline import mine_phases
    from vlforge.pipeline.beam_options import build_options
    from vlforge.pipeline.dask_fixes import close_client, spread
    from vlforge.pipeline.mine_filter import Relations
    from vlforge.pipeline.mine_shards import check_shard, list_shards

    started = time.time()
    check_config(config)
    shards = list_shards(source)
    for shard in shards:
        check_shard(shard)
    if any(storage.join(out, s.rsplit("/", 1)[-1]) == s for s in shards):
        raise UserError(f"--out {out} holds the input shards; choose another directory")
    storage.makedirs(out)
    options = build_options(beam_args or [], workers)
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    written_path = storage.join(out, ".mine-shards.json")
    work = mine_phases.MineWork.under(out)
    storage.delete_tree(work.root)  # an interrupted run's
    work.create()
    results = []
    relations = Relations(OPPOSITE, ASYMMETRIC)

    def run(items: int, build) -> None:
        # One pipeline per phase, one dask partition per work item (dask_fixes.spread).
        with beam.Pipeline(options=spread(options, items)) as pipeline:
            build(pipeline)
        results.append(pipeline.result)
        close_client(pipeline.result)

    def write(pipeline: beam.Pipeline) -> None:
        _ = (
            mine_phases.mine_phase(pipeline, shards, work, config, out)
            | "Written" >> mine_phases.combine_globally(beam.combiners.ToListCombineFn())
            | "Record" >> beam.Map(lambda w: storage.write_json(written_path, w))
        )

    try:
        with _Progress(_count_rows(shards), show_progress), _user_errors_from_workers():
            run(len(shards), lambda p: mine_phases.scan_phase(p, shards, work))
            run(len(shards), lambda p: mine_phases.group_phase(p, len(shards), work, config))
            n_buckets = len(mine_phases.bucket_paths(work))
            run(n_buckets, lambda p: mine_phases.train_phase(p, work, config))
            run(n_buckets, lambda p: mine_phases.fill_phase(p, work, config, relations))
            run(len(shards), write)
    finally:
        storage.delete_tree(work.root)
    finished = time.time()
    written = sorted(storage.read_json(written_path), key=lambda w: w["shard"])
    storage.delete([written_path])
    manifest = _manifest(source, out, config, shards, written, results, workers)
    manifest["timings"] = {
        "pipeline_s": round(finished - started, 3),
        "total_s": round(time.time() - started, 3),
    }
    manifest["figures"] = summarize_output(out)
    storage.write_json(storage.join(out, "manifest.json"), redact(manifest))
    return manifest


@contextlib.contextmanager
def _user_errors_from_workers():
    """A UserError raised in a DoFn (a shard corrupt past its header) reaches the user as one line."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise UserError(str(cause).split("\n")[0].split(" [while running")[0]) from err


def summarize_output(out: str) -> dict:
    """Counts over the written shards' parquet columns: samples, and per-sample means."""
    totals: Counter = Counter()
    for path in storage.glob(storage.join(out, "*.parquet")):
        table = storage.read_parquet(path)
        totals["samples"] += table.num_rows
        for name in ("n_hard_negatives", "n_positives", "n_image_positives", "n_rewrites"):
            if name in table.column_names:
                totals[name] += sum(v or 0 for v in table.column(name).to_pylist())
                totals[name + "_nonzero"] += sum(1 for v in table.column(name).to_pylist() if v)
    return dict(totals)


def _manifest(source, out, config, shards, written, results, workers) -> dict:
    counters: dict[str, int] = {}
    for result in results:  # one per phase
        try:
            for counter in result.metrics().query()["counters"]:
                name = f"{counter.key.metric.namespace}/{counter.key.metric.name}"
                counters[name] = counters.get(name, 0) + int(
                    counter.committed or counter.attempted or 0
                )
        except Exception:  # some runners report no metrics
            pass
    return {
        "stage": "mine",
        "config": {"in": source, "out": out, "workers": workers, **asdict(config)},
        "versions": _versions(),
        "machine": {"platform": platform.platform()},
        "shards_in": len(shards),
        "shards": written,
        "samples": sum(w["samples"] for w in written),
        "dropped_misaligned": sum(w.get("dropped_misaligned", 0) for w in written),
        "beam_counters": dict(sorted(counters.items())),
    }


def format_summary(manifest: dict) -> str:
    figures = manifest.get("figures", {})
    n = max(1, figures.get("samples", 0))
    threshold = manifest["config"].get("drop_misaligned")
    dropped = (
        ""
        if threshold is None
        else f", {manifest.get('dropped_misaligned', 0)} dropped as misaligned (>= {threshold:g})"
    )
    lines = [
        f"vlforge mine: {manifest['samples']} samples in {len(manifest['shards'])} shard(s) -> "
        f"{manifest['config']['out']} ({manifest['timings']['total_s']:.1f} s){dropped}",
        f"  {'per sample':<22}{'mean':>8}{'with any':>10}",
    ]
    for name, label in (
        ("n_hard_negatives", "hard negatives"),
        ("n_positives", "positive captions"),
        ("n_image_positives", "image positives"),
        ("n_rewrites", "rewrites"),
    ):
        lines.append(
            f"  {label:<22}{figures.get(name, 0) / n:>8.2f}{figures.get(name + '_nonzero', 0):>10}"
        )
    return "\n".join(lines)
