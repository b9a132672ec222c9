"""ViLBERT (Lu et al. 2019): a text stream and an image stream that exchange through
co-attention layers (each stream's queries, the other's keys/values).

The image stream starts with an [IMG] token (the mean region feature over the whole-image box)
and reads 5-d geometry (x1, y1, x2, y2, area). Pretraining sums, on every batch, MLM, masked
object classification as KL to the detector's distribution, and ITM on the element-wise
product of the two pooled streams — as the paper did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlforge.train.blocks import (
    CoAttentionLayer,
    Pooler,
    TransformerLayer,
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
    mrc_kl_loss,
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
)
from vlforge.train.recipes.registry import register_recipe


@dataclass
class VilbertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "mrc_kl": 1.0, "itm": 1.0})
    task_mode: str = "sum"
    v_hidden: int = 1024
    v_layers: int = 6
    v_heads: int = 8
    v_mlp: int = 1024
    bi_hidden: int = 1024
    bi_heads: int = 8
    # Co-attention layer k runs after text layer t_co[k] and image layer v_co[k] (ViLBERT's
    # t_biattention_id / v_biattention_id): the base model co-attends over the top 6 text layers.
    t_co: tuple[int, ...] = (6, 7, 8, 9, 10, 11)
    v_co: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    geometry: int = 5


# The small two-stream size (ViLBERT's and ERNIE-ViL's): the shared small text side, a narrower
# image stream, and BERT's init std rather than SMALL_INIT_STD.
SMALL_VILBERT: dict[str, Any] = SMALL_REGION_TEXT | {
    "init_std": RegionTextConfig.init_std,
    "v_hidden": 48,
    "v_layers": 2,
    "v_heads": 4,
    "v_mlp": 96,
    "bi_hidden": 64,
    "bi_heads": 4,
    "t_co": (1, 2),
    "v_co": (0, 1),
}


@register_recipe("vilbert")
class Vilbert(Recipe):
    name = "vilbert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "mrc_kl", "mrc", "mrm", "itm"})
    sizes: ClassVar[dict[str, VilbertConfig]] = {  # type: ignore[assignment]
        "small": VilbertConfig(**SMALL_VILBERT),
        "base": VilbertConfig(),
    }

    def __init__(self, cfg: VilbertConfig):
        super().__init__(cfg)
        self.cfg: VilbertConfig = cfg
        self.geometry = cfg.geometry
        if len(cfg.t_co) != len(cfg.v_co):
            raise ValueError("t_co and v_co must list the same number of co-attention layers")
        for ids, n in ((cfg.t_co, cfg.layers), (cfg.v_co, cfg.v_layers)):
            if list(ids) != sorted(ids) or (ids and (ids[0] < 0 or ids[-1] > n)):
                raise ValueError(f"co-attention positions {ids} must rise within 0..{n}")
        eps, drop = cfg.eps, dict(dropout=cfg.dropout, attn_dropout=cfg.attn_dropout)
        self.text = text_embeddings(cfg)
        self.regions = region_embeddings(cfg, dim=cfg.v_hidden)
        self.t_layers = nn.ModuleList(
            TransformerLayer(cfg.hidden, cfg.heads, cfg.mlp, cfg.act, eps=eps, **drop)
            for _ in range(cfg.layers)
        )
        self.v_layers = nn.ModuleList(
            TransformerLayer(cfg.v_hidden, cfg.v_heads, cfg.v_mlp, cfg.act, eps=eps, **drop)
            for _ in range(cfg.v_layers)
        )
        self.co_layers = nn.ModuleList(
            CoAttentionLayer(
                cfg.hidden,
                cfg.v_hidden,
                cfg.bi_hidden,
                cfg.bi_heads,
                cfg.mlp,
                cfg.v_mlp,
                cfg.act,
                eps,
                **drop,
            )  # fmt: skip
            for _ in cfg.t_co
        )
        # ViLBERT pools each stream's first token into the bi-attention width with a ReLU.
        self.t_pool = Pooler(cfg.hidden, cfg.bi_hidden, act="relu")
        self.v_pool = Pooler(cfg.v_hidden, cfg.bi_hidden, act="relu")
        self.mlm = mlm_head(cfg, self.text)
        self.mrc = RegionClassifier(cfg.v_hidden, cfg.num_region_classes, cfg.act, eps)
        self.itm = ITMHead(cfg.bi_hidden)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(text states B×L×H, image states B×(1+R)×V); image position 0 is [IMG]."""
        require(batch, ["input_ids", "region_feats"], "vilbert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids))
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        geom = batch.get("region_geom")
        if geom is None:
            raise KeyError("vilbert needs region_geom (5-d)")
        feats, geom, v_keys = prepend_global_region(feats, geom, v_keys)
        t = self.text(ids, batch.get("token_type_ids"))
        v = self.regions(feats, geom)
        t_mask, v_mask = attention_mask(t_keys), attention_mask(v_keys)
        ti = vi = 0
        for co, t_end, v_end in zip(self.co_layers, self.cfg.t_co, self.cfg.v_co, strict=True):
            for layer in self.t_layers[ti:t_end]:
                t = layer(t, t_mask)
            for layer in self.v_layers[vi:v_end]:
                v = layer(v, v_mask)
            t, v = co(t, v, t_mask, v_mask)
            ti, vi = t_end, v_end
        for layer in self.t_layers[ti:]:
            t = layer(t, t_mask)
        for layer in self.v_layers[vi:]:
            v = layer(v, v_mask)
        return t, v

    def _itm_logits(self, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.itm(self.t_pool(t) * self.v_pool(v))

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self._itm_logits(*self.encode(batch)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.mlm(self.encode(batch)[0])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        t, v = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        wanted = set(tasks) | ({"mrc_kl"} if "mrm" in tasks else set())
        if "mlm" in wanted:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(t, batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        if wanted & {"mrc", "mrc_kl"}:
            require(batch, ["mrm_mask", "region_cls_prob"], "masked object classification")
            sel = batch["mrm_mask"].bool()
            logits = self.mrc(v[:, 1:][sel])  # skip [IMG]
            prob = batch["region_cls_prob"][sel]
            if "mrc_kl" in wanted:
                out["mrc_kl"] = mrc_kl_loss(logits, prob)
            if "mrc" in wanted:
                out["mrc"] = mrc_loss(logits, prob)
        if "itm" in wanted:
            require(batch, ["itm_labels"], "itm")
            out["itm"] = itm_loss(self._itm_logits(t, v), batch["itm_labels"])
        return out
