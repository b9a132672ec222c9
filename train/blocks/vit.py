"""CLIP's Vision Transformer image tower: patches → [class] + positions → pre-LN encoder →
LayerNorm of the [class] token → projection into the joint embedding space."""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.transformer import TransformerEncoder


class VisionTransformer(nn.Module):
    def __init__(
        self,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        embed_dim: int,
        act: str = "quick_gelu",
        eps: float = 1e-5,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        self.image_size = image_size
        self.patch = nn.Conv2d(3, dim, patch_size, stride=patch_size, bias=False)
        self.cls = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.position = nn.Embedding((image_size // patch_size) ** 2 + 1, dim)
        self.norm_pre = nn.LayerNorm(dim, eps=eps)
        self.encoder = TransformerEncoder(
            depth, dim, heads, mlp_dim, act=act, norm_first=True, eps=eps
        )
        self.norm_post = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B×3×H×W → B×embed_dim (not normalized)."""
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            raise ValueError(f"images must be {self.image_size} px, got {tuple(pixels.shape)}")
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        cls = self.cls.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + self.position.weight[None].to(x.dtype)
        x = self.encoder(self.norm_pre(x))
        return self.proj(self.norm_post(x[:, 0]))
