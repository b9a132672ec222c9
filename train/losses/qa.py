"""Image question answering over a fixed answer vocabulary (LXMERT's pretraining QA task).

The head is LXMERT's (HF `LxmertVisualAnswerHead`): Linear(h, 2h) → GeLU → LayerNorm → Linear to
the answers, on the pooled cross-modal state. The loss is cross-entropy on the rows that carry a
question; the others are labelled IGNORE and contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.mlp import activation

IGNORE = -100


class AnswerHead(nn.Module):
    def __init__(self, dim: int, num_answers: int, act: str = "gelu", eps: float = 1e-12):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(2 * dim, eps=eps)
        self.fc2 = nn.Linear(2 * dim, num_answers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(pooled))))


def qa_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over rows with an answer; 0 (still in the graph) when none has one."""
    if not bool((labels != ignore).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore)
