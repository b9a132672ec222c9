"""The bottom-up-attention attribute head: loss, training, weights, extraction and tags."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlforge.featurize.attribute_head import NO_ATTRIBUTE, attribute_loss
from vlforge.featurize.detector import DetectorConfig, build_detector, load_detector, save_detector
from vlforge.featurize.detector_eval import attribute_accuracy
from vlforge.featurize.regions import RegionExtractor
from vlforge.featurize.tags import object_tags
from vlforge.featurize.train_detector import (
    ATTRIBUTE_NAMES,
    CLASS_NAMES,
    train_detector,
    world_example,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_attribute_loss_splits_the_target_over_the_true_attributes():
    logits = torch.log(torch.tensor([[0.1, 0.3, 0.6], [0.5, 0.25, 0.25]]))
    targets = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    # Row 0: half on each of columns 1 and 2; row 1 has none, so all on "no attribute" (column 0).
    expected = (-(0.5 * math.log(0.3) + 0.5 * math.log(0.6)) - math.log(0.5)) / 2
    assert attribute_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)


def test_world_examples_carry_one_colour_and_one_size_per_object():
    example = world_example(0, 3)
    assert example.attributes.shape == (len(example.labels), len(ATTRIBUTE_NAMES))
    assert np.all(example.attributes.sum(axis=1) == 2)
    assert np.all(example.attributes[:, 0] == 0)  # never "no attribute"


def test_the_attribute_loss_is_trained_and_falls():
    _, report = train_detector(
        None, n_train=8, epochs=10, batch_size=4, eval_n=0, max_steps=14, log=lambda _: None
    )
    assert len(report["losses"]) == 14
    assert report["losses"][-1] < report["losses"][0]


def test_a_plain_detector_can_still_be_trained():
    model, report = train_detector(
        None,
        n_train=4,
        epochs=1,
        batch_size=2,
        eval_n=0,
        with_attributes=False,
        log=lambda _: None,
    )
    assert not hasattr(model.roi_heads, "attribute_head")
    assert len(report["losses"]) == 2


def test_training_without_attribute_targets_is_refused():
    model = build_detector(CLASS_NAMES, attribute_names=ATTRIBUTE_NAMES).train()
    example = world_example(0, 0)
    image = torch.from_numpy(example.image).permute(2, 0, 1).float() / 255
    target = {"boxes": torch.from_numpy(example.boxes), "labels": torch.from_numpy(example.labels)}
    with pytest.raises(ValueError, match="attributes"):
        model([image], [target])


def test_attribute_names_must_start_with_no_attribute():
    with pytest.raises(ValueError, match=NO_ATTRIBUTE):
        build_detector(CLASS_NAMES, attribute_names=["red", "blue"])


def test_weights_round_trip_keeps_the_head_and_its_names(tmp_path):
    torch.manual_seed(2)
    model = build_detector(CLASS_NAMES, attribute_names=ATTRIBUTE_NAMES).eval()
    path = str(tmp_path / "det.pt")
    save_detector(model, path, CLASS_NAMES, DetectorConfig(), ATTRIBUTE_NAMES)
    loaded, meta = load_detector(path)
    assert meta["attribute_names"] == ATTRIBUTE_NAMES
    state = loaded.state_dict()
    assert any(k.startswith("roi_heads.attribute_head.") for k in state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_extraction_and_tags_carry_attributes():
    torch.manual_seed(3)
    model = build_detector(CLASS_NAMES, attribute_names=ATTRIBUTE_NAMES).eval()
    regions = RegionExtractor(model, CLASS_NAMES).extract([world_example(0, 1).image])[0]
    assert regions.attr_prob is not None and regions.attr_prob.dtype == np.float16
    assert regions.attr_prob.shape == (len(regions), len(ATTRIBUTE_NAMES))
    assert np.allclose(regions.attr_prob.astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    # A uniform stand-in head gives every attribute 1/A < 0.2: lower the class threshold only.
    tags = object_tags(regions, CLASS_NAMES, ATTRIBUTE_NAMES, min_score=0.0)
    assert tags["has_attributes"] is True


def test_attribute_accuracy_reads_the_head_at_the_true_boxes():
    torch.manual_seed(4)
    model = build_detector(CLASS_NAMES, attribute_names=ATTRIBUTE_NAMES).eval()
    examples = [world_example(0, i) for i in range(3)]
    truth = [{"boxes": e.boxes, "labels": e.labels, "attributes": e.attributes} for e in examples]
    colours = list(range(1, 9))
    # Force the head to answer "column 1" for everything: accuracy = share of objects of colour 1.
    head = model.roi_heads.attribute_head
    with torch.no_grad():
        head.score.weight.zero_()
        head.score.bias.zero_()
        head.score.bias[1] = 5.0
    expected = np.mean(np.concatenate([e.attributes[:, 1] for e in examples]))
    got = attribute_accuracy(model, [e.image for e in examples], truth, colours)
    assert got == pytest.approx(expected)


def test_the_colour_skip_feeds_pooled_rgb_to_every_level():
    from vlforge.featurize.detector import TinyFPNBackbone

    torch.manual_seed(5)
    skip, plain = TinyFPNBackbone(16, colour_skip=True), TinyFPNBackbone(16, colour_skip=False)
    assert skip.fpn.inner_blocks[0][0].in_channels == plain.fpn.inner_blocks[0][0].in_channels + 3
    image = torch.rand(1, 3, 64, 64)
    levels = skip(image)
    assert list(levels) == ["0", "1", "2", "pool"] and levels["0"].shape == (1, 16, 8, 8)


def test_old_sidecars_without_the_colour_skip_load_as_before():
    config = DetectorConfig.from_dict({"backbone": "tiny_fpn"})
    assert config.colour_skip is False
    assert DetectorConfig().colour_skip is True


def test_a_scaled_backbone_gradient_still_trains_the_head():
    config = DetectorConfig(attribute_backbone_grad=0.1)
    model = build_detector(CLASS_NAMES, config, ATTRIBUTE_NAMES).train()
    example = world_example(0, 0)
    image = torch.from_numpy(example.image).permute(2, 0, 1).float() / 255
    target = {
        "boxes": torch.from_numpy(example.boxes),
        "labels": torch.from_numpy(example.labels),
        "attributes": torch.from_numpy(example.attributes),
    }
    losses = model([image], [target])
    losses["loss_attribute"].backward()
    head = model.roi_heads
    assert head.attribute_head.score.weight.grad.abs().sum() > 0
    assert head.box_head.fc7.weight.grad.abs().sum() > 0
