"""LXMERT's visual feature encoder: LayerNorm(FC(feat)) and LayerNorm(FC(box)) averaged.

Unlike `RegionEmbeddings` (a sum, then one LayerNorm), the two normalized parts are averaged and
not normalized again (HF `LxmertVisualFeatureEncoder`); the box is LXMERT's 4-d xyxy in 0..1.

Regions whose features the data side zeroed for masking would reach the feature LayerNorm as a
constant vector (FC(0) = its bias, all zeros at init), with gradients ~1/√eps; as in
`RegionEmbeddings`, `mask_embedding=True` adds a learned vector to them. Every all-zero region
gets it, not only those a loss reads: LXMERT's matching negatives keep their zeroed regions but
drop them from the loss, and detector features are never exactly zero (padding is, and is never
attended to). Inputs with real features — and so HF parity — are unaffected.
"""

from __future__ import annotations

import torch
from torch import nn


class MeanRegionEmbeddings(nn.Module):
    def __init__(
        self,
        feat_dim: int,
        geom_dim: int,
        dim: int,
        eps: float = 1e-12,
        dropout: float = 0.0,
        mask_embedding: bool = False,
    ):
        super().__init__()
        self.mask = nn.Parameter(torch.randn(feat_dim) * 0.02) if mask_embedding else None
        self.feat = nn.Linear(feat_dim, dim)
        self.feat_norm = nn.LayerNorm(dim, eps=eps)
        self.box = nn.Linear(geom_dim, dim)
        self.box_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, feats: torch.Tensor, geom: torch.Tensor) -> torch.Tensor:
        """feats B×R×D, geom B×R×G → B×R×dim."""
        if self.mask is not None:
            zeroed = (feats == 0).all(-1, keepdim=True).to(feats.dtype)
            feats = feats + zeroed * self.mask.to(feats.dtype)
        x = self.feat_norm(self.feat(feats)) + self.box_norm(self.box(geom))
        return self.drop(x / 2)
