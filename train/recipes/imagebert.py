"""ImageBERT (Qi et al. 2020): one transformer over [text; regions] with segment embeddings.

Regions: a projection of the feature + a projection of the 5-d location (x1, y1, x2, y2, area),
the image segment and one position shared by every region (`SegmentEmbeddings`). Pretraining sums,
on every batch, MLM, masked object classification (MOC: 15% of the regions, 90% zeroed / 10% kept
— the data side's region masking; label = the detector's top class), masked region feature
regression (MRFR, L2) and ITM. ITM negatives replace the image or the sentence, half of the random
negatives each (`masking_defaults`). The masked losses count on matched pairs only: the data side
labels only those, and this recipe drops any label a hand-made batch puts on an unmatched row (a
mismatched caption has no right answer to recover).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlforge.train.blocks import Pooler, SegmentEmbeddings, attention_mask
from vlforge.train.losses import (
    IGNORE,
    ITMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_loss,
    mrfr_loss,
)
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    itm_task_loss,
    mlm_head,
    require,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe


@dataclass
class ImageBertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(
        default_factory=lambda: {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 1.0}
    )
    task_mode: str = "sum"
    geometry: int = 5


def matched_targets(batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mlm_labels, mrm_mask) with every row of a negative pair (itm_labels 0) left out."""
    labels, sel = batch.get("mlm_labels"), batch.get("mrm_mask")
    if "itm_labels" in batch:
        unmatched = (batch["itm_labels"] == 0)[:, None]
        labels = None if labels is None else labels.masked_fill(unmatched, IGNORE)
        sel = None if sel is None else sel.bool() & ~unmatched
    return labels, sel


@register_recipe("imagebert")
class ImageBert(Recipe):
    name = "imagebert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "moc", "mrfr", "itm"})
    # ImageBERT's choices, applied where a run keeps the defaults: negatives replace the image or
    # the sentence (half each), 15% of the regions masked, 90% of those zeroed.
    masking_defaults: ClassVar[dict[str, Any]] = {
        "itm_image_swap": 0.5,
        "region_prob": 0.15,
        "region_zero_frac": 0.9,
    }
    sizes: ClassVar[dict[str, ImageBertConfig]] = {  # type: ignore[assignment]
        "small": ImageBertConfig(**SMALL_REGION_TEXT),
        "base": ImageBertConfig(),  # BERT-base; 2048-d features of 1600 VG classes + background
    }

    def __init__(self, cfg: ImageBertConfig):
        super().__init__(cfg)
        self.cfg: ImageBertConfig = cfg
        self.geometry = cfg.geometry
        h, eps = cfg.hidden, cfg.eps
        self.embed = SegmentEmbeddings(
            cfg.vocab_size, h, cfg.region_dim, cfg.geometry, cfg.max_len, cfg.type_vocab, eps=eps,
            dropout=cfg.dropout, pad_id=cfg.pad_id,
        )  # fmt: skip
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.embed.text)
        self.moc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.itm = ITMHead(h)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(hidden B×(L+R)×H, L)."""
        require(batch, ["input_ids", "region_feats", "region_geom"], "imagebert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids))
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        x = torch.cat(
            [
                self.embed.embed_text(ids, batch.get("token_type_ids")),
                self.embed.embed_regions(feats, batch["region_geom"]),
            ],
            1,
        )
        keys = torch.cat([t_keys.to(torch.long), v_keys.to(torch.long)], 1)
        return self.encoder(x, attention_mask(keys)), ids.shape[1]

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.itm(self.pooler(self.encode(batch)[0])))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_text = self.encode(batch)
        labels, sel = matched_targets(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            require(batch, ["mlm_labels"], "mlm")
            assert labels is not None
            h, lab = masked_select(hidden[:, :n_text], labels)
            out["mlm"] = mlm_loss(self.mlm(h), lab)
        if {"moc", "mrfr"} & set(tasks):
            require(batch, ["mrm_mask"], "masked region modeling")
            assert sel is not None
            h = hidden[:, n_text:][sel]
            if "moc" in tasks:
                require(batch, ["region_cls_prob"], "moc")
                out["moc"] = mrc_loss(self.moc(h), batch["region_cls_prob"][sel])
            if "mrfr" in tasks:
                require(batch, ["region_feats_target"], "mrfr")
                out["mrfr"] = mrfr_loss(self.mrfr(h), batch["region_feats_target"][sel])
        if "itm" in tasks:
            out["itm"] = itm_task_loss(self.itm, self.pooler(hidden), batch)
        return out
