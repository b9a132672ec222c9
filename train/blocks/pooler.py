"""Pooler: a dense layer with an activation on one token (BERT's [CLS], ViLBERT's [IMG])."""

from __future__ import annotations

import torch
from torch import nn

from vlforge.train.blocks.mlp import activation


class Pooler(nn.Module):
    def __init__(self, dim: int, out_dim: int | None = None, act: str = "tanh"):
        super().__init__()
        self.dense = nn.Linear(dim, out_dim or dim)
        self.act = activation(act)

    def forward(self, hidden: torch.Tensor, index: int = 0) -> torch.Tensor:
        return self.act(self.dense(hidden[:, index]))
