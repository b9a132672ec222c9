"""CLIP (Radford et al. 2021): a text transformer and an image tower (ViT or modified ResNet)
trained by symmetric InfoNCE over the batch's similarity matrix with a learned, clamped
temperature; negatives are gathered across ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from vlforge.train.blocks import ModifiedResNet, VisionTransformer
from vlforge.train.blocks.text_transformer import CausalTextTransformer
from vlforge.train.losses import ContrastiveLoss
from vlforge.train.recipes.base import Recipe, RecipeConfig, require
from vlforge.train.recipes.registry import register_recipe


@dataclass
class ClipConfig(RecipeConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"contrastive": 1.0})
    task_mode: str = "sum"
    embed_dim: int = 512
    # text tower (ViT-B/32's)
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    text_mlp: int = 2048
    max_len: int = 77
    text_pool: str = "last"  # see blocks/text_transformer.py; converted OpenAI weights: argmax
    eos_token_id: int | None = None
    # image tower
    vision: str = "vit"  # "vit" or "resnet"
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    vision_mlp: int = 3072
    resnet_layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # RN50
    resnet_width: int = 64
    resnet_heads: int = 32
    act: str = "quick_gelu"
    eps: float = 1e-5
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0


@register_recipe("clip")
class Clip(Recipe):
    name = "clip"
    inputs = frozenset({"text", "pixels"})
    supported_tasks = frozenset({"contrastive"})
    sizes: ClassVar[dict[str, ClipConfig]] = {  # type: ignore[assignment]
        # Measured on the demo world (600 steps, batch 32, lr 1e-3; held-out R@1 i2t/t2i over
        # 100 candidates): 32-wide towers on 32-px images with BERT's 0.02 init stayed near
        # chance (0.02/0.03, InfoNCE 3.08 of ln 32 = 3.47); init at CLIP's own attention scale
        # width^-0.5 gave 0.05/0.07, and 64-px images (the world's shapes are a few pixels wide at
        # 32) 0.16/0.17; 64-wide towers 0.23/0.17 (InfoNCE 1.55). At 1000 steps it underfits
        # rather than overfits (2026-12-07: R@1 0.27/0.26 held out, 0.33/0.32 on a training
        # shard), and none of these moved it past 0.31: a ResNet tower (width 8: 0.15/0.14;
        # width 16: 0.31/0.26 at 1.7x the time; at 96 px 0.27/0.22), 96-px images in 12-px
        # patches 0.24/0.20, 4-layer towers 0.26/0.23, lr 3e-3 0.28/0.23; zero-shot shape
        # accuracy stays near chance in all, so the shapes are what it does not learn.
        "small": ClipConfig(
            embed_dim=64,
            text_width=64,
            text_layers=2,
            text_heads=4,
            text_mlp=128,
            max_len=64,
            image_size=64,
            patch_size=8,
            vision_width=64,
            vision_layers=2,
            vision_heads=4,
            vision_mlp=128,
            resnet_layers=(1, 1, 1, 1),
            resnet_width=8,
            resnet_heads=2,
            init_std=64**-0.5,  # CLIP's attn_std = width^-0.5 (BERT's 0.02 is for 768 wide)
        ),  # fmt: skip
        "base": ClipConfig(),
    }

    def __init__(self, cfg: ClipConfig):
        super().__init__(cfg)
        self.cfg: ClipConfig = cfg
        self.image_size = cfg.image_size
        self.text = CausalTextTransformer(
            cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp,
            cfg.embed_dim, cfg.max_len, cfg.act, cfg.eps, cfg.text_pool, cfg.eos_token_id,
        )  # fmt: skip
        self.image: nn.Module
        if cfg.vision == "vit":
            self.image = VisionTransformer(
                cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                cfg.vision_heads, cfg.vision_mlp, cfg.embed_dim, cfg.act, cfg.eps,
            )  # fmt: skip
        elif cfg.vision == "resnet":
            self.image = ModifiedResNet(
                cfg.image_size, cfg.resnet_layers, cfg.resnet_width, cfg.resnet_heads,
                cfg.embed_dim,
            )  # fmt: skip
        else:
            raise ValueError(f"vision must be 'vit' or 'resnet', not {cfg.vision!r}")
        self.contrastive = ContrastiveLoss(cfg.init_temperature, cfg.max_logit_scale)

    def encode_text(self, batch: dict[str, Any]) -> torch.Tensor:
        require(batch, ["input_ids"], "encode_text")
        return self.text(batch["input_ids"], batch.get("attention_mask"))

    def encode_image(self, batch: dict[str, Any]) -> torch.Tensor:
        require(batch, ["pixel_values"], "encode_image")
        return self.image(batch["pixel_values"])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        return {"contrastive": self.contrastive(self.encode_image(batch), self.encode_text(batch))}
