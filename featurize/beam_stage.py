"""The featurize Beam stage: (key, sample) → the same sample plus regions, features and tags.

`FeaturizeRegions` decodes each sample's jpg, batches images through `RunInference` (the detector
is loaded once per worker by `RegionModelHandler.load_model`), and adds `boxes.npy`, `feats.npy`,
`cls_prob.npy` and `tags.json`, recording the region metadata under `json["regions"]`. Every
earlier field is passed through byte for byte. `featurize_shards` runs it over WebDataset shards
with the DirectRunner (or any runner by Beam flags) and writes shards of the same names.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions

from vlforge.errors import UserError
from vlforge.featurize import detectron2_backend
from vlforge.featurize.detector import load_detector
from vlforge.featurize.regions import (
    ExtractionConfig,
    RegionExtractor,
    RegionSet,
    decode_image,
    region_metadata,
)
from vlforge.featurize.shards import npy_bytes, read_raw_samples, write_shard
from vlforge.featurize.tags import object_tags
from vlforge.featurize.text_stage import ParseSceneGraphs
from vlforge.pipeline import storage

NAMESPACE = "featurize"
REGION_FIELDS = ("boxes.npy", "feats.npy", "cls_prob.npy", "tags.json")  # plus sg.json (text_stage)


@dataclass
class ImageInput:
    """One sample on its way through RunInference: the raw sample rides along, so no join is needed."""

    sample: dict
    image: np.ndarray | None
    reason: str


@dataclass
class Featurized:
    regions: RegionSet
    class_names: list[str]
    attribute_names: list[str] | None
    detector: dict  # what produced the regions: backbone, weights checksum


def load_extractor(weights: str, extraction: ExtractionConfig) -> tuple[Any, dict]:
    """(extractor, metadata): torchvision weights by default, detectron2 for a detectron2 spec."""
    if detectron2_backend.is_spec(weights):
        extractor = detectron2_backend.Detectron2Extractor(weights, extraction)
        return extractor, {**extractor.meta, "class_names": extractor.class_names}
    model, meta = load_detector(weights)
    return RegionExtractor(model, meta["class_names"], extraction), meta


class LoadedDetector:
    """What `load_model` returns: the extractor and the identity that goes into every sample."""

    def __init__(self, weights: str, extraction: ExtractionConfig, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.extractor, meta = load_extractor(weights, extraction)
        self.class_names = list(meta["class_names"])
        self.attribute_names = meta.get("attribute_names")
        self.detector = {
            "backbone": meta.get("backbone"),
            "weights": meta.get("weights", weights),
            "weights_sha256": meta.get("weights_sha256"),
        }


class RegionModelHandler(ModelHandler[ImageInput, Featurized, LoadedDetector]):
    """Loads the detector once per worker and runs each batch of images through one forward."""

    def __init__(
        self,
        weights: str,
        batch_size: int = 8,
        extraction: ExtractionConfig = ExtractionConfig(),
        threads: int | None = None,
    ):
        super().__init__()
        self.weights = weights
        self.batch_size = batch_size
        self.extraction = extraction
        self.threads = threads

    def load_model(self) -> LoadedDetector:
        return LoadedDetector(self.weights, self.extraction, self.threads)

    def run_inference(
        self,
        batch: Sequence[ImageInput],
        model: LoadedDetector,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        regions = model.extractor.extract([x.image for x in batch], [x.reason for x in batch])
        for example, result in zip(batch, regions, strict=True):
            yield PredictionResult(
                example,
                Featurized(result, model.class_names, model.attribute_names, model.detector),
            )

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed-size batches amortise the detector's per-call Python (transform, RPN, NMS).
        # BatchElements would otherwise start at 1 and grow adaptively; the last, partial batch
        # of a bundle is still flushed.
        return {"min_batch_size": self.batch_size, "max_batch_size": self.batch_size}

    def get_num_bytes(self, batch: Sequence[ImageInput]) -> int:
        # The default pickles the batch just to measure it; the pixels are the size that matters.
        return sum(x.image.nbytes if x.image is not None else 0 for x in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE


class DecodeImage(beam.DoFn):
    """(key, sample) → (key, ImageInput); an undecodable jpg becomes None plus a reason."""

    def __init__(self) -> None:
        self.images = Metrics.counter(NAMESPACE, "images")

    def process(self, element):
        key, sample = element
        self.images.inc()
        image, reason = decode_image(sample.get("jpg"))
        yield key, ImageInput(sample, image, reason)


class AttachRegions(beam.DoFn):
    """(key, PredictionResult) → (key, sample with region fields and updated json)."""

    def __init__(self) -> None:
        self.regions = Metrics.counter(NAMESPACE, "regions")
        self.empty = Metrics.counter(NAMESPACE, "empty_with_reason")
        self.bad_json = Metrics.counter(NAMESPACE, "unreadable_json")

    def process(self, element):
        key, prediction = element
        sample: dict = dict(prediction.example.sample)
        found: Featurized = prediction.inference
        regions = found.regions
        meta = region_metadata(regions, found.class_names)
        meta["detector"] = found.detector
        sample["boxes.npy"] = npy_bytes(regions.boxes)
        sample["feats.npy"] = npy_bytes(regions.feats)
        sample["cls_prob.npy"] = npy_bytes(regions.cls_prob)
        tags = object_tags(regions, found.class_names, found.attribute_names)
        sample["tags.json"] = json.dumps(tags, sort_keys=True).encode()
        sample["json"] = self._updated_json(sample.get("json"), meta)
        self.regions.inc(len(regions))
        if regions.reason:
            self.empty.inc()
        yield key, sample

    def _updated_json(self, raw: bytes | str | dict | None, meta: dict) -> bytes:
        record: dict = {}
        if isinstance(raw, dict):  # a pipeline that keeps json decoded
            record = dict(raw)
        elif raw is not None:
            try:
                loaded = json.loads(raw)
                record = loaded if isinstance(loaded, dict) else {"value": loaded}
            except ValueError:
                self.bad_json.inc()
                record = {
                    "unreadable_json": raw.decode("utf-8", "replace")
                    if isinstance(raw, bytes)
                    else raw
                }
        record["regions"] = meta
        return json.dumps(record, sort_keys=True).encode()


class FeaturizeRegions(beam.PTransform):
    """(key, sample dict of raw fields) → (key, sample + boxes/feats/cls_prob/tags, json updated)."""

    def __init__(
        self,
        weights: str,
        batch_size: int = 8,
        extraction: ExtractionConfig = ExtractionConfig(),
        threads: int | None = None,
    ):
        super().__init__()
        self.handler = KeyedModelHandler(
            RegionModelHandler(weights, batch_size, extraction, threads)
        )

    def expand(self, samples):
        return (
            samples
            | "Decode" >> beam.ParDo(DecodeImage())
            | "Detect" >> RunInference(self.handler)
            | "Attach" >> beam.ParDo(AttachRegions())
        )


def _read_shard(path: str):
    name = path.rsplit("/", 1)[-1].removesuffix(".tar")
    for index, sample in enumerate(read_raw_samples(path)):
        yield (name, index), sample


def _write_shard(element, out_dir: str):
    name, items = element
    samples = [sample for _, sample in sorted(items, key=lambda kv: kv[0])]
    write_shard(storage.join(out_dir, name + ".tar"), samples)
    yield {"shard": name, "samples": len(samples)}


def _copy_stats(shards: list[str], out_dir: str) -> int:
    """The corpus's sibling parquet stats still describe the same samples: carry them over."""
    copied = 0
    for shard in shards:
        stats = shard.removesuffix(".tar") + ".parquet"
        if storage.exists(stats):
            storage.write_bytes(
                storage.join(out_dir, stats.rsplit("/", 1)[-1]), storage.read_bytes(stats)
            )
            copied += 1
    return copied


def find_shards(in_pattern: str) -> list[str]:
    """A directory means its *.tar; otherwise a glob or a single path."""
    pattern = in_pattern
    if not any(c in in_pattern for c in "*?[") and not in_pattern.endswith(".tar"):
        pattern = storage.join(in_pattern, "*.tar")
    return [p for p in storage.glob(pattern) if p.endswith(".tar")]


def _versions() -> dict[str, str]:
    import torch
    import torchvision
    import webdataset

    from vlforge import __version__ as vlforge_version

    return {
        "vlforge": vlforge_version,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "apache_beam": beam.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
    }


def _counters(result) -> dict[str, int]:
    counters: dict[str, int] = {}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
        name = counter.key.metric.name
        counters[name] = counters.get(name, 0) + int(counter.committed or counter.attempted or 0)
    return counters


def featurize_shards(
    in_pattern: str,
    out_dir: str,
    weights: str,
    batch_size: int = 8,
    extraction: ExtractionConfig = ExtractionConfig(),
    threads: int | None = 1,
    options: PipelineOptions | None = None,
) -> dict:
    """Featurize every shard matching `in_pattern` into `out_dir` (same names) plus manifest.json."""
    started = time.perf_counter()
    shards = find_shards(in_pattern)
    if not shards:
        raise UserError(f"no shards match {in_pattern} (expected {{prefix}}-NNNNNN.tar files)")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    load_started = time.perf_counter()
    _, meta = load_extractor(weights, extraction)  # fail fast, in one line, before Beam starts
    load_s = time.perf_counter() - load_started
    if any(p.rsplit("/", 1)[0].rstrip("/") == out_dir.rstrip("/") for p in shards):
        raise UserError(
            f"--out {out_dir} holds the input shards; featurize writes to another directory"
        )
    storage.makedirs(out_dir)
    names = {p.rsplit("/", 1)[-1] for p in shards}
    if len(names) != len(shards):
        raise UserError(f"{in_pattern} matches two shards with the same file name")
    options = options or PipelineOptions([])
    run_started = time.perf_counter()
    pipeline = beam.Pipeline(options=options)
    written = (
        pipeline
        | "Shards" >> beam.Create(shards)
        | "Read" >> beam.FlatMap(_read_shard)
        | "Featurize" >> FeaturizeRegions(weights, batch_size, extraction, threads)
        | "SceneGraphs" >> ParseSceneGraphs()
        | "ByShard" >> beam.Map(lambda kv: (kv[0][0], (kv[0][1], kv[1])))
        | "Group" >> beam.GroupByKey()
        | "Write" >> beam.FlatMap(_write_shard, out_dir)
    )
    del written
    result = pipeline.run()
    result.wait_until_finish()
    run_s = time.perf_counter() - run_started
    copied = _copy_stats(shards, out_dir)
    counts = _counters(result)
    manifest = {
        "stage": "featurize",
        "config": {
            "in": in_pattern,
            "out": out_dir,
            "weights": weights,
            "batch_size": batch_size,
            "threads": threads,
            "extraction": asdict(extraction),
            "beam_options": options.get_all_options(drop_default=True),
        },
        "detector": {
            "backbone": meta.get("backbone"),
            "weights_sha256": meta.get("weights_sha256"),
            "class_names": meta.get("class_names"),
            "cls_prob_background_column": 0,
        },
        "versions": _versions(),
        "machine": {"platform": platform.platform(), "processor": platform.machine()},
        "counts": {
            "shards": len(shards),
            "images": counts.get("images", 0),
            "regions": counts.get("regions", 0),
            "empty_with_reason": counts.get("empty_with_reason", 0),
            "unreadable_json": counts.get("unreadable_json", 0),
            "stats_copied": copied,
        },
        "shards": sorted(names),
        "timings_s": {
            "load_detector": round(load_s, 3),
            "pipeline": round(run_s, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    storage.write_json(storage.join(out_dir, "manifest.json"), manifest)
    return manifest
