"""Fast R-CNN RoI features inside a model: a detector's backbone, RoI pooling and box head, run on
given boxes and trained with the rest of the model (VL-BERT fine-tunes its Fast R-CNN).

The detector comes from vlforge.featurize: fresh (`tiny_fpn`, sized by the caller) or loaded from
the same weights file + JSON sidecar `vlforge featurize` reads (`torch.load(weights_only=True)`).
As torchvision has no per-box feature API, this walks it by hand: backbone →
`roi_heads.box_roi_pool(features, boxes, image_sizes)` → `roi_heads.box_head`, boxes in the
pixels of the image given. The detector's own transform (resize to its `min_size`) is not run: the
data side already sized the image, so callers normalize with `normalize` and pass pixel boxes.

BatchNorm statistics stay frozen in training (the detectors' usual fine-tuning: batches of a few
images would corrupt them), so features do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class RoIFeatureExtractor(nn.Module):
    """images B×3×H×W (normalized) and boxes (one N_i×4 xyxy pixel tensor per image) → ΣN_i×D."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        from vlforge.featurize.detector import feature_dim

        self.backbone = detector.backbone
        self.pool = detector.roi_heads.box_roi_pool
        self.head = detector.roi_heads.box_head
        self.dim = feature_dim(detector)
        t = detector.transform
        self.register_buffer("mean", torch.tensor(t.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(t.image_std).view(1, 3, 1, 1), persistent=False)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB in 0..1 → the detector's input normalization."""
        return (pixels - self.mean) / self.std

    def forward(self, images: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        features = self.backbone(images)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        return self.head(self.pool(features, boxes, sizes))

    def train(self, mode: bool = True) -> RoIFeatureExtractor:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


def build_roi_extractor(
    weights: str | None = None, fpn_channels: int = 64, dim: int = 256
) -> RoIFeatureExtractor:
    """A loaded detector's RoI path (`weights`: a file written by `save_detector`, or
    `torchvision:NAME`), else a fresh `tiny_fpn` with `fpn_channels` and `dim`-wide features."""
    from vlforge.featurize.detector import (
        BACKGROUND,
        DetectorConfig,
        build_detector,
        load_detector,
    )

    if weights:
        detector, _ = load_detector(weights)
        return RoIFeatureExtractor(detector)
    config = DetectorConfig(fpn_channels=fpn_channels, representation_size=dim)
    detector = build_detector([BACKGROUND, "object"], config)
    # He initialization (torchvision's ResNets'): with frozen BatchNorm statistics the stack does
    # not renormalize, and PyTorch's default conv init shrinks activations layer by layer.
    for m in detector.backbone.body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return RoIFeatureExtractor(detector)
