"""The featurize Beam stage over WebDataset shards: round trip, empty images, CLI errors."""

from __future__ import annotations

import copy
import io
import json
import pickle
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
import torch
import webdataset as wds
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import vlforge.cli
from tests.conftest import run_cli
from vlforge.featurize.beam_stage import (
    ChannelsLastBoxHead,
    GatherRoIAlign,
    ReadShards,
    optimize_for_inference,
    parts_per_shard,
)
from vlforge.featurize.detector import (
    BACKGROUND,
    DetectorConfig,
    build_detector,
    load_detector,
    save_detector,
)
from vlforge.featurize.regions import RegionExtractor, decode_image
from vlforge.featurize.shards import read_raw_samples, safe_decoder, write_shard
from vlforge.world.render import render_scene
from vlforge.world.scene import SHAPES, sample_scene

CLASSES = [BACKGROUND, *SHAPES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def featurize_cli(monkeypatch):
    if "vlforge.featurize.cli" not in vlforge.cli.STAGE_CLIS:
        monkeypatch.setattr(
            vlforge.cli, "STAGE_CLIS", (*vlforge.cli.STAGE_CLIS, "vlforge.featurize.cli")
        )


def jpeg(index: int, size: tuple[int, int] = (256, 256)) -> bytes:
    buffer = io.BytesIO()
    render_scene(sample_scene(11, index)).resize(size).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def sample(index: int, **extra) -> dict:
    return {
        "__key__": f"k{index:04d}",
        "jpg": jpeg(index),
        "txt": f"caption {index}",
        "json": {"url": f"http://example/{index}", "width": 256, "height": 256},
        **extra,
    }


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[str, str]:
    """Two shards: 3 + 3 samples, one with a corrupt jpg, one with fields featurize never reads."""
    root = tmp_path_factory.mktemp("featurize")
    src = root / "in"
    src.mkdir()
    # A .pyd field holds a pickle: it must travel as opaque bytes and never be unpickled.
    odd = sample(2, **{"sg.json": {"objects": []}, "extra.pyd": pickle.dumps({"x": 1})})
    broken = sample(4)
    broken["jpg"] = broken["jpg"][:200]
    write_shard(str(src / "corpus-000000.tar"), [sample(0), sample(1), odd])
    write_shard(str(src / "corpus-000001.tar"), [sample(3), broken, sample(5)])
    (src / "corpus-000000.parquet").write_bytes(b"PAR1 stand-in stats")
    torch.manual_seed(0)
    weights = root / "det.pt"
    save_detector(build_detector(CLASSES), str(weights), CLASSES, DetectorConfig())
    return str(src), str(weights)


@pytest.fixture(scope="module")
def featurized(shards, tmp_path_factory) -> tuple[str, dict]:
    from vlforge.featurize.beam_stage import featurize_shards

    src, weights = shards
    out = str(tmp_path_factory.mktemp("out"))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        manifest = featurize_shards(src, out, weights, batch_size=4, threads=1)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    return out, manifest | {"threads_after": threads_after}


def test_worker_threads_do_not_outlive_the_stage(featurized):
    """One in-process worker sets torch's threads to --threads; whatever runs next in this
    process (the demo's training) must get its own count back."""
    assert featurized[1]["threads_after"] == 2


def test_manifest_counts(featurized):
    out, manifest = featurized
    assert manifest["counts"]["shards"] == 2
    assert manifest["counts"]["images"] == 6
    assert manifest["counts"]["empty_with_reason"] == 1
    assert manifest["counts"]["regions"] >= 5 * 10
    assert manifest["counts"]["stats_copied"] == 1
    assert manifest["detector"]["cls_prob_background_column"] == 0
    assert set(manifest["versions"]) >= {"torch", "torchvision", "apache_beam", "webdataset"}
    on_disk = json.loads(Path(out, "manifest.json").read_text())
    assert on_disk["counts"] == manifest["counts"]


def test_round_trip_keeps_every_earlier_field(shards, featurized):
    src, _ = shards
    out, _ = featurized
    for name in ("corpus-000000", "corpus-000001"):
        before = list(read_raw_samples(f"{src}/{name}.tar"))
        after = list(read_raw_samples(f"{out}/{name}.tar"))
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]  # same order
        written = {"boxes.npy", "feats.npy", "cls_prob.npy", "tags.json", "sg.json"}
        for old, new in zip(before, after, strict=True):
            for field, value in old.items():
                if field != "json" and field not in written:  # this stage's own fields are redone
                    assert new[field] == value, field  # byte for byte
            old_json, new_json = json.loads(old["json"]), json.loads(new["json"])
            assert {k: new_json[k] for k in old_json} == old_json
            assert set(new) == set(old) | written
            graph = json.loads(new["sg.json"])  # the caption's text scene graph
            assert graph["tokens"] and {"objects", "attributes", "relations"} <= set(graph)


def test_plain_webdataset_reads_the_output(featurized):
    out, _ = featurized
    dataset = wds.WebDataset(f"{out}/corpus-000000.tar", shardshuffle=False).map(safe_decoder())
    samples = list(dataset)
    assert len(samples) == 3
    for s in samples:
        n = s["json"]["regions"]["count"]
        assert 10 <= n <= 100
        assert s["boxes.npy"].shape == (n, 4) and s["boxes.npy"].dtype == np.float32
        assert s["feats.npy"].dtype == np.float16 and s["feats.npy"].shape[0] == n
        assert (
            s["cls_prob.npy"].shape == (n, len(CLASSES)) and s["cls_prob.npy"].dtype == np.float16
        )
        np.testing.assert_allclose(s["cls_prob.npy"].astype(np.float64).sum(1), 1.0, atol=5e-3)
        assert np.all(s["boxes.npy"][:, 2:] <= 256)
        assert s["json"]["regions"]["cls_prob_background_column"] == 0
        assert s["json"]["regions"]["class_names"] == CLASSES
        assert isinstance(s["tags.json"]["tags"], list)
        assert isinstance(s["jpg"], np.ndarray) and s["txt"].startswith("caption")
    odd = samples[2]
    assert isinstance(odd["extra.pyd"], bytes)  # the safe decoder left the pickle alone


def test_corrupt_image_gives_empty_regions_with_reason(featurized):
    out, _ = featurized
    broken = {s["__key__"]: s for s in read_raw_samples(f"{out}/corpus-000001.tar")}["k0004"]
    meta = json.loads(broken["json"])["regions"]
    assert meta["count"] == 0 and meta["reason"].startswith("undecodable")
    decode = safe_decoder()
    decoded = decode({k: v for k, v in broken.items() if k != "jpg"})
    assert decoded["boxes.npy"].shape == (0, 4)
    assert decoded["feats.npy"].shape[0] == 0
    assert decoded["cls_prob.npy"].shape == (0, len(CLASSES))
    assert decoded["tags.json"]["tags"] == []


def test_cli_runs_and_reports(shards, tmp_path):
    src, weights = shards
    code, out, err = run_cli(
        "featurize",
        "--in",
        src + "/corpus-000000.tar",
        "--out",
        str(tmp_path / "o"),
        "--weights",
        weights,
    )
    assert code == 0, err
    assert "featurized 3 images in 1 shards" in out
    assert (tmp_path / "o" / "corpus-000000.tar").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--in", "{tmp}/nothing", "--out", "{tmp}/o", "--weights", "{weights}"],
            "no shards match",
        ),
        (
            ["--in", "{src}", "--out", "{tmp}/o", "--weights", "{tmp}/missing.pt"],
            "weights not found",
        ),
        (["--in", "{src}", "--out", "{tmp}/o"], "needs --weights"),
        (["--in", "{src}", "--out", "{src}", "--weights", "{weights}"], "holds the input shards"),
        (["train-detector"], "needs --out"),
    ],
)
def test_cli_errors_are_one_line(shards, tmp_path, args, message):
    src, weights = shards
    argv = [a.format(tmp=tmp_path, src=src, weights=weights) for a in args]
    code, out, err = run_cli("featurize", *argv)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_safe_decoder_never_unpickles():
    data = pickle.dumps({"x": 1})
    decoded = safe_decoder()(
        {"__key__": "k", "a.pyd": data, "b.pth": data, "c.pickle": data, "d.txt": b"hi"}
    )
    assert decoded["a.pyd"] == data and decoded["b.pth"] == data and decoded["c.pickle"] == data
    assert decoded["d.txt"] == "hi"


def test_image_bytes_decode_to_rgb():
    decoded = safe_decoder()({"__key__": "k", "jpg": jpeg(0, (40, 30))})
    assert decoded["jpg"].shape == (30, 40, 3) and decoded["jpg"].dtype == np.uint8
    assert Image.open(io.BytesIO(jpeg(0))).size == (256, 256)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _assert_regions_equal_plain_loop(out: str, weights: str) -> None:
    """The shards in `out` hold what a plain one-image-per-call loop computes.

    Float32 rounding differs between the two (batch sizes, folded BN, gather RoIAlign), so two
    proposals whose confidences tie to ~1e-7 may trade places; anything else must agree to the
    float16 the features are stored in.
    """
    model, meta = load_detector(weights)
    plain = RegionExtractor(model.eval(), meta["class_names"])
    rows = same = 0
    for name in ("corpus-000000", "corpus-000001"):
        for sample in read_raw_samples(f"{out}/{name}.tar"):
            (ref,) = plain.extract([decode_image(sample["jpg"])[0]])
            boxes, feats = _npy(sample["boxes.npy"]), _npy(sample["feats.npy"])
            cls_prob = _npy(sample["cls_prob.npy"])
            assert len(boxes) == len(ref), sample["__key__"]
            for k in range(len(ref)):
                rows += 1
                if np.abs(boxes[k] - ref.boxes[k]).max() > 1e-3:
                    continue  # a tie that rounding broke the other way
                same += 1
                np.testing.assert_allclose(
                    feats[k].astype(np.float32),
                    ref.feats[k].astype(np.float32),
                    rtol=2e-3,
                    atol=1e-4,
                )
                np.testing.assert_allclose(
                    cls_prob[k].astype(np.float32), ref.cls_prob[k].astype(np.float32), atol=1e-3
                )
    assert rows >= 50 and same >= 0.95 * rows


def test_stage_regions_equal_the_per_image_extractor(shards, featurized):
    """The stage (batched, optimised model) writes what the plain per-image extractor computes."""
    _, weights = shards
    out, manifest = featurized
    assert manifest["config"]["optimize"] is True
    _assert_regions_equal_plain_loop(out, weights)


def test_worker_threads_write_the_same_regions(shards, tmp_path):
    """--workers 2 (threads, the CLI's default mode): parts spread, same shards and regions."""
    from vlforge.featurize.beam_stage import featurize_shards, use_worker_threads
    from vlforge.pipeline.beam_options import build_options

    src, weights = shards
    options = use_worker_threads(build_options([], 2))
    manifest = featurize_shards(src, str(tmp_path), weights, batch_size=4, options=options)
    assert manifest["config"]["parts_per_shard"] == 4  # 2 shards → 8 items for 2 workers
    assert manifest["counts"]["images"] == 6 and manifest["counts"]["empty_with_reason"] == 1
    for name in ("corpus-000000", "corpus-000001"):
        keys = [s["__key__"] for s in read_raw_samples(f"{tmp_path}/{name}.tar")]
        assert keys == [s["__key__"] for s in read_raw_samples(f"{src}/{name}.tar")]
    _assert_regions_equal_plain_loop(str(tmp_path), weights)


def _odd_batchnorm(model: nn.Module, frozen: bool) -> None:
    """Give every BN non-trivial statistics (fresh ones are the identity), or swap in
    torchvision's FrozenBatchNorm2d (what the published ResNet detectors use)."""
    generator = torch.Generator().manual_seed(3)
    for parent in list(model.modules()):
        for name, bn in list(parent.named_children()):
            if not isinstance(bn, nn.BatchNorm2d):
                continue
            c = bn.num_features
            if frozen:
                bn = FrozenBatchNorm2d(c, eps=bn.eps)
                setattr(parent, name, bn)
            with torch.no_grad():
                bn.weight.copy_(0.5 + torch.rand(c, generator=generator))
                bn.bias.copy_(0.1 * torch.randn(c, generator=generator))
                bn.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                bn.running_var.copy_(0.5 + torch.rand(c, generator=generator))


@pytest.mark.parametrize("frozen", [False, True])
def test_optimized_detector_computes_the_same_function(frozen):
    torch.manual_seed(1)
    model = build_detector(CLASSES, DetectorConfig()).eval()
    _odd_batchnorm(model, frozen)
    fast = optimize_for_inference(copy.deepcopy(model))
    norms = (nn.BatchNorm2d, FrozenBatchNorm2d)
    assert not any(isinstance(m, norms) for m in fast.backbone.modules())  # all folded
    assert isinstance(fast.roi_heads.box_roi_pool, GatherRoIAlign)
    assert isinstance(fast.roi_heads.box_head, ChannelsLastBoxHead)
    if torch.backends.mkldnn.is_available():  # the oneDNN path is the one under test
        assert fast.roi_heads.box_head.fc6.packed is not None
    images = torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    sizes = [(256, 256)] * 3
    boxes = [
        torch.tensor(
            [
                [10.0, 20.0, 60.0, 90.0],
                [0.0, 0.0, 256.0, 256.0],  # level 4 (sqrt(area) >= 224)
                [-120.0, -80.0, 380.0, 400.0],  # past the image on every side: level 5
                [250.0, 250.0, 256.0, 256.0],  # the last cells
                [30.2, 40.7, 30.5, 40.9],  # under a pixel: RoIAlign's 1-cell minimum
                [-8.0, 100.0, 3.0, 130.0],  # samples left of 0 and below -1
            ]
        ),
        torch.zeros((0, 4)),  # an image without boxes
        torch.tensor([[5.0, 5.0, 120.0, 40.0], [100.5, 10.25, 255.9, 200.0]]),
    ]
    with torch.inference_mode():
        ref = model.backbone(images)
        got = fast.backbone(images)
        assert list(got) == list(ref)
        for level in ref:
            scale = float(ref[level].abs().max())
            torch.testing.assert_close(got[level], ref[level], rtol=0, atol=1e-5 * scale)
        pooled_ref = model.roi_heads.box_roi_pool(ref, boxes, sizes)
        pooled = fast.roi_heads.box_roi_pool(ref, boxes, sizes)
        assert pooled.shape == pooled_ref.shape == (8, 64, 7, 7)
        torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-6)
        head_ref = model.roi_heads.box_head(pooled_ref)
        torch.testing.assert_close(fast.roi_heads.box_head(pooled), head_ref, rtol=1e-4, atol=1e-5)
        # The box head also reads an ordinary (NCHW-contiguous) input correctly.
        torch.testing.assert_close(
            fast.roi_heads.box_head(pooled_ref), head_ref, rtol=1e-4, atol=1e-5
        )
        empty = fast.roi_heads.box_roi_pool(ref, [torch.zeros((0, 4))] * 3, sizes)
        assert empty.shape == (0, 64, 7, 7)


def test_read_shards_spreads_parts_and_reads_every_sample_once(shards):
    src, _ = shards
    paths = [f"{src}/corpus-000000.tar", f"{src}/corpus-000001.tar"]
    expected = [(p.rsplit("/", 1)[-1][:-4], i) for p in paths for i in range(3)]
    with beam.Pipeline() as pipeline:
        keys = pipeline | ReadShards(paths, parts=4) | beam.Keys()
        assert_that(keys, equal_to(expected))
    assert parts_per_shard(1, 2) == 8  # one shard still feeds both workers
    assert parts_per_shard(4, 2) == 2
    assert parts_per_shard(500, 2) == 1
    assert parts_per_shard(3, 1) == 1
