"""Masked region classification: hard labels (MRC) and KL to the detector's distribution (MRC-KL).

Class convention (DESIGN.md hazard): `region_cls_prob` keeps the detector's background column 0
and the head predicts all C columns. The hard label is the argmax over the object columns 1..C-1
(background is never a target) and stays in the full column space, as UNITER does
(`argmax(cls_prob[:, 1:]) + 1`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.mlp import activation


class RegionClassifier(nn.Module):
    """dense → activation → LayerNorm → C-way classifier (UNITER's and ViLBERT's region head)."""

    def __init__(self, dim: int, num_classes: int, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, num_classes)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


def hard_region_labels(cls_prob: torch.Tensor) -> torch.Tensor:
    """N×C detector distribution → N class ids in 1..C-1 (background column 0 excluded)."""
    return cls_prob[..., 1:].argmax(-1) + 1


def mrc_loss(logits: torch.Tensor, cls_prob: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the detector's top object class; logits and cls_prob N×C (masked only)."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), hard_region_labels(cls_prob))


def mrc_kl_loss(logits: torch.Tensor, cls_prob: torch.Tensor) -> torch.Tensor:
    """KL(detector ‖ model) summed over classes, averaged over the N masked regions."""
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = F.log_softmax(logits.float(), -1)
    return F.kl_div(logp, cls_prob.float(), reduction="none").sum(-1).mean()
