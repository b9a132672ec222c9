"""Masked region feature regression: predict the detector's features of masked regions (L2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.mlp import activation


class RegionFeatureRegressor(nn.Module):
    """dense → activation → LayerNorm → linear to the feature width (UNITER's MRFR head)."""

    def __init__(self, dim: int, feat_dim: int, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.out = nn.Linear(dim, feat_dim)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.act(self.dense(hidden))))


def mrfr_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked regions' feature elements (N×D each)."""
    if pred.shape[0] == 0:
        return pred.sum() * 0.0
    return F.mse_loss(pred.float(), target.float())
