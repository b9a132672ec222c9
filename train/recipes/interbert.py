"""InterBERT (Lin et al. 2020): single-stream interaction layers over [text; regions], then a
separate text stream and image stream on top.

Regions read 5-d geometry (x1, y1, x2, y2, area) and start with an [IMG] token (the mean region
over the whole-image box) for the image stream to pool. Pretraining sums, on every batch:
- masked segment modeling ("msm"): contiguous spans of whole words masked (span masking of
  train/masking.py, declared in `masking_defaults`), predicted from the text stream;
- masked region modeling ("mrm"): regions masked in overlapping groups (IoU ≥ 0.3 with a chosen
  one masks a region too, `region_mask_overlap`), trained by KL to the detector's class
  distribution plus feature regression on the image stream;
- image-text matching ("itm") on the concatenation of both streams' pooled outputs, with half
  of the negatives TF-IDF hard negatives from the sample's mine.json (`hard_neg_ratio`).
`masking_defaults` fill only the masking flags a run leaves at their defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlforge.train.blocks import (
    Pooler,
    attention_mask,
    prepend_global_region,
)
from vlforge.train.losses import (
    ITMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_kl_loss,
    mrfr_loss,
)
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    mlm_head,
    region_embeddings,
    require,
    text_embeddings,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe


@dataclass
class InterbertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"msm": 1.0, "mrm": 1.0, "itm": 1.0})
    task_mode: str = "sum"
    geometry: int = 5
    # `layers` single-stream interaction layers, then `stream_layers` in each stream (base: BERT's
    # 12 layers split evenly).
    layers: int = 6
    stream_layers: int = 6


@register_recipe("interbert")
class Interbert(Recipe):
    name = "interbert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"msm", "mrm", "itm"})
    sizes: ClassVar[dict[str, InterbertConfig]] = {  # type: ignore[assignment]
        "small": InterbertConfig(**SMALL_REGION_TEXT | {"layers": 1, "stream_layers": 1}),
        "base": InterbertConfig(),
    }
    region_mask_overlap = True
    masking_defaults: ClassVar[dict[str, Any]] = {"mlm_mode": "span", "hard_neg_ratio": 0.5}

    def __init__(self, cfg: InterbertConfig):
        super().__init__(cfg)
        self.cfg: InterbertConfig = cfg
        self.geometry = cfg.geometry
        h, eps = cfg.hidden, cfg.eps
        self.text = text_embeddings(cfg)
        self.regions = region_embeddings(cfg)
        self.interaction = transformer_encoder(cfg)
        self.text_stream = transformer_encoder(cfg, cfg.stream_layers)
        self.image_stream = transformer_encoder(cfg, cfg.stream_layers)
        self.t_pool = Pooler(h)
        self.v_pool = Pooler(h)
        self.mlm = mlm_head(cfg, self.text)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.itm = ITMHead(2 * h)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text stream B×L×H, image stream B×(1+R)×H); image position 0 is [IMG]."""
        require(batch, ["input_ids", "region_feats", "region_geom"], "interbert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids)).to(torch.long)
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        feats, geom, v_keys = prepend_global_region(feats, batch["region_geom"], v_keys.long())
        t = self.text(ids, batch.get("token_type_ids"))
        tt = self.text.token_type
        segment = tt(torch.ones_like(v_keys)) if tt is not None else None
        v = self.regions(feats, geom, segment)
        n = t.shape[1]
        keys = torch.cat([t_keys, v_keys], 1)
        joint = self.interaction(torch.cat([t, v], 1), attention_mask(keys))
        t = self.text_stream(joint[:, :n], attention_mask(t_keys))
        v = self.image_stream(joint[:, n:], attention_mask(v_keys))
        return t, v

    def _itm_logits(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.itm(torch.cat([self.t_pool(t), self.v_pool(v)], -1))

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self._itm_logits(*self.encode(batch)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.mlm(self.encode(batch)[0])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        t, v = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "msm" in tasks:
            require(batch, ["mlm_labels"], "msm")
            h, labels = masked_select(t, batch["mlm_labels"])
            out["msm"] = mlm_loss(self.mlm(h), labels)
        if "mrm" in tasks:
            require(batch, ["mrm_mask", "region_cls_prob", "region_feats_target"], "mrm")
            sel = batch["mrm_mask"].bool()
            h = v[:, 1:][sel]  # skip [IMG]
            out["mrm"] = mrc_kl_loss(self.mrc(h), batch["region_cls_prob"][sel]) + mrfr_loss(
                self.mrfr(h), batch["region_feats_target"][sel]
            )
        if "itm" in tasks:
            require(batch, ["itm_labels"], "itm")
            out["itm"] = itm_loss(self._itm_logits(t, v), batch["itm_labels"])
        return out
