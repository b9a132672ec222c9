"""Image-text matching: a 2-way classifier on the fused pooled representation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ITMHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


def itm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of B×2 logits against labels (1 matched, 0 not)."""
    return F.cross_entropy(logits.float(), labels.long())


def itm_score(logits: torch.Tensor) -> torch.Tensor:
    """The matched-vs-not log-odds: > 0 ⇔ the head predicts a match (what eval ranks by)."""
    return logits[..., 1] - logits[..., 0]
