"""The featurize Beam stage: (key, sample) → the same sample plus regions, features and tags.

`FeaturizeRegions` decodes each sample's jpg, batches images through `RunInference` (the detector
is loaded once per worker by `RegionModelHandler.load_model`), and adds `boxes.npy`, `feats.npy`,
`cls_prob.npy` and `tags.json`, recording the region metadata under `json["regions"]`. Every
earlier field is passed through byte for byte. `featurize_shards` runs it over WebDataset shards
with the DirectRunner (or any runner by Beam flags) and writes shards of the same names.

Speed on CPU comes from three places: batches of images per forward; `ReadShards`, which hands
(shard, part) work items to the workers before anything is read, so every worker reads, decodes
and detects its own samples; and `optimize_for_inference`, which each worker applies to the
loaded torchvision detector (same outputs to float16, ~1.5x less CPU per image). With
`--workers N` the CLI runs DirectRunner workers as threads (`use_worker_threads`).
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import apache_beam as beam
import numpy as np
import torch
import torch.nn.functional as F
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.ops.poolers import _setup_scales

from vlforge.errors import UserError
from vlforge.featurize import detectron2_backend
from vlforge.featurize.detector import DEVICES, choose_device, load_detector
from vlforge.featurize.regions import (
    ExtractionConfig,
    RegionExtractor,
    RegionSet,
    decode_image,
    region_metadata,
)
from vlforge.featurize.shards import npy_bytes, read_raw_samples
from vlforge.featurize.tags import object_tags
from vlforge.pipeline import storage
from vlforge.pipeline.redact import redact

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


# ---------------------------------------------------------------------------------------------
# Inference-only rewrites of a loaded torchvision Faster R-CNN. Each one computes the same
# function (differences are float32 rounding, far below the float16 the features are stored in)
# with less CPU; tests/test_featurize_stage.py compares against the plain extractor.


class _BatchNormLeafTracer(torch.fx.Tracer):
    """fx's tracer, keeping torchvision's FrozenBatchNorm2d as one call (it would trace into it)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FrozenBatchNorm2d) or super().is_leaf_module(m, module_qualified_name)


def _fold_batchnorm(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a Conv2d into that conv, in place.

    An eval BN is a per-channel affine map, so conv→BN is one conv with scaled weights and bias:
    one pass over the activations instead of two. torch.fx traces the module's own forward to
    find the pairs whose conv output feeds nothing but the BN (TinyConvNet's Sequentials,
    ResNet's conv1/bn1 attributes with FrozenBatchNorm2d); the conv gets the folded weights and
    the BN becomes an Identity where it sits, so the module tree, and any forward that calls
    submodules by name, stays as it was. A module fx cannot trace is left alone (slower, same
    results). Returns the number of pairs folded.
    """
    try:
        graph = _BatchNormLeafTracer().trace(module)
    except Exception:  # data-dependent control flow etc.: keep the module as it is
        return 0
    modules = [n for n in graph.nodes if n.op == "call_module"]
    calls = Counter(n.target for n in modules)
    folded = 0
    for node in modules:
        bn = module.get_submodule(node.target)
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if (
            not isinstance(bn, (nn.BatchNorm2d, FrozenBatchNorm2d))
            or bn.training
            or getattr(bn, "running_mean", None) is None  # no running stats: batch statistics
            or not isinstance(source, torch.fx.Node)
            or source.op != "call_module"
            or len(source.users) != 1  # the conv's raw output is needed elsewhere too
            or calls[node.target] != 1  # a module called twice would be folded twice
            or calls[source.target] != 1
        ):
            continue
        conv = module.get_submodule(source.target)
        if not isinstance(conv, nn.Conv2d):
            continue
        conv.weight, conv.bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        parent, _, name = node.target.rpartition(".")
        setattr(module.get_submodule(parent), name, nn.Identity())
        folded += 1
    return folded


def _sample_axis(
    start: torch.Tensor, extent: torch.Tensor, length: torch.Tensor, pooled: int, grid: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (or columns) and weights of RoIAlign's bilinear samples along one axis.

    Per roi (R rows): `pooled` bins × `grid` samples each, every sample split between its two
    neighbouring cells, so (R, pooled, 2·grid) indices and weights. The rules are torchvision's
    CPU kernel (aligned=False): a sample beyond [-1, length] contributes nothing, one in
    [-1, 0] is clamped to 0, one past the last cell uses the last cell only.
    """
    bins = torch.arange(pooled, dtype=start.dtype)[None, :, None]
    samples = torch.arange(grid, dtype=start.dtype)[None, None, :]
    size = (extent / pooled)[:, None, None]
    at = start[:, None, None] + bins * size + (samples + 0.5) * size / grid
    length = length[:, None, None]
    inside = ((at >= -1.0) & (at <= length)).to(start.dtype)
    at = at.clamp(min=0.0)
    low = at.floor()
    last = low >= length - 1
    low = torch.where(last, length - 1, low)
    at = torch.where(last, low, at)
    high = torch.where(last, low, low + 1)
    frac = at - low
    weights = torch.stack([(1 - frac) * inside, frac * inside], dim=-1)
    index = torch.stack([low, high], dim=-1).to(torch.int64)
    return index.flatten(2), weights.flatten(2)


class GatherRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign as one `embedding_bag` over channels-last feature rows.

    torchvision's CPU kernel walks rois × channels × samples with scalar loads: ~8 of the tiny
    detector's ~32 ms per image. Each output bin is a weighted sum of at most (2·grid)² feature
    vectors, and an embedding bag with per-sample weights computes exactly that, vectorised over
    the channels, for every roi of every level in a single call. The result has the usual
    (R, C, ph, pw) shape with channels-last strides (no transpose copy); `ChannelsLastBoxHead`
    reads it as a view.
    """

    def __init__(self, like: MultiScaleRoIAlign):
        super().__init__(
            like.featmap_names,
            like.output_size,
            like.sampling_ratio,
            canonical_scale=like.canonical_scale,
            canonical_level=like.canonical_level,
        )
        if like.sampling_ratio <= 0:  # adaptive grids differ per roi: not one bag size
            raise ValueError("GatherRoIAlign needs a fixed sampling_ratio")

    def forward(
        self,
        x: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        maps = [v for k, v in x.items() if k in self.featmap_names]  # torchvision's order
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                maps, image_shapes, self.canonical_scale, self.canonical_level
            )
        channels = maps[0].shape[1]
        ph, pw = self.output_size
        grid = self.sampling_ratio
        rois = torch.cat(boxes)
        if len(rois) == 0:
            return rois.new_zeros((0, channels, ph, pw))
        image = torch.repeat_interleave(torch.tensor([len(b) for b in boxes]))
        levels = (
            self.map_levels(boxes).to(torch.int64)
            if len(maps) > 1
            else torch.zeros(len(rois), dtype=torch.int64)
        )
        # One table of C-vectors for all levels (each level a view when its map is already
        # channels-last), and every roi's level geometry looked up by its level.
        table = torch.cat([m.permute(0, 2, 3, 1).reshape(-1, channels) for m in maps])
        sizes = torch.tensor([m.shape[2] * m.shape[3] for m in maps])
        starts = torch.cumsum(sizes * maps[0].shape[0], 0) - sizes * maps[0].shape[0]
        height = torch.tensor([m.shape[2] for m in maps])[levels]
        width = torch.tensor([m.shape[3] for m in maps])[levels]
        scale = torch.tensor(self.scales, dtype=rois.dtype)[levels]
        x1, y1, x2, y2 = (rois[:, i] * scale for i in range(4))
        rows, row_w = _sample_axis(y1, (y2 - y1).clamp(min=1.0), height.to(rois.dtype), ph, grid)
        cols, col_w = _sample_axis(x1, (x2 - x1).clamp(min=1.0), width.to(rois.dtype), pw, grid)
        # Table row of (row, column): first row of the roi's map + row·width + column.
        first = starts[levels] + image * sizes[levels]
        row_start = first[:, None, None] + rows * width[:, None, None]
        # Bags are (R, ph, pw) bins of (2g)² samples; torchvision's 1/g² average goes into the
        # row weights.
        index = row_start[:, :, None, :, None] + cols[:, None, :, None, :]
        weight = (row_w / (grid * grid))[:, :, None, :, None] * col_w[:, None, :, None, :]
        bag = index.shape[-1] * index.shape[-2]
        pooled = F.embedding_bag(
            index.reshape(-1, bag),
            table,
            per_sample_weights=weight.reshape(-1, bag).to(table.dtype),
            mode="sum",
        )
        return pooled.view(len(rois), ph, pw, channels).permute(0, 3, 1, 2)


class LinearReLU(nn.Module):
    """relu(linear(x)) through oneDNN with the weights packed once, when PyTorch has oneDNN.

    The box head's fc6 (R·49·C → 1024 or 256 per roi, R = 300 proposals per image) is the
    largest single cost after the gather; a prepacked oneDNN matmul with the ReLU fused runs it
    in ~80% of the time of `F.linear` (MKL), same float32 results to ~1e-6. The packing op is
    PyTorch-internal (the one its inductor uses for frozen CPU graphs), so anything missing or
    failing falls back to the ordinary Linear. The Linear stays a submodule either way.
    """

    def __init__(self, linear: nn.Linear, rows: int = 1024):
        super().__init__()
        self.linear = linear
        self.packed: torch.Tensor | None = None
        if torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
            except (AttributeError, RuntimeError):  # op absent from this PyTorch build
                self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dtype == torch.float32 and x.device.type == "cpu":
            bias = self.linear.bias
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "relu", [], "")
        return F.relu(self.linear(x))


class ChannelsLastBoxHead(nn.Module):
    """torchvision's TwoMLPHead reading its (R, C, h, w) input in (h, w, C) order.

    fc6's columns are permuted once to match, so a channels-last input (GatherRoIAlign's) is
    flattened as a view instead of transposed; any other layout is permuted into that order.
    Both layers run as `LinearReLU`.
    """

    def __init__(self, head: TwoMLPHead, channels: int, cells: int):
        super().__init__()
        out_features, in_features = head.fc6.weight.shape
        if in_features != channels * cells:
            raise ValueError(f"fc6 takes {in_features} inputs, not {channels} x {cells}")
        fc6 = nn.Linear(in_features, out_features)
        with torch.no_grad():
            weight = head.fc6.weight.view(out_features, channels, cells)
            fc6.weight.copy_(weight.permute(0, 2, 1).reshape(out_features, in_features))
            fc6.bias.copy_(head.fc6.bias)
        self.fc6 = LinearReLU(fc6)
        self.fc7 = LinearReLU(head.fc7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc7(self.fc6(x.permute(0, 2, 3, 1).flatten(1)))


def optimize_for_inference(model: FasterRCNN) -> FasterRCNN:
    """The same detector, rewritten in place for CPU inference (see the section comment).

    - Conv+BN folded in the backbone;
    - backbone and RPN head convs in channels-last memory format (oneDNN's fast path; every
      conv output and so every FPN level comes out channels-last);
    - RoIAlign as a single gather (`GatherRoIAlign`) feeding a box head that reads it in place
      with prepacked oneDNN matmuls (`ChannelsLastBoxHead`, `LinearReLU`).
    """
    model.eval()
    if any(p.device.type != "cpu" for p in model.parameters()):
        return model  # accelerators have fast RoIAlign kernels and their own layout rules
    backbone = model.backbone
    _fold_batchnorm(backbone)
    backbone.to(memory_format=torch.channels_last)
    model.rpn.head.to(memory_format=torch.channels_last)
    heads = model.roi_heads
    pool = heads.box_roi_pool
    if type(pool) is MultiScaleRoIAlign and pool.sampling_ratio > 0:
        heads.box_roi_pool = GatherRoIAlign(pool)
        channels, cells = backbone.out_channels, pool.output_size[0] * pool.output_size[1]
        head = heads.box_head
        if type(head) is TwoMLPHead and head.fc6.in_features == channels * cells:
            heads.box_head = ChannelsLastBoxHead(head, channels, cells)
    return model


class LoadedDetector:
    """What `load_model` returns: the extractor and the identity that goes into every sample."""

    def __init__(
        self,
        weights: str,
        extraction: ExtractionConfig,
        threads: int | None,
        optimize: bool = True,
        device: str = "auto",
    ):
        if threads:
            torch.set_num_threads(threads)
        # Chosen here, on the worker: a fleet may mix GPU and CPU machines.
        self.device = choose_device(device)
        self.extractor, meta = load_extractor(weights, extraction)
        if isinstance(self.extractor, RegionExtractor):  # detectron2: as loaded
            self.extractor.model.to(self.device)
            if optimize:  # CPU rewrites; a model on a GPU is left as it is
                optimize_for_inference(self.extractor.model)
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
        optimize: bool = True,
        device: str = "auto",
    ):
        super().__init__()
        self.weights = weights
        self.batch_size = batch_size
        self.extraction = extraction
        self.threads = threads
        self.optimize = optimize
        self.device = device

    def load_model(self) -> LoadedDetector:
        return LoadedDetector(
            self.weights, self.extraction, self.threads, self.optimize, self.device
        )

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


def attach_regions(sample: dict, found: Featurized) -> tuple[dict, bool]:
    """A copy of `sample` with region fields and json["regions"]; True when its json was unreadable."""
    sample = dict(sample)
    regions = found.regions
    meta = region_metadata(regions, found.class_names)
    meta["detector"] = found.detector
    sample["boxes.npy"] = npy_bytes(regions.boxes)
    sample["feats.npy"] = npy_bytes(regions.feats)
    sample["cls_prob.npy"] = npy_bytes(regions.cls_prob)
    tags = object_tags(regions, found.class_names, found.attribute_names)
    sample["tags.json"] = json.dumps(tags, sort_keys=True).encode()
    sample["json"], bad_json = _updated_json(sample.get("json"), meta)
    return sample, bad_json


def _updated_json(raw: bytes | str | dict | None, meta: dict) -> tuple[bytes, bool]:
    record: dict = {}
    bad = False
    if isinstance(raw, dict):  # a pipeline that keeps json decoded
        record = dict(raw)
    elif raw is not None:
        try:
            loaded = json.loads(raw)
            record = loaded if isinstance(loaded, dict) else {"value": loaded}
        except ValueError:
            bad = True
            record = {
                "unreadable_json": raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            }
    record["regions"] = meta
    return json.dumps(record, sort_keys=True).encode(), bad


class AttachRegions(beam.DoFn):
    """(key, PredictionResult) → (key, sample with region fields and updated json)."""

    def __init__(self) -> None:
        self.regions = Metrics.counter(NAMESPACE, "regions")
        self.empty = Metrics.counter(NAMESPACE, "empty_with_reason")
        self.bad_json = Metrics.counter(NAMESPACE, "unreadable_json")

    def process(self, element):
        key, prediction = element
        found: Featurized = prediction.inference
        sample, bad_json = attach_regions(prediction.example.sample, found)
        self.regions.inc(len(found.regions))
        if found.regions.reason:
            self.empty.inc()
        if bad_json:
            self.bad_json.inc()
        yield key, sample


class FeaturizeRegions(beam.PTransform):
    """(key, sample dict of raw fields) → (key, sample + boxes/feats/cls_prob/tags, json updated).

    `optimize` (default) rewrites the loaded torchvision detector for CPU inference once per
    worker (`optimize_for_inference`); False runs the model exactly as loaded.
    """

    def __init__(
        self,
        weights: str,
        batch_size: int = 8,
        extraction: ExtractionConfig = ExtractionConfig(),
        threads: int | None = None,
        optimize: bool = True,
    ):
        super().__init__()
        self.handler = KeyedModelHandler(
            RegionModelHandler(weights, batch_size, extraction, threads, optimize)
        )

    def expand(self, samples):
        return (
            samples
            | "Decode" >> beam.ParDo(DecodeImage())
            | "Detect" >> RunInference(self.handler)
            | "Attach" >> beam.ParDo(AttachRegions())
        )


def _read_part(item: tuple[str, int, int]):
    """One interleaved part of a shard: the samples whose index is `part` modulo `parts`."""
    path, part, parts = item
    name = path.rsplit("/", 1)[-1].removesuffix(".tar")
    for index, sample in enumerate(read_raw_samples(path)):
        if index % parts == part:
            yield (name, index), sample


class ReadShards(beam.PTransform):
    """Shard paths → ((shard name, index in shard), raw sample), spread over the workers.

    The work items are (shard, part) pairs and a Reshuffle hands them out before anything is
    read, so each worker reads, decodes, detects and encodes its own items inside one fused
    stage; only the finished samples travel on. Splitting every shard into `parts` interleaved
    parts (each reads the tar and keeps every parts-th sample; reading is ~1% of detection) keeps
    workers busy when there are few shards: 1 shard and 2 workers would otherwise use one.
    """

    def __init__(self, shards: Sequence[str], parts: int = 1):
        super().__init__()
        if parts < 1:
            raise ValueError("parts must be at least 1")
        self.items = [(path, part, parts) for path in shards for part in range(parts)]

    def expand(self, pbegin):
        return (
            pbegin
            | "Parts" >> beam.Create(self.items, reshuffle=False)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(_read_part)
        )


def parts_per_shard(num_shards: int, workers: int) -> int:
    """Enough parts for about four work items per worker, so no worker idles for long at the end."""
    if workers <= 1 or num_shards <= 0:
        return 1
    return max(1, math.ceil(4 * workers / num_shards))


def _is_direct(options: PipelineOptions) -> bool:
    return options.view_as(StandardOptions).runner in (None, "DirectRunner", "direct")


def use_worker_threads(options: PipelineOptions) -> PipelineOptions:
    """DirectRunner's workers as threads of this process rather than child processes.

    Detection is torch ops, which release the GIL (py-spy: the GIL is held ~4% of an extract
    call), so threads run it in parallel as well as processes do, without what a child process
    costs: starting Python, importing Beam, torch and torchvision (~4 CPU-seconds each, about
    what 200 images of detection take) and moving every sample through gRPC to it and back.
    """
    if _is_direct(options):
        direct = options.view_as(DirectOptions)
        if direct.direct_running_mode == "multi_processing":
            direct.direct_running_mode = "multi_threading"
    return options


def direct_workers(options: PipelineOptions) -> int:
    """DirectRunner's process/thread count; 1 for in-memory and for other runners (they get
    their parallelism from many shards and their own autoscaling)."""
    if not _is_direct(options):
        return 1
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode not in ("multi_processing", "multi_threading"):
        return 1
    return max(1, direct.direct_num_workers or 1)


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


def featurize_shards(
    in_pattern: str,
    out_dir: str,
    weights: str,
    batch_size: int = 8,
    extraction: ExtractionConfig = ExtractionConfig(),
    threads: int | None = 1,
    options: PipelineOptions | None = None,
    optimize: bool = True,
    device: str = "auto",
) -> dict:
    """Featurize every shard matching `in_pattern` into `out_dir` (same names) plus manifest.json.

    `device`: auto (each worker's GPU if it has one, else its CPU), cpu or cuda.
    """
    started = time.perf_counter()
    shards = find_shards(in_pattern)
    if not shards:
        raise UserError(f"no shards match {in_pattern} (expected {{prefix}}-NNNNNN.tar files)")
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if device not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {device!r}")
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
    parts = parts_per_shard(len(shards), direct_workers(options))
    run_started = time.perf_counter()
    from vlforge.featurize.shard_stage import FeaturizeShards
    from vlforge.pipeline.dask_fixes import close_client, spread

    items = [(path, part, parts) for path in sorted(shards) for part in range(parts)]
    options = spread(options, len(items))
    record_path = storage.join(out_dir, ".featurize-record.json")
    pipeline = beam.Pipeline(options=options)
    _ = (
        pipeline
        | "Parts" >> beam.Create(items, reshuffle=False)
        | "Spread" >> beam.Reshuffle()
        | "Shards"
        >> FeaturizeShards(
            out_dir,
            weights=weights,
            batch_size=batch_size,
            extraction=extraction,
            threads=threads,
            optimize=optimize,
            device=device,
        )
        # Counts come back through the output, not Beam metrics (DaskRunner has none).
        | "Record" >> beam.Map(lambda record: storage.write_json(record_path, record))
    )
    # Workers run as threads of this process by default, and torch's thread count is
    # process-wide: without the restore, whatever runs next here (the demo's training) would be
    # left at the workers' --threads (1), 40% slower on this box.
    threads_before = torch.get_num_threads()
    try:
        result = pipeline.run()
        result.wait_until_finish()
    finally:
        torch.set_num_threads(threads_before)
        close_client(locals().get("result"))
    run_s = time.perf_counter() - run_started
    copied = _copy_stats(shards, out_dir)
    record = storage.read_json(record_path)
    storage.delete([record_path])
    counts = record["counts"]
    manifest = {
        "stage": "featurize",
        "config": {
            "in": in_pattern,
            "out": out_dir,
            "weights": weights,
            "batch_size": batch_size,
            "threads": threads,
            "optimize": optimize,
            "parts_per_shard": parts,
            "device": device,
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
            "captions_parsed": counts.get("captions_parsed", 0),
            "stats_copied": copied,
        },
        "devices": record["devices"],  # what the workers ran the detector on
        "shards": sorted(names),
        "timings_s": {
            "load_detector": round(load_s, 3),
            "pipeline": round(run_s, 3),
            "total": round(time.perf_counter() - started, 3),
        },
    }
    storage.write_json(storage.join(out_dir, "manifest.json"), redact(manifest))
    return manifest
