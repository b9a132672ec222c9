"""Per-rank bytes of parameters, gradients and optimizer state: what ZeRO shards.

Counts each rank's own storage: a DTensor's local shard, ZeRO-1's inner optimizer's state,
rank-local experts. Measured between steps: ZeRO-3 holds parameters sharded then, ZeRO-2 whole.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vlforge.train.parallel.zero import local_optimizer


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def rank_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """{"param_bytes", "grad_bytes", "optim_bytes"} held by this rank."""
    params = list(model.parameters())  # shared (tied) parameters once
    # Gradients of the parameters the optimizer updates: ZeRO-2 holds them on its sharded
    # parameters while the model's own are the gathered ones (train/parallel/zero.py).
    stepped = (
        [p for g in optimizer.param_groups for p in g["params"]]
        if optimizer is not None
        else params
    )
    out = {
        "param_bytes": sum(_bytes(p) for p in params),
        "grad_bytes": sum(_bytes(p.grad) for p in stepped if p.grad is not None),
        "optim_bytes": 0,
    }
    if optimizer is not None:
        state = local_optimizer(optimizer).state
        out["optim_bytes"] = sum(
            _bytes(v) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)
        )
    return out
