"""Bottom-up-attention region features from a torchvision Faster R-CNN, a batch at a time.

torchvision has no per-box feature API, so extraction walks the model by hand:
transform → backbone → RPN proposals → box head → per-class boxes and scores → per-class NMS
(IoU 0.3) → keep boxes whose best foreground score ≥ 0.2, clamped to 10..100 → pool the kept boxes
again (`box_roi_pool` + `box_head`, boxes in the transformed image's coordinates) → features and a
class distribution (and attribute distribution, when the detector has an attribute head) that
describe exactly those boxes.

`cls_prob` keeps the background column at index 0 (torchvision's and bottom-up-attention's layout):
the best foreground class of row i is `1 + argmax(cls_prob[i, 1:])`, and `class_names[0]` is the
background. Every sample written says so in its metadata (`cls_prob_background_column: 0`).
"""

from __future__ import annotations

import io
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms, clip_boxes_to_image

from vlforge.featurize.detector import feature_dim

BACKGROUND_COLUMN = 0
MAX_PIXELS = 50_000_000  # decode guard: a region extractor has no business with gigapixel images


@dataclass(frozen=True)
class ExtractionConfig:
    """The bottom-up-attention defaults (Anderson et al. 2018, generate_tsv.py)."""

    nms_iou: float = 0.3
    score_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100


@dataclass
class RegionSet:
    """Regions of one image; every array has N rows (N = 0 with a reason when nothing was run)."""

    boxes: np.ndarray  # float32 N×4 xyxy, pixels of the input image
    feats: np.ndarray  # float16 N×D
    cls_prob: np.ndarray  # float16 N×C, background at column 0
    width: int
    height: int
    reason: str = ""  # why the set is empty; "" when regions were extracted
    attr_prob: np.ndarray | None = None  # float16 N×A when the detector has an attribute head
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))

    @classmethod
    def empty(
        cls, reason: str, feat_dim: int, num_classes: int, width: int = 0, height: int = 0
    ) -> RegionSet:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            feats=np.zeros((0, feat_dim), np.float16),
            cls_prob=np.zeros((0, num_classes), np.float16),
            width=width,
            height=height,
            reason=reason,
        )

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


def decode_image(data: bytes | None, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray | None, str]:
    """JPEG/PNG/... bytes → (H×W×3 uint8 RGB, "") or (None, reason); never raises."""
    if data is None:
        return None, "missing_image"
    if len(data) == 0:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    return None, f"too_large: {width}x{height} over {max_pixels} px"
                if width == 0 or height == 0:
                    return None, "empty_image"
                array = np.array(img.convert("RGB"), dtype=np.uint8)  # a writable copy
    except Exception as err:  # PIL raises many types for broken files; all mean "no regions"
        return None, f"undecodable: {type(err).__name__}: {err}"[:200]
    return array, ""


def select_regions(
    class_boxes: torch.Tensor, scores: torch.Tensor, config: ExtractionConfig = ExtractionConfig()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pick regions among P proposals with C classes (background at column 0).

    class_boxes: P×C×4 per-class boxes; scores: P×C softmax. A proposal's confidence is its best
    foreground score among the classes in which it survives NMS; proposals are ranked by it.
    Returns (proposal indices, their boxes for the winning class, their confidences), N rows with
    N = clamp(#(confidence ≥ threshold), min_boxes, max_boxes), and never more than P.
    """
    num_props, num_classes = scores.shape
    if num_props == 0 or num_classes < 2:
        return (torch.zeros(0, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0))
    fg = num_classes - 1
    flat_boxes = class_boxes[:, 1:].reshape(-1, 4)
    flat_scores = scores[:, 1:].reshape(-1)
    labels = torch.arange(fg).repeat(num_props)
    keep = batched_nms(flat_boxes, flat_scores, labels, config.nms_iou)  # NMS per class
    survived = torch.zeros(num_props * fg, dtype=scores.dtype)
    survived[keep] = flat_scores[keep]
    conf, best = survived.view(num_props, fg).max(dim=1)
    # A proposal that survived nowhere still needs a box if the 10-box floor reaches it.
    never = conf == 0
    best[never] = scores[never, 1:].argmax(dim=1)
    order = torch.argsort(conf, descending=True, stable=True)  # stable: ties keep proposal order
    passing = int((conf >= config.score_thresh).sum())
    n = min(max(passing, config.min_boxes), config.max_boxes, num_props)
    index = order[:n]
    boxes = class_boxes[index, best[index] + 1]
    return index, boxes, conf[index]


class RegionExtractor:
    """One detector, one config; `extract` runs a list of images through a single forward."""

    def __init__(
        self,
        model: FasterRCNN,
        class_names: Sequence[str],
        config: ExtractionConfig = ExtractionConfig(),
    ):
        self.model = model.eval()
        self.class_names = list(class_names)
        self.config = config
        self.feat_dim = feature_dim(model)
        self.num_classes = len(self.class_names)

    def empty(self, reason: str, width: int = 0, height: int = 0) -> RegionSet:
        return RegionSet.empty(reason, self.feat_dim, self.num_classes, width, height)

    @torch.inference_mode()
    def extract(
        self, images: Sequence[np.ndarray | None], reasons: Sequence[str] | None = None
    ) -> list[RegionSet]:
        """H×W×3 uint8 RGB arrays (None for an image that failed to decode, with its reason)."""
        reasons = list(reasons) if reasons is not None else [""] * len(images)
        results: list[RegionSet | None] = [None] * len(images)
        batch: list[int] = []
        for i, image in enumerate(images):
            if image is None:
                results[i] = self.empty(reasons[i] or "missing_image")
            elif (
                image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0
            ):
                results[i] = self.empty(f"bad_shape: {tuple(image.shape)}")
            else:
                batch.append(i)
        if batch:
            for i, regions in zip(batch, self._extract([images[i] for i in batch]), strict=True):
                results[i] = regions
        return results  # type: ignore[return-value]

    def _extract(self, arrays: list[np.ndarray]) -> list[RegionSet]:
        model = self.model
        # The model's device (a worker's GPU when featurize chose one); results come back to CPU.
        device = next(model.parameters()).device
        tensors = [
            torch.from_numpy(a).to(device).permute(2, 0, 1).float().div_(255.0) for a in arrays
        ]
        originals = [(int(a.shape[0]), int(a.shape[1])) for a in arrays]
        image_list, _ = model.transform(tensors)
        sizes = image_list.image_sizes
        features = model.backbone(image_list.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(image_list, features)
        heads = model.roi_heads
        logits, deltas = heads.box_predictor(
            heads.box_head(heads.box_roi_pool(features, proposals, sizes))
        )
        class_boxes = heads.box_coder.decode(deltas, proposals)
        scores = F.softmax(logits, dim=-1)
        counts = [len(p) for p in proposals]
        chosen: list[torch.Tensor] = []
        confs: list[torch.Tensor] = []
        for boxes_i, scores_i, size in zip(
            class_boxes.split(counts), scores.split(counts), sizes, strict=True
        ):
            _, boxes, conf = select_regions(
                clip_boxes_to_image(boxes_i, size), scores_i, self.config
            )
            chosen.append(boxes)
            confs.append(conf)
        # Second pass: features and class distribution of the final boxes themselves, so that
        # feats and cls_prob (the MRC-KL target) describe the same region.
        pooled = heads.box_head(heads.box_roi_pool(features, chosen, sizes))
        cls_prob = F.softmax(heads.box_predictor(pooled)[0], dim=-1)
        attribute_head = getattr(heads, "attribute_head", None)
        attr_prob = (
            attribute_head.probabilities(pooled, cls_prob) if attribute_head is not None else None
        )
        out: list[RegionSet] = []
        start = 0
        for boxes, conf, size, (h, w) in zip(chosen, confs, sizes, originals, strict=True):
            n = len(boxes)
            if n == 0:
                out.append(self.empty("no_proposals", w, h))
                continue
            in_pixels = resize_boxes(boxes, tuple(size), (h, w))
            in_pixels = clip_boxes_to_image(in_pixels, (h, w))
            prob = cls_prob[start : start + n].double()
            prob = prob / prob.sum(dim=1, keepdim=True)
            out.append(
                RegionSet(
                    boxes=in_pixels.cpu().numpy().astype(np.float32),
                    feats=pooled[start : start + n].cpu().numpy().astype(np.float16),
                    cls_prob=prob.cpu().numpy().astype(np.float16),
                    width=w,
                    height=h,
                    scores=conf.cpu().numpy().astype(np.float32),
                    attr_prob=None
                    if attr_prob is None
                    else attr_prob[start : start + n].cpu().numpy().astype(np.float16),
                )
            )
            start += n
        return out


def region_metadata(regions: RegionSet, class_names: Sequence[str]) -> dict:
    """What a sample's `json` records about its regions (the convention travels with the data)."""
    meta = {
        "count": len(regions),
        "image_width": regions.width,
        "image_height": regions.height,
        "box_format": "xyxy_pixels",
        "feat_dim": int(regions.feats.shape[1]),
        "cls_prob_background_column": BACKGROUND_COLUMN,
        "class_names": list(class_names),
    }
    if regions.reason:
        meta["reason"] = regions.reason
    return meta
