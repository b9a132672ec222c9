"""The bottom-up-attention attribute head on a torchvision Faster R-CNN.

Anderson et al. (2018) added to Faster R-CNN's box head a small classifier that predicts a
region's attributes ("red", "small", "striped") from its pooled feature concatenated with an
embedding of its object class, trained with softmax cross-entropy over the attribute vocabulary
(column 0 = "no attribute"). Its point is less the attribute names than what it does to the
features: the box head's output must now encode colour and size, which a class-only detector is
free to discard — and those features are what every region-based recipe reads (`feats.npy`).

torchvision has no attribute head, so `AttributeRoIHeads` extends its `RoIHeads`: in training it
reuses torchvision's proposal sampling and box losses and adds `loss_attribute` over the
foreground proposals, whose attribute targets come from the matched ground-truth box; in
evaluation it is torchvision's own forward (the head is queried by featurize's extractor, which
pools the final boxes itself).

`backbone_grad_scale` lets only a share of the attribute loss's gradient into the backbone (the
box head gets all of it). A small detector trained from scratch has few channels to spare: with
the full gradient its shape classification suffered (demo world, 400 steps: mAP@0.5 0.63), with
none it never learnt colour; 0.1 with the tiny backbone's colour skip gave both (600 steps:
mAP@0.5 0.98, colour accuracy 0.996, size 0.976).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

NO_ATTRIBUTE = "__no_attribute__"  # column 0, as the class background


class AttributeHead(nn.Module):
    """(pooled feature, object class) → attribute logits, as bottom-up-attention's `cls_embedding`
    + `fc_attr` + `attr_score` layers."""

    def __init__(
        self, feature_dim: int, num_classes: int, num_attributes: int, hidden: int = 256
    ) -> None:
        super().__init__()
        self.class_embedding = nn.Embedding(num_classes, hidden)
        self.fc = nn.Linear(feature_dim + hidden, hidden)
        self.score = nn.Linear(hidden, num_attributes)

    def forward(self, features: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([features, self.class_embedding(classes)], dim=1)
        return self.score(F.relu(self.fc(joined)))

    def probabilities(self, features: torch.Tensor, class_prob: torch.Tensor) -> torch.Tensor:
        """Attribute distribution of each region, conditioned on its best foreground class
        (column 0 of `class_prob` is the background)."""
        classes = class_prob[:, 1:].argmax(dim=1) + 1
        return F.softmax(self(features, classes), dim=-1)


def attribute_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the object's attributes, each weighted equally (a region with
    "red" and "small" puts half of the target mass on each; one without any on column 0)."""
    targets = targets.float()
    none = targets.sum(dim=1, keepdim=True) == 0
    targets = torch.where(
        none, F.one_hot(torch.zeros_like(none[:, 0]).long(), targets.shape[1]).float(), targets
    )
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=1).mean()


class AttributeRoIHeads(RoIHeads):
    """torchvision's box branch plus `attribute_head`; targets carry `attributes` (K×A multi-hot)."""

    def __init__(
        self,
        base: RoIHeads,
        attribute_head: AttributeHead,
        loss_weight: float,
        backbone_grad_scale: float = 1.0,
    ) -> None:
        # Rebuild from the configured heads rather than re-deriving torchvision's defaults, so a
        # detector keeps its sampling, NMS and thresholds whatever its builder chose.
        super().__init__(
            base.box_roi_pool,
            base.box_head,
            base.box_predictor,
            fg_iou_thresh=base.proposal_matcher.high_threshold,
            bg_iou_thresh=base.proposal_matcher.low_threshold,
            batch_size_per_image=base.fg_bg_sampler.batch_size_per_image,
            positive_fraction=base.fg_bg_sampler.positive_fraction,
            bbox_reg_weights=base.box_coder.weights,
            score_thresh=base.score_thresh,
            nms_thresh=base.nms_thresh,
            detections_per_img=base.detections_per_img,
        )
        self.attribute_head = attribute_head
        self.loss_weight = loss_weight
        self.backbone_grad_scale = backbone_grad_scale

    def forward(self, features, proposals, image_shapes, targets=None):  # type: ignore[override]
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None or any("attributes" not in t for t in targets):
            raise ValueError("training an attribute head needs `attributes` in every target")
        proposals, matched, labels, regression_targets = self.select_training_samples(
            proposals, targets
        )
        roi = self.box_roi_pool(features, proposals, image_shapes)
        pooled = self.box_head(roi)
        class_logits, box_regression = self.box_predictor(pooled)
        loss_classifier, loss_box_reg = fastrcnn_loss(
            class_logits, box_regression, labels, regression_targets
        )
        # `matched` indexes each sampled proposal's ground-truth box (clamped to 0 for the
        # background ones, which the foreground mask then drops).
        attributes = torch.cat([t["attributes"][m] for t, m in zip(targets, matched, strict=True)])
        classes = torch.cat(labels)
        foreground = classes > 0
        if foreground.any():
            if self.backbone_grad_scale == 1.0:
                attr_in = pooled[foreground]
            else:
                # Same forward value, gradient into the backbone scaled: the box head still
                # learns to carry colour while the shared convolutions keep to shape.
                fg_roi = roi[foreground]
                scale = self.backbone_grad_scale
                attr_in = self.box_head(fg_roi * scale + fg_roi.detach() * (1.0 - scale))
            logits = self.attribute_head(attr_in, classes[foreground])
            loss_attribute = self.loss_weight * attribute_loss(logits, attributes[foreground])
        else:  # keeps the graph connected so every parameter still gets a (zero) gradient
            loss_attribute = pooled.sum() * 0.0
        losses = {
            "loss_classifier": loss_classifier,
            "loss_box_reg": loss_box_reg,
            "loss_attribute": loss_attribute,
        }
        return [], losses


def attach_attribute_head(
    model: FasterRCNN,
    num_classes: int,
    num_attributes: int,
    feature_dim: int,
    hidden: int = 256,
    loss_weight: float = 0.5,
    backbone_grad_scale: float = 1.0,
) -> FasterRCNN:
    """Replace `model.roi_heads` by an AttributeRoIHeads around the same box branch."""
    head = AttributeHead(feature_dim, num_classes, num_attributes, hidden)
    model.roi_heads = AttributeRoIHeads(model.roi_heads, head, loss_weight, backbone_grad_scale)
    return model
