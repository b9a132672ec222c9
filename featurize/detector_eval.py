"""Detector mAP at IoU 0.5 (VOC all-point AP per class, averaged over classes with truth).

torchmetrics and pycocotools are not dependencies, and the metric is a page of numpy: greedy
matching of detections to truth in descending score order, each truth matched at most once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou


def average_precision(scores: np.ndarray, is_tp: np.ndarray, n_truth: int) -> float:
    """Area under the interpolated precision-recall curve (VOC 2010+ "all points")."""
    if n_truth == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_tp[order].astype(np.float64))
    fp = np.cumsum(~is_tp[order])
    recall = tp / n_truth
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def match_detections(
    det_boxes: np.ndarray, det_scores: np.ndarray, truth_boxes: np.ndarray, iou: float = 0.5
) -> np.ndarray:
    """True where a detection (of one class, in one image) matches a not-yet-matched truth box."""
    is_tp = np.zeros(len(det_boxes), bool)
    if len(det_boxes) == 0 or len(truth_boxes) == 0:
        return is_tp
    overlaps = box_iou(
        torch.as_tensor(det_boxes, dtype=torch.float32),
        torch.as_tensor(truth_boxes, dtype=torch.float32),
    ).numpy()
    taken = np.zeros(len(truth_boxes), bool)
    for d in np.argsort(-det_scores, kind="stable"):
        candidates = np.where(~taken & (overlaps[d] >= iou))[0]
        if len(candidates):
            best = candidates[np.argmax(overlaps[d, candidates])]
            taken[best] = True
            is_tp[d] = True
    return is_tp


def per_class_ap(
    detections: Sequence[dict], truth: Sequence[dict], num_classes: int, iou: float = 0.5
) -> dict[int, float]:
    """AP per foreground class (1..C-1) that has truth; detections/truth: dicts of numpy arrays."""
    result: dict[int, float] = {}
    for c in range(1, num_classes):
        scores, hits, n_truth = [], [], 0
        for det, gt in zip(detections, truth, strict=True):
            d = det["labels"] == c
            g = gt["labels"] == c
            n_truth += int(g.sum())
            scores.append(det["scores"][d])
            hits.append(match_detections(det["boxes"][d], det["scores"][d], gt["boxes"][g], iou))
        if n_truth:
            result[c] = average_precision(np.concatenate(scores), np.concatenate(hits), n_truth)
    return result


@torch.inference_mode()
def detect(
    model: FasterRCNN,
    images: Sequence[np.ndarray],
    batch_size: int = 8,
    score_thresh: float = 0.001,
) -> list[dict]:
    """Standard torchvision detections, with the low score threshold AP needs."""
    model.eval()
    heads = model.roi_heads
    saved = heads.score_thresh
    heads.score_thresh = score_thresh
    out: list[dict] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = [
                torch.from_numpy(np.array(a)).permute(2, 0, 1).float().div_(255.0)
                for a in images[start : start + batch_size]
            ]
            for det in model(chunk):
                out.append({k: v.numpy() for k, v in det.items()})
    finally:
        heads.score_thresh = saved
    return out


def map50(
    model: FasterRCNN, images: Sequence[np.ndarray], truth: Sequence[dict], batch_size: int = 8
) -> float:
    """Mean AP at IoU 0.5 over classes present in `truth` (dicts with `boxes` K×4, `labels` K)."""
    num_classes = model.roi_heads.box_predictor.cls_score.out_features
    truth_np = [
        {
            "boxes": np.asarray(t["boxes"], np.float32).reshape(-1, 4),
            "labels": np.asarray(t["labels"]),
        }
        for t in truth
    ]
    aps = per_class_ap(detect(model, images, batch_size), truth_np, num_classes)
    return float(np.mean(list(aps.values()))) if aps else float("nan")


@torch.inference_mode()
def attribute_accuracy(
    model: FasterRCNN,
    images: Sequence[np.ndarray],
    truth: Sequence[dict],
    columns: Sequence[int],
    batch_size: int = 8,
) -> float:
    """Share of true objects whose best attribute among `columns` (one group, e.g. the colours)
    is their true one, reading the attribute head at the true box with the true class — the
    head's own accuracy, apart from detection misses. `truth` dicts carry `boxes`, `labels` and
    `attributes` (K×A multi-hot)."""
    model.eval()
    heads = model.roi_heads
    cols = torch.as_tensor(list(columns))
    hits = total = 0
    for start in range(0, len(images), batch_size):
        chunk = [
            torch.from_numpy(np.array(a)).permute(2, 0, 1).float().div_(255.0)
            for a in images[start : start + batch_size]
        ]
        gts = truth[start : start + batch_size]
        image_list, _ = model.transform(chunk)
        features = model.backbone(image_list.tensors)
        boxes = [
            resize_boxes(
                torch.as_tensor(np.asarray(t["boxes"], np.float32)).reshape(-1, 4),
                tuple(img.shape[-2:]),
                tuple(size),
            )
            for t, img, size in zip(gts, chunk, image_list.image_sizes, strict=True)
        ]
        pooled = heads.box_head(heads.box_roi_pool(features, boxes, image_list.image_sizes))
        labels = torch.cat([torch.as_tensor(np.asarray(t["labels"])) for t in gts]).long()
        wanted = torch.cat([torch.as_tensor(np.asarray(t["attributes"])) for t in gts])[:, cols]
        logits = heads.attribute_head(pooled, labels)[:, cols]
        known = wanted.sum(dim=1) > 0  # objects with an attribute of this group
        hits += int((wanted[known].argmax(dim=1) == logits[known].argmax(dim=1)).sum())
        total += int(known.sum())
    return hits / total if total else float("nan")
