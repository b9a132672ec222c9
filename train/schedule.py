"""Learning-rate schedules: linear warmup, then cosine or linear decay over the total steps.

The total is fixed up front (`--total-steps`), so a run stopped early and resumed follows the same
curve. The factor is a pure function of the step; the scheduler's state is just its step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class WarmupDecay:
    """Multiplier of the base lr at a step (a picklable callable, so LambdaLR can save it)."""

    warmup: int
    total: int
    kind: str = "cosine"
    min_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.kind == "cosine":
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "linear":
            decay = 1.0 - progress
        else:
            raise ValueError(f"schedule must be one of {SCHEDULES}, not {self.kind!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: str,
    warmup: int,
    total: int,
    min_ratio: float = 0.0,
) -> LambdaLR:
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, not {kind!r}")
    return LambdaLR(optimizer, WarmupDecay(warmup, total, kind, min_ratio))
