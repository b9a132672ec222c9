"""LXMERT's cross-modality layer: the two streams cross-attend, then each has its own
self-attention and feed-forward block (HF `LxmertXLayer`).

One cross-attention module (and its output LayerNorm) serves both directions, as in LXMERT: the
language queries attend to the vision stream and the vision queries to the language stream with
the same weights, both reading the layer's *input* states. The per-stream self-attention + FFN
is exactly a post-LN `TransformerLayer`, so its FFN is the shared `MLP` (MoE can replace it).
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.attention import Attention
from vlforge.train.blocks.transformer import TransformerLayer


class CrossModalityLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        act: str = "gelu",
        eps: float = 1e-12,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.cross = Attention(dim, heads, dropout=attn_dropout)
        self.cross_drop = nn.Dropout(dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=eps)
        kw = dict(act=act, eps=eps, dropout=dropout, attn_dropout=attn_dropout)
        self.lang = TransformerLayer(dim, heads, mlp_dim, **kw)  # type: ignore[arg-type]
        self.vision = TransformerLayer(dim, heads, mlp_dim, **kw)  # type: ignore[arg-type]

    def _cross(self, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.cross_norm(x + self.cross_drop(self.cross(x, context=ctx, mask=mask)))

    def forward(
        self,
        lang: torch.Tensor,
        vision: torch.Tensor,
        lang_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """lang_mask / vision_mask: SDPA masks over that stream's keys (see `attention_mask`)."""
        lang2 = self._cross(lang, vision, vision_mask)
        vision2 = self._cross(vision, lang, lang_mask)
        return self.lang(lang2, lang_mask), self.vision(vision2, vision_mask)
