"""UNITER (Chen et al. 2020): one transformer over [text; regions].

Text: BERT embeddings. Regions: LayerNorm(W_f·feat) + LayerNorm(W_g·7-d geometry) + the image
segment embedding, LayerNorm'd. Tasks sampled per batch with UNITER's mix ratio
(MLM 2 : MRFR 2 : MRC-KL 1 : ITM 1); ITM batches also train word-region alignment by optimal
transport (λ = 0.1). "mrc" (hard label), "mrm" (MRFR + MRC-KL) and "wra" alone are available by
override. Masking is conditional (one modality per row), done by the data side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from vlforge.train.blocks import (
    Pooler,
    RegionEmbeddings,
    TextEmbeddings,
    TransformerEncoder,
    attention_mask,
)
from vlforge.train.losses import (
    ITMHead,
    MLMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_kl_loss,
    mrc_loss,
    mrfr_loss,
    optimal_transport_distance,
    wra_loss,
)
from vlforge.train.recipes.base import SMALL_INIT_STD, Recipe, RegionTextConfig, require
from vlforge.train.recipes.registry import register_recipe

REGION_TASKS = ("mrfr", "mrc", "mrc_kl")


@dataclass
class UniterConfig(RegionTextConfig):
    tasks: dict[str, float] = field(
        default_factory=lambda: {"mlm": 2.0, "mrfr": 2.0, "mrc_kl": 1.0, "itm": 1.0}
    )
    task_mode: str = "sample"
    geometry: int = 7
    ot_weight: float = 0.1  # UNITER's itm_ot_lambda: WRA on every ITM batch; 0 turns it off
    ot_beta: float = 0.5
    ot_iterations: int = 50


@register_recipe("uniter")
class Uniter(Recipe):
    name = "uniter"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "mrm", *REGION_TASKS, "itm", "wra"})
    sizes: ClassVar[dict[str, UniterConfig]] = {  # type: ignore[assignment]
        "small": UniterConfig(
            hidden=64,
            layers=2,
            heads=4,
            mlp=128,
            max_len=128,
            region_dim=64,
            num_region_classes=32,
            dropout=0.0,
            attn_dropout=0.0,
            init_std=SMALL_INIT_STD,
        ),  # fmt: skip
        "base": UniterConfig(),
    }
    conditional_masking = True

    def __init__(self, cfg: UniterConfig):
        super().__init__(cfg)
        self.cfg: UniterConfig = cfg
        self.geometry = cfg.geometry
        self.loss_weights = {"wra": cfg.ot_weight} if "wra" not in cfg.tasks else {}
        h, eps = cfg.hidden, cfg.eps
        self.text = TextEmbeddings(
            cfg.vocab_size, h, cfg.max_len, cfg.type_vocab, eps=eps, dropout=cfg.dropout,
            pad_id=cfg.pad_id,
        )  # fmt: skip
        self.regions = RegionEmbeddings(
            cfg.region_dim, cfg.geometry, h, part_norm=True, eps=eps, dropout=cfg.dropout,
            mask_embedding=True,
        )  # fmt: skip
        self.encoder = TransformerEncoder(
            cfg.layers, h, cfg.heads, cfg.mlp, act=cfg.act, eps=eps, dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout,
        )  # fmt: skip
        self.pooler = Pooler(h)
        self.mlm = MLMHead(h, cfg.vocab_size, cfg.act, eps, tie_to=self.text.word)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.itm = ITMHead(h)

    # -- the encoder -------------------------------------------------------------------------

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(hidden B×(L+R)×H, key mask B×(L+R), L) over whichever modalities the batch has."""
        parts, masks = [], []
        if "input_ids" in batch:
            ids = batch["input_ids"]
            parts.append(self.text(ids, batch.get("token_type_ids")))
            masks.append(batch.get("attention_mask", torch.ones_like(ids)))
        if "region_feats" in batch:
            feats = batch["region_feats"]
            img_type = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
            segment = self.text.token_type(img_type) if self.text.token_type is not None else None
            geom = batch.get("region_geom") if self.geometry else None
            parts.append(self.regions(feats, geom, segment, batch.get("mrm_mask")))
            masks.append(batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device)))
        if not parts:
            raise KeyError("uniter needs input_ids and/or region_feats")
        x = torch.cat(parts, 1)
        mask = torch.cat([m.to(torch.long) for m in masks], 1)
        n_text = parts[0].shape[1] if "input_ids" in batch else 0
        return self.encoder(x, attention_mask(mask)), mask, n_text

    # -- inference entry points (eval) -------------------------------------------------------

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, _ = self.encode(batch)
        return itm_score(self.itm(self.pooler(hidden)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, mask, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        wanted = set(tasks)
        if "mrm" in wanted:
            wanted |= {"mrfr", "mrc_kl"}
        if "itm" in wanted and self.cfg.ot_weight > 0:
            wanted.add("wra")
        if "mlm" in wanted:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(hidden[:, :n_text], batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        if wanted & set(REGION_TASKS):
            require(batch, ["mrm_mask"], "masked region modeling")
            sel = batch["mrm_mask"].bool()
            h = hidden[:, n_text:][sel]
            if "mrfr" in wanted:
                require(batch, ["region_feats_target"], "mrfr")
                out["mrfr"] = mrfr_loss(self.mrfr(h), batch["region_feats_target"][sel])
            if wanted & {"mrc", "mrc_kl"}:
                require(batch, ["region_cls_prob"], "mrc")
                logits, prob = self.mrc(h), batch["region_cls_prob"][sel]
                if "mrc" in wanted:
                    out["mrc"] = mrc_loss(logits, prob)
                if "mrc_kl" in wanted:
                    out["mrc_kl"] = mrc_kl_loss(logits, prob)
        if "itm" in wanted:
            require(batch, ["itm_labels"], "itm")
            out["itm"] = itm_loss(self.itm(self.pooler(hidden)), batch["itm_labels"])
        if "wra" in wanted:
            require(batch, ["itm_labels"], "wra")
            # Tokens after [CLS] against the regions; [CLS] carries the pooled ITM state.
            txt_mask = mask[:, :n_text].clone()
            txt_mask[:, 0] = 0
            dist = optimal_transport_distance(
                hidden[:, :n_text], hidden[:, n_text:], txt_mask, mask[:, n_text:],
                beta=self.cfg.ot_beta, iterations=self.cfg.ot_iterations,
            )  # fmt: skip
            out["wra"] = wra_loss(dist, batch["itm_labels"])
        return out
