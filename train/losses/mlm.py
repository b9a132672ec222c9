"""Masked language modeling: BERT's prediction head and the cross-entropy on masked tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlforge.train.blocks.mlp import activation

IGNORE = -100  # label of tokens that are not predicted (the data side's convention)


class MLMHead(nn.Module):
    """dense → activation → LayerNorm → vocabulary decoder (tied to the word embeddings when
    given, as BERT) + its own bias."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        act: str = "gelu",
        eps: float = 1e-12,
        tie_to: nn.Embedding | None = None,
    ):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = activation(act)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.decoder = nn.Linear(dim, vocab_size)
        if tie_to is not None:
            if tie_to.weight.shape != self.decoder.weight.shape:
                raise ValueError("tied decoder and word embeddings differ in shape")
            self.decoder.weight = tie_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


def masked_select(
    hidden: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N×H hidden states, N labels) of the predicted positions only: the vocabulary projection
    then runs on ~15% of the tokens instead of all (UNITER does the same)."""
    keep = labels != ignore
    return hidden[keep], labels[keep]


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE) -> torch.Tensor:
    """Mean cross-entropy over predicted tokens; logits …×V, labels … (ignore = not predicted).

    A batch with nothing to predict gives 0 (still connected to the graph) instead of NaN.
    """
    logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    if not bool((labels != ignore).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), labels, ignore_index=ignore)
