"""Megatron-style tensor parallelism with DTensor's `parallelize_module`, planned from types.

Every `Attention` (train/blocks/attention.py) gets q, k, v column-parallel and its output
projection row-parallel; every `MLP` (including MoE experts) fc1 column-parallel and fc2
row-parallel. Each rank then computes heads/tp heads and hidden/tp FFN units, and the row-parallel
linears all-reduce their outputs, so one attention or MLP costs one all-reduce forward and one
backward. The only change to the model is each Attention's `heads`, set to its local count, the
same thing torchtitan does to its attention modules.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from vlforge.errors import UserError
from vlforge.train.blocks.attention import Attention
from vlforge.train.blocks.mlp import MLP


def tp_plan(model: nn.Module, tp: int) -> dict[str, ParallelStyle]:
    """{submodule name: style} for every Attention and MLP; UserError when one does not split."""
    plan: dict[str, ParallelStyle] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, Attention):
            if m.heads % tp:
                raise UserError(f"--tp {tp} does not divide the {m.heads} heads of {name}")
            plan |= {f"{prefix}{p}": ColwiseParallel() for p in ("q", "k", "v")}
            plan[f"{prefix}o"] = RowwiseParallel()
        elif isinstance(m, MLP):
            if m.fc1.out_features % tp:
                raise UserError(
                    f"--tp {tp} does not divide the {m.fc1.out_features} FFN units of {name}"
                )
            plan[f"{prefix}fc1"] = ColwiseParallel()
            plan[f"{prefix}fc2"] = RowwiseParallel()
    return plan


def apply_tp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shards the model's attention and FFN linears over `mesh` (1-D, the tp dimension)."""
    tp = mesh.size()
    if tp == 1:
        return model
    plan = tp_plan(model, tp)
    for m in model.modules():
        if isinstance(m, Attention):
            m.heads //= tp  # q/k/v outputs now hold this rank's heads only
    return parallelize_module(model, mesh, plan)
