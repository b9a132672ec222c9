"""Segment-aware single-stream embeddings (VisualBERT, ImageBERT): text and visual tokens of one
sequence, each with its own segment and position tables, through one LayerNorm.

Text: word + position + segment (a `TextEmbeddings` without its norm). Visual: a projection of the
region features (+ a projection of the box geometry when the recipe reads one) + a visual segment
embedding (segment 1 unless given: HF VisualBert's `visual_token_type_ids`) + a visual position
embedding (position 0 for every region: regions have no order, as HF VisualBert without
`image_text_alignment`). HF's VisualBertEmbeddings LayerNorms the concatenation; a LayerNorm acts
per token, so normalizing the two parts apart is the same computation.
"""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.text_embeddings import TextEmbeddings

IMAGE_SEGMENT = 1


class SegmentEmbeddings(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        dim: int,
        feat_dim: int,
        geom_dim: int = 0,
        max_len: int = 512,
        type_vocab: int = 2,
        eps: float = 1e-12,
        dropout: float = 0.0,
        pad_id: int | None = 0,
    ):
        super().__init__()
        if type_vocab <= IMAGE_SEGMENT:
            raise ValueError(f"segment embeddings need type_vocab ≥ 2, not {type_vocab}")
        self.text = TextEmbeddings(vocab_size, dim, max_len, type_vocab, norm=False, pad_id=pad_id)
        self.visual = nn.Linear(feat_dim, dim)
        self.geom = nn.Linear(geom_dim, dim) if geom_dim else None
        self.visual_type = nn.Embedding(type_vocab, dim)
        self.visual_position = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def embed_text(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B×L ids → B×L×H (segment 0 unless `token_type_ids` says otherwise)."""
        return self.drop(self.norm(self.text(input_ids, token_type_ids, position_ids)))

    def embed_regions(
        self,
        feats: torch.Tensor,
        geom: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """B×R×D features (+ B×R×G geometry) → B×R×H visual tokens."""
        x = self.visual(feats)
        if self.geom is not None:
            if geom is None:
                raise ValueError("these region embeddings need region_geom")
            x = x + self.geom(geom)
        shape = feats.shape[:2]
        if token_type_ids is None:
            token_type_ids = torch.full(shape, IMAGE_SEGMENT, dtype=torch.long, device=x.device)
        if position_ids is None:
            position_ids = torch.zeros(shape, dtype=torch.long, device=x.device)
        x = x + self.visual_type(token_type_ids) + self.visual_position(position_ids)
        return self.drop(self.norm(x))
