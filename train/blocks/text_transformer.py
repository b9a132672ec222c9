"""CLIP's text tower: token + position embeddings → causal pre-LN encoder → final LayerNorm →
the state of one token per caption → projection into the joint embedding space.

Which token: "last" = the last real token by attention_mask (our WordPiece captions end in
[SEP]); "eos" = the first occurrence of `eos_token_id` (HF CLIP after PR 24773); "argmax" = the
highest token id (OpenAI CLIP, whose end-of-text token has the highest id).
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.attention import attention_mask
from vlforge.train.blocks.text_embeddings import TextEmbeddings
from vlforge.train.blocks.transformer import TransformerEncoder

POOLS = ("last", "eos", "argmax")


class CausalTextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        embed_dim: int,
        max_len: int = 77,
        act: str = "quick_gelu",
        eps: float = 1e-5,
        pool: str = "last",
        eos_token_id: int | None = None,
    ):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"text pool must be one of {POOLS}, not {pool!r}")
        if pool == "eos" and eos_token_id is None:
            raise ValueError("text pool 'eos' needs eos_token_id")
        self.pool, self.eos_token_id = pool, eos_token_id
        self.embed = TextEmbeddings(vocab_size, dim, max_len, type_vocab=0, norm=False, pad_id=None)
        self.encoder = TransformerEncoder(
            depth, dim, heads, mlp_dim, act=act, norm_first=True, eps=eps
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.proj = nn.Linear(dim, embed_dim, bias=False)

    def pooled_index(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.pool == "argmax":
            return input_ids.argmax(-1)
        if self.pool == "eos":
            return (input_ids == self.eos_token_id).int().argmax(-1)
        if mask is None:
            return torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
        return mask.long().sum(-1).clamp(min=1) - 1

    def forward(
        self, input_ids: torch.Tensor, attention_mask_: torch.Tensor | None = None
    ) -> torch.Tensor:
        """B×L token ids (+ B×L mask) → B×embed_dim (not normalized)."""
        x = self.embed(input_ids)
        mask = attention_mask(attention_mask_, causal=True, query_len=input_ids.shape[1])
        x = self.norm(self.encoder(x, mask))
        idx = self.pooled_index(input_ids, attention_mask_)
        return self.proj(x[torch.arange(x.shape[0], device=x.device), idx])
