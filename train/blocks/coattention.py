"""ViLBERT's co-attention layer: each stream's queries attend to the other stream's keys/values.

Both cross-attentions read the *input* states of the other stream (not the other's updated
states), then each stream has its own residual LayerNorm and its own feed-forward block.
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.attention import Attention
from vlforge.train.blocks.mlp import MLP


class CoAttentionLayer(nn.Module):
    """Text (dim_t) and vision (dim_v) streams exchanging through a shared `inner`-wide space."""

    def __init__(
        self,
        dim_t: int,
        dim_v: int,
        inner: int,
        heads: int,
        mlp_t: int,
        mlp_v: int,
        act: str = "gelu",
        eps: float = 1e-12,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        self.attn_t = Attention(dim_t, heads, kv_dim=dim_v, inner_dim=inner, dropout=attn_dropout)
        self.attn_v = Attention(dim_v, heads, kv_dim=dim_t, inner_dim=inner, dropout=attn_dropout)
        self.drop = nn.Dropout(dropout)
        self.norm_t = nn.LayerNorm(dim_t, eps=eps)
        self.norm_v = nn.LayerNorm(dim_v, eps=eps)
        self.mlp_t = MLP(dim_t, mlp_t, act, dropout)
        self.mlp_v = MLP(dim_v, mlp_v, act, dropout)
        self.norm2_t = nn.LayerNorm(dim_t, eps=eps)
        self.norm2_v = nn.LayerNorm(dim_v, eps=eps)

    def forward(
        self,
        t: torch.Tensor,
        v: torch.Tensor,
        t_mask: torch.Tensor | None = None,
        v_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """t_mask / v_mask: SDPA masks over the *keys* of that stream (see `attention_mask`)."""
        t2 = self.norm_t(t + self.drop(self.attn_t(t, context=v, mask=v_mask)))
        v2 = self.norm_v(v + self.drop(self.attn_v(v, context=t, mask=t_mask)))
        t2 = self.norm2_t(t2 + self.mlp_t(t2))
        v2 = self.norm2_v(v2 + self.mlp_v(v2))
        return t2, v2
