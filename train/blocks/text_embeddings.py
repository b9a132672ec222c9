"""Text embeddings: word + learned position (+ segment), optionally LayerNorm'd (BERT) or not
(CLIP's text tower normalizes inside its pre-LN layers instead)."""

from __future__ import annotations

import torch
from torch import nn


class TextEmbeddings(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        max_len: int = 512,
        type_vocab: int = 2,
        norm: bool = True,
        eps: float = 1e-12,
        dropout: float = 0.0,
        pad_id: int | None = 0,
    ):
        super().__init__()
        self.word = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.position = nn.Embedding(max_len, dim)
        # Segment embeddings: single-stream models also use them for the image part (type 1).
        self.token_type = nn.Embedding(type_vocab, dim) if type_vocab else None
        self.norm = nn.LayerNorm(dim, eps=eps) if norm else None
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        word_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`word_embeds` (B×L×dim) stand in for `word(input_ids)`: adversarial training perturbs
        the word vectors before position, segment and norm (VILLA's `txt_emb`)."""
        n = input_ids.shape[1]
        if n > self.position.num_embeddings:
            raise ValueError(f"text of {n} tokens exceeds {self.position.num_embeddings} positions")
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device)[None]
        words = self.word(input_ids) if word_embeds is None else word_embeds
        x = words + self.position(position_ids)
        if self.token_type is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.drop(x)
