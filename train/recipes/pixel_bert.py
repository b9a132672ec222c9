"""Pixel-BERT (Huang et al. 2020): a CNN over the pixels instead of detector regions, its feature
map flattened into "pixel" tokens, each given a learned semantic embedding s_v (the text's s_w is
BERT's segment embedding), joined with the caption in one BERT transformer.

In training a fixed number of feature-map pixels is sampled per image (the paper's pixel random
sampling, 100 for ResNet-50), at eval every pixel is kept. Pixel tokens carry no position
embedding, as in the paper. Tasks, summed on every batch: MLM and ITM. The CNN is any torchvision
ResNet (`backbone`, weights=None); its own Kaiming init is kept, BERT's init covers the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlforge.train.blocks import (
    Pooler,
    ResNetFeatures,
    attention_mask,
    sample_tokens,
)
from vlforge.train.losses import ITMHead, itm_score
from vlforge.train.recipes.base import (
    SMALL_INIT_STD,
    Recipe,
    RecipeConfig,
    init_weights,
    itm_task_loss,
    mlm_head,
    mlm_task_loss,
    require,
    text_embeddings,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe


@dataclass
class PixelBertConfig(RecipeConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0})
    task_mode: str = "sum"
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    mlp: int = 3072
    max_len: int = 512
    type_vocab: int = 2
    act: str = "gelu"
    eps: float = 1e-12
    dropout: float = 0.1
    attn_dropout: float = 0.1
    pad_id: int | None = 0
    image_size: int = 224
    backbone: str = "resnet50"  # any torchvision ResNet-family name
    resnet_blocks: tuple[int, int, int, int] | None = None  # a BasicBlock ResNet instead
    resnet_stages: int = 4  # residual stages kept (fewer: a finer, narrower feature map)
    pixel_samples: int = 100  # feature-map pixels per image in training; ≤ 0 keeps all


@register_recipe("pixel_bert")
class PixelBert(Recipe):
    name = "pixel_bert"
    inputs = frozenset({"text", "pixels"})
    supported_tasks = frozenset({"mlm", "itm"})
    sizes: ClassVar[dict[str, PixelBertConfig]] = {  # type: ignore[assignment]
        "small": PixelBertConfig(
            hidden=64,
            layers=2,
            heads=4,
            mlp=128,
            max_len=128,
            dropout=0.0,
            attn_dropout=0.0,
            # Measured on 64 px demo-like shards (300 steps, batch 32, one thread): 32 px through
            # the stem and one stage (an 8×8 map of 64-d pixels, 16 sampled) trained in 95 s to
            # ITM 0.84 / MLM 0.63; two stages (4×4 of 128-d, 8 sampled) in 82 s to 0.67 / 0.54;
            # 64 px images cost ~5× per step.
            image_size=32,
            resnet_blocks=(1, 1, 1, 1),
            resnet_stages=1,
            pixel_samples=16,
            init_std=SMALL_INIT_STD,
        ),  # fmt: skip
        "base": PixelBertConfig(),
    }

    def __init__(self, cfg: PixelBertConfig):
        super().__init__(cfg)
        self.cfg: PixelBertConfig = cfg
        self.image_size = cfg.image_size
        h = cfg.hidden
        self.text = text_embeddings(cfg)
        self.cnn = ResNetFeatures(cfg.backbone, cfg.resnet_blocks, cfg.resnet_stages)
        self.pixel_proj = nn.Linear(self.cnn.out_channels, h)
        self.pixel_semantic = nn.Parameter(torch.zeros(h))  # s_v
        self.pixel_drop = nn.Dropout(cfg.dropout)
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.text)
        self.itm = ITMHead(h)

    def reset_parameters(self) -> None:
        # BERT's init everywhere but the CNN: normal(0, 0.2) convolutions (the small size's std)
        # would blow its activations up stage after stage; torchvision's Kaiming init stays.
        for name, child in self.named_children():
            if name != "cnn":
                init_weights(child, self.cfg.init_std)
        nn.init.normal_(self.pixel_semantic, std=self.cfg.init_std)

    # -- the encoder -------------------------------------------------------------------------

    def pixel_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×H×W → B×P×H pixel tokens: CNN feature map, flattened (P = h·w at eval,
        `pixel_samples` of them in training), projected, plus the semantic embedding s_v."""
        feats = self.cnn(pixels).flatten(2).transpose(1, 2)
        if self.training:
            feats, _ = sample_tokens(feats, self.cfg.pixel_samples)
        return self.pixel_drop(self.pixel_proj(feats) + self.pixel_semantic)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(hidden B×(L+P)×H, text length L) over [CLS] caption [SEP] pixels."""
        require(batch, ["input_ids", "pixel_values"], "pixel_bert")
        ids = batch["input_ids"]
        text = self.text(ids, batch.get("token_type_ids"))
        pixels = self.pixel_tokens(batch["pixel_values"])
        text_mask = batch.get("attention_mask", torch.ones_like(ids)).to(torch.long)
        pixel_mask = torch.ones(pixels.shape[:2], dtype=torch.long, device=pixels.device)
        mask = torch.cat([text_mask, pixel_mask], 1)
        return self.encoder(torch.cat([text, pixels], 1), attention_mask(mask)), ids.shape[1]

    # -- inference entry points (eval) -------------------------------------------------------

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _ = self.encode(batch)
        return itm_score(self.itm(self.pooler(hidden)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            out["mlm"] = mlm_task_loss(self.mlm, hidden[:, :n_text], batch)
        if "itm" in tasks:
            out["itm"] = itm_task_loss(self.itm, self.pooler(hidden), batch)
        return out
