"""Faster R-CNN detectors by backbone name, and weights files with a JSON sidecar (never pickle).

Two kinds of backbone:
- published torchvision detectors (`resnet50_fpn`, `mobilenet_v3_large_fpn`) whose COCO weights
  come from torchvision's weight enums when the machine can download them
  (`load_detector("torchvision:resnet50_fpn")`);
- `tiny_fpn`, a small from-scratch convnet with an FPN, sized for the demo world's 256 px images,
  that trains on two CPU cores in minutes (see train_detector.py).

A weights file is a plain `state_dict` read with `torch.load(weights_only=True)`; everything needed
to rebuild the module (backbone, class names, config) lives in `<weights>.json` beside it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from vlforge.errors import UserError
from vlforge.featurize.attribute_head import NO_ATTRIBUTE, attach_attribute_head
from vlforge.pipeline import storage

BACKGROUND = "__background__"  # class 0, as in torchvision's COCO category list
FORMAT = "vlforge-detector/1"
PUBLISHED_PREFIX = "torchvision:"

# Published torchvision detectors: builder and weights enum names, resolved lazily so that a
# missing download only matters to whoever asks for it.
_PUBLISHED = {
    "resnet50_fpn": ("fasterrcnn_resnet50_fpn", "FasterRCNN_ResNet50_FPN_Weights"),
    "resnet50_fpn_v2": ("fasterrcnn_resnet50_fpn_v2", "FasterRCNN_ResNet50_FPN_V2_Weights"),
    "mobilenet_v3_large_fpn": (
        "fasterrcnn_mobilenet_v3_large_fpn",
        "FasterRCNN_MobileNet_V3_Large_FPN_Weights",
    ),
}
BACKBONES = ("tiny_fpn", *_PUBLISHED)


@dataclass(frozen=True)
class DetectorConfig:
    """Everything besides the class list that shapes the module; stored in the sidecar JSON."""

    backbone: str = "tiny_fpn"
    min_size: int = 256  # the corpus resizes to 256 px (img2dataset default), so no rescale
    max_size: int = 256
    fpn_channels: int = 64
    representation_size: int = 256  # box head width = D of feats.npy
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # one per FPN level (strides 8..64)
    aspect_ratios: tuple[float, ...] = (1.0,)  # demo shapes are near square
    rpn_pre_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_train: int = 500
    rpn_pre_nms_top_n_test: int = 600
    rpn_post_nms_top_n_test: int = 300
    box_batch_size_per_image: int = 128
    attribute_hidden: int = 256  # width of the attribute head, when the detector has one
    attribute_loss_weight: float = 0.5  # bottom-up-attention's weight for the attribute loss
    # Share of the attribute loss's gradient that reaches the backbone (the box head always gets
    # all of it). Measured on the demo world, 400 steps, with the colour skip: 1.0 → mAP@0.5 0.63,
    # colour 1.00; 0.1 → 0.88, 0.99; 0.03 and 0 → colour still near chance at 225 steps.
    attribute_backbone_grad: float = 0.1
    colour_skip: bool = True  # tiny_fpn: average-pooled RGB concatenated to each level it returns

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DetectorConfig:
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        values.setdefault("colour_skip", False)  # weights written before the skip existed
        return cls(**values)

    @classmethod
    def published(cls, backbone: str) -> DetectorConfig:
        """torchvision's own defaults for its COCO detectors (800/1333 px, 1000 proposals)."""
        return cls(
            backbone=backbone,
            min_size=800,
            max_size=1333,
            fpn_channels=256,
            representation_size=1024,
            anchor_sizes=(),
            aspect_ratios=(),
            rpn_pre_nms_top_n_train=2000,
            rpn_post_nms_top_n_train=2000,
            rpn_pre_nms_top_n_test=1000,
            rpn_post_nms_top_n_test=1000,
            box_batch_size_per_image=512,
        )


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class TinyConvNet(nn.Module):
    """Five stride-2 stages (strides 2..32); children run in order, as IntermediateLayerGetter needs."""

    channels = (24, 32, 64, 96, 128)

    def __init__(self) -> None:
        super().__init__()
        c = self.channels
        self.stem = _conv(3, c[0], 2)
        self.layer1 = nn.Sequential(_conv(c[0], c[1], 2), _conv(c[1], c[1], 1))
        self.layer2 = nn.Sequential(_conv(c[1], c[2], 2), _conv(c[2], c[2], 1))
        self.layer3 = nn.Sequential(_conv(c[2], c[3], 2), _conv(c[3], c[3], 1))
        self.layer4 = nn.Sequential(_conv(c[3], c[4], 2), _conv(c[4], c[4], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.stem, self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
        return x


class TinyFPNBackbone(nn.Module):
    """TinyConvNet + FPN over strides 8, 16, 32 (+ max-pooled 64), optionally with a colour skip.

    The world's smallest shapes are ~19 px after the corpus resize, so a stride-4 level would cost
    most of the compute for little gain. The colour skip concatenates the image, average-pooled to
    each level's size, to that level before the FPN: a backbone this small, trained from scratch,
    otherwise spends its channels on shape and pools colour away, and an attribute head that
    forces colour back in costs detection accuracy (measured without the skip, 400 steps: mAP@0.5
    0.92 with the head's gradient kept out of the backbone, but colour accuracy 0.12; 0.51 with
    it let in, colour 1.00).
    State-dict keys match torchvision's BackboneWithFPN (`body.*`, `fpn.*`).
    """

    def __init__(self, fpn_channels: int, colour_skip: bool) -> None:
        super().__init__()
        self.body = TinyConvNet()
        self.colour_skip = colour_skip
        extra = 3 if colour_skip else 0
        self.fpn = FeaturePyramidNetwork(
            [c + extra for c in TinyConvNet.channels[2:]], fpn_channels, LastLevelMaxPool()
        )
        self.out_channels = fpn_channels

    def forward(self, image: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        body = self.body
        x = body.layer1(body.stem(image))
        levels: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, layer in (("0", body.layer2), ("1", body.layer3), ("2", body.layer4)):
            x = layer(x)
            if self.colour_skip:
                levels[name] = torch.cat([x, F.adaptive_avg_pool2d(image, x.shape[-2:])], dim=1)
            else:
                levels[name] = x
        return self.fpn(levels)


def _tiny_detector(num_classes: int, config: DetectorConfig) -> FasterRCNN:
    backbone = TinyFPNBackbone(config.fpn_channels, config.colour_skip)
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config.anchor_sizes),
        aspect_ratios=(tuple(config.aspect_ratios),) * len(config.anchor_sizes),
    )
    pool = MultiScaleRoIAlign(["0", "1", "2"], output_size=7, sampling_ratio=2)
    head = TwoMLPHead(config.fpn_channels * 7 * 7, config.representation_size)
    return FasterRCNN(
        backbone,
        min_size=config.min_size,
        max_size=config.max_size,
        rpn_anchor_generator=anchors,
        box_roi_pool=pool,
        box_head=head,
        box_predictor=FastRCNNPredictor(config.representation_size, num_classes),
        rpn_pre_nms_top_n_train=config.rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=config.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        box_batch_size_per_image=config.box_batch_size_per_image,
    )


def _torchvision_detection():
    import torchvision.models.detection as detection

    return detection


def build_detector(
    class_names: list[str],
    config: DetectorConfig | None = None,
    attribute_names: list[str] | None = None,
) -> FasterRCNN:
    """A randomly initialised detector for `class_names` (index 0 must be the background), with
    a bottom-up-attention attribute head when `attribute_names` is given (index 0 must be
    "no attribute")."""
    config = config or DetectorConfig()
    if not class_names or class_names[0] != BACKGROUND:
        raise ValueError(f"class_names[0] must be {BACKGROUND!r}")
    if attribute_names is not None and (not attribute_names or attribute_names[0] != NO_ATTRIBUTE):
        raise ValueError(f"attribute_names[0] must be {NO_ATTRIBUTE!r}")
    model = _build_plain(class_names, config)
    if attribute_names is not None:
        attach_attribute_head(
            model,
            len(class_names),
            len(attribute_names),
            feature_dim(model),
            config.attribute_hidden,
            config.attribute_loss_weight,
            config.attribute_backbone_grad,
        )
    return model


def _build_plain(class_names: list[str], config: DetectorConfig) -> FasterRCNN:
    if config.backbone == "tiny_fpn":
        return _tiny_detector(len(class_names), config)
    if config.backbone in _PUBLISHED:
        builder = getattr(_torchvision_detection(), _PUBLISHED[config.backbone][0])
        return builder(
            weights=None,
            weights_backbone=None,
            num_classes=len(class_names),
            min_size=config.min_size,
            max_size=config.max_size,
            rpn_pre_nms_top_n_test=config.rpn_pre_nms_top_n_test,
            rpn_post_nms_top_n_test=config.rpn_post_nms_top_n_test,
        )
    raise UserError(
        f"unknown detector backbone {config.backbone!r} (one of {', '.join(BACKBONES)})"
    )


def published_detector(backbone: str, weights: str = "DEFAULT") -> tuple[FasterRCNN, dict]:
    """torchvision's COCO detector with its published weights (downloads on first use)."""
    if backbone not in _PUBLISHED:
        raise UserError(f"no published weights for {backbone!r} (one of {', '.join(_PUBLISHED)})")
    detection = _torchvision_detection()
    builder_name, enum_name = _PUBLISHED[backbone]
    enum = getattr(detection, enum_name)
    try:
        chosen = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        options = ", ".join(["DEFAULT", *enum.__members__])
        raise UserError(f"unknown weights {weights!r} for {backbone} (one of {options})") from None
    try:
        model = getattr(detection, builder_name)(weights=chosen)
    except Exception as err:  # no network, proxy, disk full: one line, not a traceback
        raise UserError(
            f"cannot load published weights {chosen}: {type(err).__name__}: {err}"
        ) from None
    config = DetectorConfig.published(backbone)
    meta = {
        "format": FORMAT,
        "backbone": backbone,
        "weights": str(chosen),
        "class_names": list(chosen.meta["categories"]),
        "config": _config_json(config),
    }
    return model.eval(), meta


def _config_json(config: DetectorConfig) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config)))


def sidecar_path(path: str) -> str:
    return path + ".json"


def save_detector(
    model: nn.Module,
    path: str,
    class_names: list[str],
    config: DetectorConfig,
    attribute_names: list[str] | None = None,
    **extra: Any,
) -> dict:
    """Write the state_dict to `path` and the metadata to `path.json`, each atomically.

    The sidecar carries the weights' SHA-256, so a sidecar never silently describes other weights.
    """
    buffer = io.BytesIO()
    state = OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items())
    torch.save(state, buffer)
    data = buffer.getvalue()
    meta = {
        "format": FORMAT,
        "backbone": config.backbone,
        "class_names": list(class_names),
        **({"attribute_names": list(attribute_names)} if attribute_names else {}),
        "config": _config_json(config),
        "weights_sha256": hashlib.sha256(data).hexdigest(),
        **extra,
    }
    storage.write_bytes(path, data)
    storage.write_json(sidecar_path(path), meta)
    return meta


def load_detector(path: str) -> tuple[FasterRCNN, dict]:
    """(model in eval mode, metadata) from a weights file and its sidecar, or a published name.

    `torchvision:resnet50_fpn` (optionally `torchvision:resnet50_fpn:COCO_V1`) loads torchvision's
    published COCO weights; any other string is a path written by `save_detector`.
    """
    if path.startswith(PUBLISHED_PREFIX):
        backbone, _, weights = path[len(PUBLISHED_PREFIX) :].partition(":")
        return published_detector(backbone, weights or "DEFAULT")
    if not storage.exists(path):
        raise UserError(f"detector weights not found: {path}")
    if not storage.exists(sidecar_path(path)):
        raise UserError(
            f"detector metadata not found: {sidecar_path(path)} (written beside the weights)"
        )
    try:
        meta = storage.read_json(sidecar_path(path))
    except ValueError as err:
        raise UserError(f"unreadable detector metadata {sidecar_path(path)}: {err}") from None
    if meta.get("format") != FORMAT:
        raise UserError(f"{sidecar_path(path)} is not a vlforge detector sidecar ({FORMAT})")
    data = storage.read_bytes(path)
    if meta.get("weights_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        raise UserError(f"{path} does not match the checksum in {sidecar_path(path)}")
    config = DetectorConfig.from_dict(meta["config"])
    attributes = meta.get("attribute_names")
    model = build_detector(list(meta["class_names"]), config, attributes and list(attributes))
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as err:
        raise UserError(
            f"cannot load detector weights {path}: {type(err).__name__}: {err}"
        ) from None
    return model.eval(), meta


def feature_dim(model: FasterRCNN) -> int:
    """D of the pooled region features: the width of the box head's last layer."""
    head = model.roi_heads.box_head
    last = [m for m in head.modules() if isinstance(m, nn.Linear)]
    if last:
        return last[-1].out_features
    raise ValueError(f"cannot tell the feature width of box head {type(head).__name__}")


DEVICES = ("auto", "cpu", "cuda")


def choose_device(requested: str = "auto") -> torch.device:
    """The device a worker runs the detector on, decided when the worker sets up.

    `auto`: the worker's GPU when torch sees one, else the CPU (a fleet may mix both); `cpu` or
    `cuda` force one, and `cuda` on a worker without a GPU is an error rather than a slow CPU run.
    """
    if requested not in DEVICES:
        raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {requested!r}")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU on this worker")
    return torch.device(requested)
