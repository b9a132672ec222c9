"""Gradient-norm clipping over sharded gradients (DTensor shards, rank-local experts).

A DTensor's squared norm is reduced over its mesh by `full_tensor()`; a rank-local expert's is
all-reduced over its expert-parallel group; a replicated plain tensor counts once. Unsharded
models take `torch.nn.utils.clip_grad_norm_` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from vlforge.train.parallel.expert_parallel import EP_GROUP_ATTR


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scales gradients so their global L2 norm is at most `max_norm`; returns the norm."""
    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p, DTensor) or hasattr(p, EP_GROUP_ATTR) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    total = torch.zeros((), dtype=torch.float64)
    by_group: dict[dist.ProcessGroup, torch.Tensor] = {}
    for p in params:
        sq = p.grad.detach().float().pow(2).sum()
        if isinstance(sq, DTensor):
            sq = sq.full_tensor()
        sq = sq.to("cpu", torch.float64)
        group = getattr(p, EP_GROUP_ATTR, None)
        if group is None:
            total += sq
        else:
            by_group[group] = by_group.get(group, torch.zeros((), dtype=torch.float64)) + sq
    for group, sq in by_group.items():
        dist.all_reduce(sq, group=group)
        total += sq
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        with torch.no_grad():
            for p in params:
                p.grad.mul_(coef)
    return norm
