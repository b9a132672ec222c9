"""Unicoder-VL (Li et al. 2020): one transformer over [text; regions].

Sequence: [CLS] caption [SEP] [IMG] regions. Regions: the feature and its 5-d location
(x1, y1, x2, y2, area) each through a linear layer, summed and LayerNorm'd. [IMG] opens the
visual part and stands for the whole image: the mean of the real regions' features at the
whole-image location (0, 0, 1, 1, 1), embedded like a region (as ViLBERT builds its [IMG]; the
paper names the token and its role, not how its feature is pooled). Pretraining sums, on every batch, MLM, masked object classification
(MOC: the detector's top class as a hard label — `hard_region_labels`, background column 0 never a
target) and visual-linguistic matching (VLM: one FC layer on the [CLS] output, no pooler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlforge.train.blocks import (
    attention_mask,
    prepend_global_region,
)
from vlforge.train.losses import (
    ITMHead,
    RegionClassifier,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_loss,
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
class UnicoderVLConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "moc": 1.0, "vlm": 1.0})
    task_mode: str = "sum"
    geometry: int = 5


@register_recipe("unicoder_vl")
class UnicoderVL(Recipe):
    name = "unicoder_vl"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "moc", "vlm"})
    sizes: ClassVar[dict[str, UnicoderVLConfig]] = {  # type: ignore[assignment]
        "small": UnicoderVLConfig(**SMALL_REGION_TEXT),
        "base": UnicoderVLConfig(),  # BERT-base, 2048-d features of 1600 VG classes + background
    }

    def __init__(self, cfg: UnicoderVLConfig):
        super().__init__(cfg)
        self.cfg: UnicoderVLConfig = cfg
        self.geometry = cfg.geometry
        h, eps = cfg.hidden, cfg.eps
        self.text = text_embeddings(cfg)
        self.regions = region_embeddings(cfg)
        self.encoder = transformer_encoder(cfg)
        self.mlm = mlm_head(cfg, self.text)
        self.moc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.vlm = ITMHead(h)  # Unicoder-VL's FC layer on [CLS]

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(hidden B×(L+1+R)×H, L): text, [IMG] at L, the regions from L + 1."""
        require(batch, ["input_ids", "region_feats", "region_geom"], "unicoder_vl")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids))
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        feats, geom, v_keys = prepend_global_region(feats, batch["region_geom"], v_keys.long())
        x = torch.cat([self.text(ids, batch.get("token_type_ids")), self.regions(feats, geom)], 1)
        keys = torch.cat([t_keys.to(torch.long), v_keys.to(torch.long)], 1)
        return self.encoder(x, attention_mask(keys)), ids.shape[1]

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.vlm(self.encode(batch)[0][:, 0]))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    def moc_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """N×C class logits of the masked regions (`mrm_mask`), in batch order."""
        hidden, n_text = self.encode(batch)
        return self.moc(hidden[:, n_text + 1 :][batch["mrm_mask"].bool()])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(hidden[:, :n_text], batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        if "moc" in tasks:
            require(batch, ["mrm_mask", "region_cls_prob"], "moc")
            sel = batch["mrm_mask"].bool()
            regions = hidden[:, n_text + 1 :]  # after [IMG]
            out["moc"] = mrc_loss(self.moc(regions[sel]), batch["region_cls_prob"][sel])
        if "vlm" in tasks:
            require(batch, ["itm_labels"], "vlm")
            out["vlm"] = itm_loss(self.vlm(hidden[:, 0]), batch["itm_labels"])
        return out
