"""Transformer layers: post-LN (BERT, UNITER, ViLBERT) or pre-LN (CLIP), attention on SDPA."""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.attention import Attention
from vlforge.train.blocks.mlp import MLP


class TransformerLayer(nn.Module):
    """Self-attention + feed-forward with residuals.

    `norm_first=False` is BERT's layout (LayerNorm after each residual sum, dropout on both
    sublayer outputs); `norm_first=True` is CLIP's (LayerNorm on each sublayer input).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        act: str = "gelu",
        norm_first: bool = False,
        eps: float = 1e-12,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.attn = Attention(dim, heads, dropout=attn_dropout)
        self.attn_drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.attn_drop(self.attn(self.norm1(x), mask=mask))
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn_drop(self.attn(x, mask=mask)))
        return self.norm2(x + self.mlp(x))


class TransformerEncoder(nn.Module):
    """A stack of identical `TransformerLayer`s."""

    def __init__(self, depth: int, dim: int, heads: int, mlp_dim: int, **layer_kw: object):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, mlp_dim, **layer_kw)  # type: ignore[arg-type]
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x
