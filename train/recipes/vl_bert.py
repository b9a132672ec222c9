"""VL-BERT (Su et al. 2020): one transformer over [CLS] text [SEP] [IMG]×R [END], every element's
embedding = token + visual feature + segment + position.

- Visual feature embedding, added to EVERY element: FC(RoI appearance ⊕ sinusoidal box geometry)
  from the recipe's own Fast R-CNN (train/blocks/roi_features.py, trained jointly, optionally
  loaded from `detector_weights`: the .pt + sidecar `vlforge featurize` uses). Text elements and
  [END] get the whole-image feature (RoI pooling over the full-image box), [IMG] elements their
  RoI's. Precomputed `feats.npy` are not used: the detector must see the masking.
- Segments: A = 0 (caption), B = 1 (a second sentence, from the tokenizer's pair ids), C = 2 (image).
- Positions: text 0..n-1, every [IMG] the same position n, [END] n + 1.
- MLM with visual clues, and masked RoI classification with linguistic clues: the pixels of the
  masked RoIs are zeroed (in the detector's normalized input, i.e. set to its mean colour) BEFORE
  the detector runs, so neither the RoI's nor the whole-image feature shows them. Label of a masked
  RoI: the detector's top object class from the sample's `cls_prob.npy`, `1 + argmax(cls_prob[1:])`
  (background column 0 excluded; ids in the full column space; losses/mrc.py). No ITM.
- Text-only rows (VL-BERT mixes a text-only corpus in): the loader draws `text_only_draw` ~ U(0, 1)
  per row from the batch RNG (`batch_hook`), and a row is text-only in training when it is below
  `text_only_ratio`: no [IMG]/[END] elements, a learned "no image" vector as the visual feature.

Retrieval in `vlforge eval`: VL-BERT has no matching head (the paper dropped ITM), so
`encode_text`/`encode_image` mean-pool the shared encoder over one modality. Nothing trains them
to agree, so expect chance-level recall; MLM accuracy is the figure to watch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlforge.train.blocks import (
    TextEmbeddings,
    attention_mask,
    build_roi_extractor,
)
from vlforge.train.collate import CLIP_MEAN, CLIP_STD, BatchContext
from vlforge.train.losses import (
    RegionClassifier,
    masked_select,
    mlm_loss,
    mrc_loss,
)
from vlforge.train.recipes.base import (
    SMALL_INIT_STD,
    Recipe,
    RegionTextConfig,
    init_weights,
    mlm_head,
    require,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe

IMAGE_SEGMENT = 2  # segment C


@dataclass
class VlBertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "mrc": 1.0})
    task_mode: str = "sum"
    type_vocab: int = 3
    image_size: int = 256  # the featurize detector's input size
    detector_weights: str | None = None  # a `save_detector` file (or torchvision:NAME)
    detector_fpn: int = 64  # fresh detector only
    detector_dim: int = 256  # fresh detector only: RoI feature width
    geom_dim: int = 64  # sinusoidal box embedding width (a multiple of 8)
    # VL-BERT's batches were half Conceptual Captions, half BooksCorpus + Wikipedia; captions
    # with their image hidden stand in for the text-only corpus.
    text_only_ratio: float = 0.5


def box_sinusoid(boxes: torch.Tensor, dim: int, wave_length: float = 1000.0) -> torch.Tensor:
    """…×4 normalized xyxy → …×dim: sin/cos of each coordinate at dim/8 wavelengths (VL-BERT's
    visual geometry embedding, from Relation Networks)."""
    n = dim // 8
    freq = wave_length ** (torch.arange(n, device=boxes.device, dtype=boxes.dtype) / n)
    angle = boxes.unsqueeze(-1) * 100.0 / freq  # …×4×n
    return torch.cat([angle.sin(), angle.cos()], -1).flatten(-2)


def zero_boxes(images: torch.Tensor, boxes: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """images B×3×H×W with the pixels whose centres fall in a chosen box (boxes B×R×4 in pixels,
    chosen B×R bool) set to 0."""
    h, w = images.shape[-2:]
    ys = torch.arange(h, device=images.device, dtype=boxes.dtype) + 0.5
    xs = torch.arange(w, device=images.device, dtype=boxes.dtype) + 0.5
    x1, y1, x2, y2 = boxes.unbind(-1)
    in_y = (ys >= y1[..., None]) & (ys < y2[..., None])  # B×R×H
    in_x = (xs >= x1[..., None]) & (xs < x2[..., None])  # B×R×W
    inside = (in_y.unsqueeze(-1) & in_x.unsqueeze(-2) & chosen[..., None, None]).any(1)
    return images * (~inside).unsqueeze(1).to(images.dtype)


def crop_boxes(boxes: np.ndarray, width: int, height: int, size: int) -> np.ndarray:
    """Pixel boxes of a width×height image → pixels of its `image_to_tensor` view (short side
    resized to `size`, centre crop size×size; torchvision's rounding), clipped to the crop."""
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    scale = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    shift = np.array([left, top] * 2, dtype=np.float32)
    return np.clip(boxes.astype(np.float32) * scale - shift, 0.0, float(size))


def vl_bert_batch(batch: dict[str, Any], ctx: BatchContext) -> None:
    """Loader side: RoI boxes in the pixels of `pixel_values`, and each row's text-only draw."""
    spec, size = ctx.spec, ctx.spec.image_size
    rows = []
    for s in ctx.visual_samples:
        width, height = s["jpg"].size
        rows.append(crop_boxes(s["boxes.npy"][: spec.max_regions], width, height, size))
    out = np.zeros((len(rows), max(len(r) for r in rows), 4), dtype=np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    batch["roi_boxes_px"] = torch.from_numpy(out)
    batch["text_only_draw"] = torch.as_tensor(ctx.rng.random(len(rows)), dtype=torch.float32)


@register_recipe("vl_bert")
class VlBert(Recipe):
    name = "vl_bert"
    inputs = frozenset({"text", "regions", "pixels"})
    supported_tasks = frozenset({"mlm", "mrc"})
    sizes: ClassVar[dict[str, VlBertConfig]] = {  # type: ignore[assignment]
        "small": VlBertConfig(
            hidden=64,
            layers=2,
            heads=4,
            mlp=128,
            max_len=128,
            num_region_classes=32,
            dropout=0.0,
            attn_dropout=0.0,
            init_std=SMALL_INIT_STD,
            image_size=64,
            detector_fpn=16,
            detector_dim=32,
            geom_dim=32,
        ),  # fmt: skip
        "base": VlBertConfig(),
    }
    batch_hook = staticmethod(vl_bert_batch)

    def __init__(self, cfg: VlBertConfig):
        super().__init__(cfg)
        self.cfg: VlBertConfig = cfg
        if cfg.geom_dim % 8 or cfg.geom_dim <= 0:
            raise ValueError("geom_dim must be a positive multiple of 8")
        if not 0.0 <= cfg.text_only_ratio <= 1.0:
            raise ValueError("text_only_ratio must be between 0 and 1")
        if cfg.type_vocab <= IMAGE_SEGMENT:
            raise ValueError("vl_bert needs type_vocab ≥ 3 (segments A, B, C)")
        self.image_size = cfg.image_size
        h = cfg.hidden
        # +2 positions: the [IMG] elements' shared one and [END]'s, after the longest text.
        self.text = TextEmbeddings(
            cfg.vocab_size, h, cfg.max_len + 2, cfg.type_vocab, eps=cfg.eps, dropout=cfg.dropout,
            pad_id=cfg.pad_id,
        )  # fmt: skip
        self.img_token = nn.Parameter(torch.zeros(h))
        self.end_token = nn.Parameter(torch.zeros(h))
        self.no_image = nn.Parameter(torch.zeros(h))
        self.detector = build_roi_extractor(
            cfg.detector_weights, cfg.detector_fpn, cfg.detector_dim
        )
        self.visual = nn.Linear(self.detector.dim + cfg.geom_dim, h)
        self.encoder = transformer_encoder(cfg)
        self.mlm = mlm_head(cfg, self.text)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, cfg.eps)

    def reset_parameters(self) -> None:
        """BERT init everywhere but the detector, which keeps its loaded (or He) weights."""
        std = self.cfg.init_std
        for child in self.children():
            if child is not self.detector:
                init_weights(child, std)
        for p in (self.img_token, self.end_token, self.no_image):
            nn.init.normal_(p, std=std)

    # -- the visual feature embedding ----------------------------------------------------------

    def _roi_boxes_px(self, batch: dict[str, Any]) -> torch.Tensor:
        if "roi_boxes_px" in batch:
            return batch["roi_boxes_px"]
        # A hand-made batch: its image is taken as the whole picture the boxes were drawn on.
        h, w = batch["pixel_values"].shape[-2:]
        return batch["region_boxes"] * batch["region_boxes"].new_tensor([w, h, w, h])

    def visual_features(self, batch: dict[str, Any], with_image: torch.Tensor) -> torch.Tensor:
        """B×(1+R)×H visual feature embeddings: position 0 the whole image, then the RoIs. Rows
        without an image get the "no image" vector at 0 (and nothing the encoder attends to)."""
        require(batch, ["pixel_values", "region_boxes"], "vl_bert")
        px, norm_boxes = batch["pixel_values"], batch["region_boxes"]
        b, r = norm_boxes.shape[:2]
        h, w = px.shape[-2:]
        boxes = self._roi_boxes_px(batch)
        masked = batch.get("mrm_mask", torch.zeros(b, r, dtype=torch.bool, device=px.device))
        mean = px.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = px.new_tensor(CLIP_STD).view(1, 3, 1, 1)
        images = zero_boxes(self.detector.normalize(px * std + mean), boxes, masked.bool())
        appearance = px.new_zeros(b, 1 + r, self.detector.dim)
        rows = with_image.nonzero().flatten()
        if len(rows):
            whole = boxes.new_tensor([0.0, 0.0, float(w), float(h)]).expand(len(rows), 1, 4)
            per_row = torch.cat([whole, boxes[rows]], 1)
            feats = self.detector(images[rows], list(per_row.unbind(0)))
            appearance = appearance.index_put((rows,), feats.view(len(rows), 1 + r, -1))
        unit = norm_boxes.new_tensor([0.0, 0.0, 1.0, 1.0]).expand(b, 1, 4)
        geometry = box_sinusoid(torch.cat([unit, norm_boxes], 1), self.cfg.geom_dim)
        vis = self.visual(torch.cat([appearance, geometry], -1))
        no_image = (~with_image).view(b, 1) & (torch.arange(1 + r, device=px.device) == 0)
        return torch.where(no_image.unsqueeze(-1), self.no_image.to(vis.dtype), vis)

    def text_only_rows(self, batch: dict[str, Any], b: int, device: torch.device) -> torch.Tensor:
        draw = batch.get("text_only_draw")
        if draw is None or not self.training:
            return torch.zeros(b, dtype=torch.bool, device=device)
        return draw.to(device) < self.cfg.text_only_ratio

    # -- the sequence -------------------------------------------------------------------------

    def embed(
        self, batch: dict[str, Any], text_only: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(embeddings B×(L+R+1)×H, key mask, L, R) of [text; [IMG]×R; [END]]."""
        require(batch, ["input_ids"], "vl_bert")
        ids = batch["input_ids"]
        b, n = ids.shape
        t_keys = batch.get("attention_mask", torch.ones_like(ids)).long()
        if text_only is None:
            text_only = self.text_only_rows(batch, b, ids.device)
        emb = self.text
        types = batch.get("token_type_ids")
        types = torch.zeros_like(ids) if types is None else types
        pos = torch.arange(n, device=ids.device).expand(b, n)
        if "region_boxes" in batch and not bool(text_only.all()):
            vis = self.visual_features(batch, ~text_only)
            r = vis.shape[1] - 1
            r_keys = batch.get("region_mask", torch.ones(b, r, device=ids.device)).long()
        else:  # text only (e.g. a prompt batch): the "no image" feature, no visual elements
            vis = self.no_image.view(1, 1, -1).expand(b, 1, -1)
            r, r_keys = 0, t_keys.new_zeros(b, 0)
        whole = vis[:, :1]
        text = emb.word(ids) + emb.position(pos) + emb.token_type(types) + whole
        # Every [IMG] element at the position after the text, [END] one further.
        img_pos = t_keys.sum(1, keepdim=True)
        seg_c = emb.token_type(torch.full_like(img_pos, IMAGE_SEGMENT))
        regions = self.img_token + vis[:, 1:] + emb.position(img_pos) + seg_c
        end = self.end_token + whole + emb.position(img_pos + 1) + seg_c
        x = emb.drop(emb.norm(torch.cat([text, regions, end], 1)))
        has_image = (~text_only).long().unsqueeze(1)
        keys = torch.cat([t_keys, r_keys * has_image, has_image], 1)
        return x, keys, n, r

    def encode(
        self, batch: dict[str, Any], text_only: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(hidden B×(L+R+1)×H, key mask, L, R)."""
        x, keys, n, r = self.embed(batch, text_only)
        return self.encoder(x, attention_mask(keys)), keys, n, r

    # -- inference entry points (eval) -------------------------------------------------------

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, n, _ = self.encode(batch)
        return self.mlm(hidden[:, :n])

    def encode_text(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean text state of a text-only pass (see the module docstring)."""
        ids = batch["input_ids"]
        text = {
            k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch
        }
        only = torch.ones(len(ids), dtype=torch.bool, device=ids.device)
        hidden, keys, n, _ = self.encode(text, only)
        m = keys[:, :n].unsqueeze(-1).to(hidden.dtype)
        return (hidden[:, :n] * m).sum(1) / m.sum(1).clamp(min=1.0)

    def encode_image(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean state of the [IMG]/[END] elements, with the text hidden from them."""
        ids = batch["input_ids"]
        x, keys, n, _ = self.embed(
            batch, torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        )
        keys = keys.clone()
        keys[:, :n] = 0
        hidden = self.encoder(x, attention_mask(keys))
        m = keys[:, n:].unsqueeze(-1).to(hidden.dtype)
        return (hidden[:, n:] * m).sum(1) / m.sum(1).clamp(min=1.0)

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        ids = batch["input_ids"]
        text_only = self.text_only_rows(batch, ids.shape[0], ids.device)
        hidden, _, n, r = self.encode(batch, text_only)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(hidden[:, :n], batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        if "mrc" in tasks:
            require(batch, ["mrm_mask", "region_cls_prob"], "masked RoI classification")
            if r == 0:  # every row text-only: nothing to classify (0, still in the graph)
                out["mrc"] = self.mrc(hidden[:, :0]).sum() * 0.0
            else:
                sel = batch["mrm_mask"].bool() & ~text_only.unsqueeze(1)
                logits = self.mrc(hidden[:, n : n + r][sel])
                out["mrc"] = mrc_loss(logits, batch["region_cls_prob"][sel])
        return out


__all__ = ["VlBert", "VlBertConfig", "box_sinusoid", "crop_boxes", "vl_bert_batch", "zero_boxes"]
