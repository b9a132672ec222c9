"""Region extraction through detectron2 (e.g. the Visual Genome bottom-up-attention models).

Used only when `import detectron2` works; detectron2 is not on PyPI (see pyproject's
`detectron2` extra). The spec is a small JSON file passed as `--weights`:

    {"format": "vlforge-detectron2/1", "config_file": "faster_rcnn_R_101_C4_caffe.yaml",
     "weights": "model.pth", "class_names": ["__background__", "yolk", ...]}

The same bottom-up rule as regions.py applies (per-class NMS 0.3, score ≥ 0.2, 10..100 boxes,
features pooled again on the kept boxes). detectron2 puts the background in the LAST softmax
column; this adapter moves it to column 0 so every sample follows one convention. Weights are
read with `torch.load(weights_only=True)`: a pickled `.pkl` checkpoint is refused (convert it to
a `.pth` state_dict once, on a machine and from a source you trust).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlforge.errors import UserError
from vlforge.featurize.regions import ExtractionConfig, RegionSet, select_regions
from vlforge.pipeline import storage

FORMAT = "vlforge-detectron2/1"


def available() -> bool:
    try:
        import detectron2  # noqa: F401
    except ImportError:
        return False
    return True


def is_spec(path: str) -> bool:
    """True when `path` is a detectron2 spec (JSON with our format tag), not torchvision weights."""
    if not path.endswith(".json") or not storage.exists(path):
        return False
    try:
        return storage.read_json(path).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


class Detectron2Extractor:
    """Same interface as regions.RegionExtractor: `extract(images, reasons) -> list[RegionSet]`."""

    def __init__(self, spec_path: str, config: ExtractionConfig = ExtractionConfig()):
        if not available():
            raise UserError(f"{spec_path} needs detectron2, which is not installed")
        from detectron2.config import get_cfg
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model

        spec = storage.read_json(spec_path)
        if str(spec["weights"]).endswith(".pkl"):
            raise UserError("detectron2 .pkl checkpoints are pickles; convert to a .pth state_dict")
        cfg = get_cfg()
        cfg.merge_from_file(spec["config_file"])
        cfg.MODEL.DEVICE = spec.get("device", "cpu")
        self.model = build_model(cfg).eval()
        state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("model", state), strict=False)
        self.resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        self.bgr = cfg.INPUT.FORMAT == "BGR"
        self.class_names = list(spec["class_names"])
        self.attribute_names = spec.get("attribute_names")
        self.config = config
        self.meta = {"backbone": "detectron2", "weights": spec["weights"], **spec}

    def empty(self, reason: str) -> RegionSet:
        return RegionSet.empty(reason, self.feat_dim(), len(self.class_names))

    def feat_dim(self) -> int:
        heads = self.model.roi_heads
        if hasattr(heads, "box_head"):
            return int(heads.box_head.output_shape.channels)
        return int(heads.res5[-1].conv3.out_channels)  # Res5ROIHeads (C4 bottom-up models): 2048

    def _pool(self, features: dict, boxes: list) -> torch.Tensor:
        heads = self.model.roi_heads
        maps = [features[f] for f in heads.in_features]
        if hasattr(heads, "box_pooler"):  # StandardROIHeads (FPN)
            return heads.box_head(heads.box_pooler(maps, boxes))
        return heads._shared_roi_transform(maps, boxes).mean(dim=[2, 3])  # Res5ROIHeads

    @torch.inference_mode()
    def extract(
        self, images: Sequence[np.ndarray | None], reasons: Sequence[str] | None = None
    ) -> list[RegionSet]:
        from detectron2.structures import Boxes

        reasons = list(reasons) if reasons is not None else [""] * len(images)
        results: list[RegionSet | None] = [
            self.empty(reasons[i] or "missing_image") if image is None else None
            for i, image in enumerate(images)
        ]
        todo = [i for i, r in enumerate(results) if r is None]
        if not todo:
            return results  # type: ignore[return-value]
        inputs = []
        for i in todo:
            image = images[i]
            resized = self.resize.get_transform(image).apply_image(image)
            if self.bgr:
                resized = resized[:, :, ::-1]
            tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
            inputs.append({"image": tensor, "height": image.shape[0], "width": image.shape[1]})
        model = self.model
        batched = model.preprocess_image(inputs)
        features = model.backbone(batched.tensor)
        proposals, _ = model.proposal_generator(batched, features, None)
        predictor = model.roi_heads.box_predictor
        pooled = self._pool(features, [p.proposal_boxes for p in proposals])
        predictions = predictor(pooled)
        probs = predictor.predict_probs(predictions, proposals)
        class_boxes = predictor.predict_boxes(predictions, proposals)
        chosen = []
        for p, prob, boxes, size in zip(
            proposals, probs, class_boxes, batched.image_sizes, strict=True
        ):
            k = prob.shape[1] - 1
            per_class = boxes.view(len(p), -1, 4)[:, :k]
            # Background last → first, with the proposal box standing in as its "class box".
            per_class = torch.cat([p.proposal_boxes.tensor[:, None], per_class], 1)
            per_class[..., 0::2] = per_class[..., 0::2].clamp(0, size[1])
            per_class[..., 1::2] = per_class[..., 1::2].clamp(0, size[0])
            scores = torch.cat([prob[:, k:], prob[:, :k]], 1)
            chosen.append(select_regions(per_class, scores, self.config)[1])
        feats = self._pool(features, [Boxes(b) for b in chosen])
        logits = predictor(feats)[0]
        prob = F.softmax(logits, dim=-1)
        prob = torch.cat([prob[:, -1:], prob[:, :-1]], 1).double()
        start = 0
        for i, boxes, size in zip(todo, chosen, batched.image_sizes, strict=True):
            n = len(boxes)
            h, w = images[i].shape[:2]
            scale = torch.tensor([w / size[1], h / size[0]] * 2)
            rows = prob[start : start + n]
            results[i] = RegionSet(
                boxes=(boxes * scale).numpy().astype(np.float32),
                feats=feats[start : start + n].numpy().astype(np.float16),
                cls_prob=(rows / rows.sum(1, keepdim=True)).numpy().astype(np.float16),
                width=w,
                height=h,
            )
            start += n
        return results  # type: ignore[return-value]
