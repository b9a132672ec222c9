"""Region extraction: the bottom-up selection rule, output fields, empty images, object tags."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlforge.featurize.detector import BACKGROUND, DetectorConfig, build_detector
from vlforge.featurize.regions import (
    ExtractionConfig,
    RegionExtractor,
    RegionSet,
    decode_image,
    region_metadata,
    select_regions,
)
from vlforge.featurize.tags import object_tags, tag_text
from vlforge.world.render import render_scene
from vlforge.world.scene import SHAPES, sample_scene

CLASSES = [BACKGROUND, *SHAPES]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def extractor(one_torch_thread) -> RegionExtractor:
    torch.manual_seed(0)  # random init: enough to check shapes, ranges and the selection floor
    return RegionExtractor(build_detector(CLASSES, DetectorConfig()), CLASSES)


def world_image(index: int, size: tuple[int, int] = (256, 256)) -> np.ndarray:
    return np.array(render_scene(sample_scene(3, index)).resize(size))


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG")
    return buffer.getvalue()


# --- the selection rule, on hand-made detections ---------------------------------------------


def spread_boxes(n: int, num_classes: int) -> torch.Tensor:
    """n disjoint 10-px boxes, the same for every class: NMS suppresses nothing."""
    x = torch.arange(n, dtype=torch.float32) * 20
    boxes = torch.stack([x, torch.zeros(n), x + 10, torch.full((n,), 10.0)], 1)
    return boxes[:, None, :].expand(n, num_classes, 4).clone()


def scores_with(passing: int, n: int, num_classes: int = 3) -> torch.Tensor:
    """Proposals 0..passing-1 score 0.5 on class 1, the others 0.1; background takes the rest."""
    scores = torch.zeros(n, num_classes)
    scores[:, 1] = 0.1
    scores[:passing, 1] = 0.5
    scores[:, 0] = 1 - scores[:, 1:].sum(1)
    return scores


def test_nms_is_per_class():
    # Proposals 0 and 1 overlap almost fully. In class 1, 1 loses to 0; in class 2, 1 is the best.
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11], [50, 50, 60, 60]], dtype=torch.float32)
    class_boxes = boxes[:, None, :].expand(3, 3, 4).clone()
    scores = torch.tensor([[0.1, 0.8, 0.1], [0.1, 0.6, 0.3], [0.7, 0.25, 0.05]])
    config = ExtractionConfig(min_boxes=1)
    index, picked, conf = select_regions(class_boxes, scores, config)
    assert index.tolist() == [0, 1, 2]
    # 1 survives only in class 2 (0.3); 2 survives in class 1 (0.25): background never counts.
    assert conf.tolist() == pytest.approx([0.8, 0.3, 0.25])
    assert picked.tolist() == boxes.tolist()


def test_nms_suppresses_within_a_class():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 11]], dtype=torch.float32)
    class_boxes = boxes[:, None, :].expand(2, 2, 4).clone()
    scores = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    index, _, conf = select_regions(class_boxes, scores, ExtractionConfig(min_boxes=1))
    assert index.tolist() == [0]  # 1 is suppressed and below no floor
    assert conf.tolist() == pytest.approx([0.9])


def test_box_comes_from_the_winning_class():
    class_boxes = torch.tensor([[[0, 0, 1, 1], [0, 0, 5, 5], [0, 0, 9, 9]]], dtype=torch.float32)
    scores = torch.tensor([[0.1, 0.2, 0.7]])
    _, picked, _ = select_regions(class_boxes, scores, ExtractionConfig(min_boxes=1))
    assert picked.tolist() == [[0, 0, 9, 9]]


@pytest.mark.parametrize(
    ("passing", "total", "expected"),
    [(0, 30, 10), (5, 30, 10), (10, 30, 10), (37, 60, 37), (150, 160, 100), (3, 4, 4)],
)
def test_adaptive_count(passing: int, total: int, expected: int):
    index, _, conf = select_regions(spread_boxes(total, 3), scores_with(passing, total))
    assert len(index) == expected
    assert sorted(index[: min(passing, expected)].tolist()) == list(range(min(passing, expected)))
    assert torch.all(conf[:-1] >= conf[1:])  # ranked by confidence


def test_threshold_is_inclusive():
    scores = scores_with(0, 12)
    scores[:12, 1] = 0.2
    scores[:, 0] = 1 - scores[:, 1:].sum(1)
    index, _, _ = select_regions(spread_boxes(12, 3), scores)
    assert len(index) == 12  # all twelve reach exactly 0.2


# --- extraction --------------------------------------------------------------------------------


def test_fields_shapes_dtypes_ranges(extractor: RegionExtractor):
    images = [world_image(0), world_image(1, (320, 200))]
    for image, regions in zip(images, extractor.extract(images), strict=True):
        h, w = image.shape[:2]
        n = len(regions)
        assert 10 <= n <= 100
        assert regions.reason == ""
        assert (regions.width, regions.height) == (w, h)
        assert regions.boxes.dtype == np.float32 and regions.boxes.shape == (n, 4)
        assert regions.feats.dtype == np.float16 and regions.feats.shape == (n, extractor.feat_dim)
        assert regions.cls_prob.dtype == np.float16 and regions.cls_prob.shape == (n, len(CLASSES))
        b = regions.boxes
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
        assert np.all(b[:, 2] <= w) and np.all(b[:, 3] <= h)
        assert np.all(b[:, 2] >= b[:, 0]) and np.all(b[:, 3] >= b[:, 1])
        prob = regions.cls_prob.astype(np.float64)
        assert np.all(prob >= 0)
        np.testing.assert_allclose(prob.sum(1), 1.0, atol=5e-3)
        assert np.all(np.isfinite(regions.feats.astype(np.float32)))


def test_batch_equals_one_at_a_time(extractor: RegionExtractor):
    images = [world_image(i) for i in range(3)]
    batched = extractor.extract(images)
    for image, together in zip(images, batched, strict=True):
        (alone,) = extractor.extract([image])
        np.testing.assert_allclose(together.boxes, alone.boxes, atol=1e-3)
        np.testing.assert_allclose(
            together.feats.astype(np.float32), alone.feats.astype(np.float32), atol=2e-2
        )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_image"),
        (None, "missing_image"),
        (b"\xff\xd8\xff\xe0 not really a jpeg", "undecodable"),
    ],
)
def test_bad_bytes_give_a_reason(data, reason: str):
    image, why = decode_image(data)
    assert image is None
    assert why.startswith(reason)


def test_truncated_jpeg_gives_a_reason():
    data = jpeg(world_image(0))
    image, why = decode_image(data[: len(data) // 3])
    assert image is None and why.startswith("undecodable")


def test_empty_region_set_in_a_mixed_batch(extractor: RegionExtractor):
    good = world_image(2)
    results = extractor.extract(
        [None, good, np.zeros((0, 5, 3), np.uint8)], ["undecodable: broken", "", ""]
    )
    empty, full, zero = results
    d, c = extractor.feat_dim, len(CLASSES)
    for regions, reason in ((empty, "undecodable: broken"), (zero, "bad_shape")):
        assert len(regions) == 0
        assert regions.reason.startswith(reason)
        assert regions.boxes.shape == (0, 4) and regions.boxes.dtype == np.float32
        assert regions.feats.shape == (0, d) and regions.feats.dtype == np.float16
        assert regions.cls_prob.shape == (0, c) and regions.cls_prob.dtype == np.float16
    assert len(full) >= 10


def test_metadata_states_the_background_convention(extractor: RegionExtractor):
    (regions,) = extractor.extract([world_image(0)])
    meta = region_metadata(regions, CLASSES)
    assert meta["cls_prob_background_column"] == 0
    assert meta["class_names"][0] == BACKGROUND
    assert meta["count"] == len(regions) and "reason" not in meta
    empty = region_metadata(extractor.empty("empty_image"), CLASSES)
    assert empty["count"] == 0 and empty["reason"] == "empty_image"


# --- tags ---------------------------------------------------------------------------------------


def region_set(
    cls_prob: list[list[float]],
    attr_prob: list[list[float]] | None = None,
    boxes: list[list[float]] | None = None,
) -> RegionSet:
    n = len(cls_prob)
    if boxes is None:  # disjoint 10 px boxes on a row
        boxes = [[20.0 * i, 0.0, 20.0 * i + 10, 10.0] for i in range(n)]
    return RegionSet(
        boxes=np.asarray(boxes, np.float32).reshape(n, 4),
        feats=np.zeros((n, 4), np.float16),
        cls_prob=np.asarray(cls_prob, np.float16),
        width=200,
        height=200,
        attr_prob=None if attr_prob is None else np.asarray(attr_prob, np.float16),
    )


def test_tags_are_detections_deduplicated_by_name_with_counts():
    names = [BACKGROUND, "circle", "square", "star"]
    regions = region_set(
        [
            [0.02, 0.9, 0.05, 0.03],  # circle 0.9
            [0.1, 0.6, 0.2, 0.1],  # a second circle elsewhere: same tag, count 2
            [0.2, 0.05, 0.05, 0.7],  # "star" on the first circle's box: the same object again
            [0.3, 0.05, 0.55, 0.1],  # square 0.55
            [0.5, 0.05, 0.45, 0.0],  # square 0.45: below the threshold, no tag
            [0.85, 0.05, 0.05, 0.05],  # background
        ],
        boxes=[
            [0, 0, 10, 10],
            [50, 50, 60, 60],
            [1, 0, 10, 10],
            [100, 0, 110, 10],
            [150, 0, 160, 10],
            [0, 100, 10, 110],
        ],
    )
    tags = object_tags(regions, names)
    assert [(t["name"], t["score"], t["count"]) for t in tags["tags"]] == [
        ("circle", pytest.approx(0.9, abs=1e-3), 2),
        ("square", pytest.approx(0.55, abs=1e-3), 1),
    ]
    assert all(t["attributes"] == [] for t in tags["tags"])
    assert tags["has_attributes"] is False
    assert tag_text(tags) == "circle square"
    # Without the class-agnostic NMS the star on the circle would be a tag of its own.
    assert "star" in tag_text(object_tags(regions, names, nms_iou=1.0))


def test_tags_of_an_empty_set():
    assert object_tags(RegionSet.empty("empty_image", 4, 3), [BACKGROUND, "a", "b"])["tags"] == []


def test_tags_with_an_attribute_head():
    names = [BACKGROUND, "circle"]
    regions = region_set([[0.1, 0.9]], attr_prob=[[0.5, 0.3, 0.1, 0.6]])
    tags = object_tags(
        regions, names, attribute_names=["__no_attribute__", "red", "small", "striped"]
    )
    attrs = tags["tags"][0]["attributes"]
    assert [a["name"] for a in attrs] == ["striped", "red"]  # column 0 never; below 0.2 dropped
