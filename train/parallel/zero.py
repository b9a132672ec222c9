"""ZeRO stages with torch.distributed's own wrappers (Rajbhandari et al. 2020).

stage 0: DDP — every rank holds parameters, gradients and optimizer state in full.
stage 1: DDP + `ZeroRedundancyOptimizer` — optimizer state split over ranks.
stage 2: FSDP2 `fully_shard(reshard_after_forward=False)` — gradients (and state) sharded;
         parameters stay gathered from forward to backward, so backward re-gathers nothing.
stage 3: FSDP2 `fully_shard` — parameters resharded after forward too.
FSDP2 shards each element of the model's layer lists (transformer layers, co-attention layers, …)
as its own unit, then the root, so only one layer's parameters are whole at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from vlforge.train.parallel.moe import MoE


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards on their own, children before parents: each element of every
    ModuleList outside an MoE layer (whose experts may be rank-local)."""
    inside_moe = {id(x) for m in model.modules() if isinstance(m, MoE) for x in m.modules()}
    units = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and id(m) not in inside_moe:
            units += [x for x in m if any(True for _ in x.parameters())]
    return units[::-1]


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, stage: int, ignored: set[nn.Parameter] | None = None
) -> nn.Module:
    """ZeRO-2/3 over the data-parallel `mesh` (1-D; with tensor parallel, the dp dimension)."""
    reshard = stage == 3
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, ignored_params=ignored)
    return model


def apply_ddp(
    model: nn.Module, device: torch.device, ignored_names: list[str] | None = None
) -> nn.Module:
    """Data parallel: gradients averaged over ranks. Unused parameters are allowed because a
    task-sampling recipe runs only some heads on a step. `ignored_names` (rank-local expert
    parameters) are left out of the all-reduce."""
    if ignored_names:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored_names)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def zero_optimizer(
    groups: list[dict[str, Any]], optimizer_class: type[torch.optim.Optimizer], **defaults: Any
) -> ZeroRedundancyOptimizer:
    """ZeRO-1: each rank keeps the state of and updates its share of the parameters, then
    broadcasts them."""
    return ZeroRedundancyOptimizer(groups, optimizer_class=optimizer_class, **defaults)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ZeRO-1's inner one, else itself."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
