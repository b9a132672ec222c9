"""VisualBERT (Li et al. 2019): one BERT over [text; regions], told apart by segment embeddings.

Text tokens are segment 0, regions segment 1 with their own segment and position tables
(`SegmentEmbeddings`, laid out as HF `VisualBertModel` so converted checkpoints match it; see
train/convert_visualbert.py). Pretraining sums, on every batch, MLM conditioned on the image and
sentence-image prediction (ITM) on the pooled [CLS], whose negatives pair the image with a
random caption.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlforge.train.blocks import Pooler, SegmentEmbeddings, attention_mask
from vlforge.train.losses import ITMHead, itm_score
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    itm_task_loss,
    mlm_head,
    mlm_task_loss,
    require,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe


@dataclass
class VisualBertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0})
    task_mode: str = "sum"


@register_recipe("visualbert")
class VisualBert(Recipe):
    name = "visualbert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "itm"})
    # Sentence-image prediction pairs the image with its caption or a random one: negatives
    # replace the caption, never the image (where a run keeps the default).
    masking_defaults: ClassVar[dict[str, Any]] = {"itm_image_swap": 0.0}
    sizes: ClassVar[dict[str, VisualBertConfig]] = {  # type: ignore[assignment]
        "small": VisualBertConfig(**SMALL_REGION_TEXT),
        "base": VisualBertConfig(),  # BERT-base, 2048-d detector features (the COCO models)
    }

    def __init__(self, cfg: VisualBertConfig):
        super().__init__(cfg)
        self.cfg: VisualBertConfig = cfg
        h = cfg.hidden
        self.embed = SegmentEmbeddings(
            cfg.vocab_size, h, cfg.region_dim, 0, cfg.max_len, cfg.type_vocab, eps=cfg.eps,
            dropout=cfg.dropout, pad_id=cfg.pad_id,
        )  # fmt: skip
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.embed.text)
        self.itm = ITMHead(h)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(hidden B×(L+R)×H, L). `visual_token_type_ids` (B×R) may set the regions' segment."""
        require(batch, ["input_ids", "region_feats"], "visualbert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids))
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        x = torch.cat(
            [
                self.embed.embed_text(ids, batch.get("token_type_ids")),
                self.embed.embed_regions(feats, token_type_ids=batch.get("visual_token_type_ids")),
            ],
            1,
        )
        keys = torch.cat([t_keys.to(torch.long), v_keys.to(torch.long)], 1)
        return self.encoder(x, attention_mask(keys)), ids.shape[1]

    def pooled(self, batch: dict[str, Any]) -> torch.Tensor:
        """The pooled [CLS] (HF's `pooler_output`)."""
        return self.pooler(self.encode(batch)[0])

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.itm(self.pooled(batch)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            out["mlm"] = mlm_task_loss(self.mlm, hidden[:, :n_text], batch)
        if "itm" in tasks:
            out["itm"] = itm_task_loss(self.itm, self.pooler(hidden), batch)
        return out
