"""Detector training on the demo world, weights files, and the mAP metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlforge.errors import UserError
from vlforge.featurize.detector import (
    BACKGROUND,
    DetectorConfig,
    build_detector,
    feature_dim,
    load_detector,
    save_detector,
    sidecar_path,
)
from vlforge.featurize.detector_eval import average_precision, map50, match_detections, per_class_ap
from vlforge.featurize.train_detector import (
    CLASS_NAMES,
    border_geometry,
    train_detector,
    world_example,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_loss_falls_on_a_tiny_run():
    _, report = train_detector(
        None, n_train=8, epochs=10, batch_size=4, eval_n=0, max_steps=14, log=lambda _: None
    )
    losses = report["losses"]
    assert len(losses) == 14
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_training_is_deterministic():
    runs = [
        train_detector(
            None, n_train=4, epochs=1, batch_size=2, eval_n=0, seed=5, log=lambda _: None
        )[1]["losses"]
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_world_boxes_follow_the_corpus_resize():
    example = world_example(0, 0)
    assert example.image.shape == (256, 256, 3)
    assert example.boxes.shape == (len(example.labels), 4)
    assert np.all(example.boxes >= 0) and np.all(example.boxes <= 256)
    for box in example.boxes:  # the centre of each (filled, convex-ish) shape is not background
        cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
        assert example.image[cy, cx].std() > 20  # saturated object colour, not the grey texture
    assert border_geometry(400, 200, 256) == (0.64, 0.64, 0.0, 64.0)


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    model = build_detector(CLASS_NAMES).eval()
    path = str(tmp_path / "det.pt")
    meta = save_detector(model, path, CLASS_NAMES, DetectorConfig(), note="test")
    loaded, loaded_meta = load_detector(path)
    assert loaded_meta == meta
    sidecar = json.loads((tmp_path / "det.pt.json").read_text())
    assert sidecar["class_names"] == CLASS_NAMES and sidecar["backbone"] == "tiny_fpn"
    assert sidecar["config"]["anchor_sizes"] == list(DetectorConfig().anchor_sizes)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # The weights file is a plain tensor dict: readable with weights_only=True by anyone.
    assert isinstance(torch.load(path, weights_only=True), dict)
    image = [torch.rand(3, 256, 256)]
    with torch.inference_mode():
        a, b = model(image)[0], loaded(image)[0]
    assert torch.equal(a["boxes"], b["boxes"])


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_detector(str(tmp_path / "missing.pt"))
    model = build_detector([BACKGROUND, "a"])
    path = str(tmp_path / "det.pt")
    save_detector(model, path, [BACKGROUND, "a"], DetectorConfig())
    (tmp_path / "det.pt").write_bytes(b"other bytes")
    with pytest.raises(UserError, match="checksum"):
        load_detector(path)
    (tmp_path / "det.pt.json").unlink()
    with pytest.raises(UserError, match="metadata not found"):
        load_detector(path)
    with pytest.raises(UserError, match="no published weights"):
        load_detector("torchvision:not_a_backbone")
    assert sidecar_path(path).endswith("det.pt.json")


def test_published_architecture_builds_without_weights():
    # The COCO path downloads its weights; here only the architecture is checked (random init).
    model = build_detector([BACKGROUND, "a", "b"], DetectorConfig.published("resnet50_fpn"))
    assert feature_dim(model) == 1024
    assert model.roi_heads.box_predictor.cls_score.out_features == 3


# --- mAP ----------------------------------------------------------------------------------------


def test_average_precision_by_hand():
    # Ranked: TP, FP, TP with 2 truths → recall 0.5 at precision 1, recall 1 at precision 2/3.
    ap = average_precision(np.array([0.9, 0.8, 0.7]), np.array([True, False, True]), 2)
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert average_precision(np.array([]), np.array([], bool), 3) == 0.0
    assert np.isnan(average_precision(np.array([0.5]), np.array([False]), 0))


def test_each_truth_matches_once():
    truth = np.array([[0, 0, 10, 10]], np.float32)
    dets = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5]], np.float32)
    assert match_detections(dets, np.array([0.6, 0.9]), truth).tolist() == [False, True]


def test_per_class_ap_perfect_and_missing():
    truth = [
        {
            "boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], np.float32),
            "labels": np.array([1, 2]),
        }
    ]
    perfect = [
        {"boxes": truth[0]["boxes"], "labels": np.array([1, 2]), "scores": np.array([0.9, 0.8])}
    ]
    assert per_class_ap(perfect, truth, 4) == {1: 1.0, 2: 1.0}  # class 3 has no truth: not averaged
    wrong = [
        {"boxes": truth[0]["boxes"], "labels": np.array([2, 1]), "scores": np.array([0.9, 0.8])}
    ]
    assert per_class_ap(wrong, truth, 4) == {1: 0.0, 2: 0.0}


def test_map50_runs_on_a_model():
    torch.manual_seed(0)
    model = build_detector(CLASS_NAMES)
    example = world_example(9, 0)
    value = map50(model, [example.image], [{"boxes": example.boxes, "labels": example.labels}])
    assert 0.0 <= value <= 1.0
