"""ZeRO stages with torch.distributed's own wrappers (Rajbhandari et al. 2020).

stage 0: DDP — every rank holds parameters, gradients and optimizer state in full.
stage 1: DDP + `ZeroRedundancyOptimizer` — optimizer state split over ranks.
stage 2: parameters replicated, gradients and optimizer state sharded. Built on FSDP2:
         `fully_shard(reshard_after_forward=False)` reduce-scatters each gradient to its shard in
         backward (so the optimizer, holding the sharded parameters, keeps 1/N of the state) and
         keeps the gathered parameters from forward to backward; and after every optimizer step
         the updated shards are all-gathered again, so the whole parameters stay on every rank
         between steps, as DeepSpeed's stage 2 all-gathers after its step. One all-gather and
         one reduce-scatter per step, no all-gather in backward. (FSDP2 alone would free the
         gathered parameters after backward: sharded at rest, which is stage 3's memory with
         stage 2's communication.) The gathered copies are freed from the end of backward to
         the step — the optimizer updates the shards — and, with gradient accumulation, each
         micro-batch's forward gathers again.
stage 3: FSDP2 `fully_shard` — parameters resharded after forward too, gathered per layer.
FSDP2 shards each element of the model's layer lists (transformer layers, co-attention layers, …)
as its own unit, then the root, so only one layer's parameters are whole at a time (stage 3).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.optim.optimizer import register_optimizer_step_post_hook

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
    if stage == 2:
        _STAGE2[model] = frozenset(id(p) for p in model.parameters())
        _register_regather_hook()
    return model


# Stage-2 models and the ids of their sharded parameters (what their optimizer steps). The
# trainer builds the optimizer after sharding, so the re-gather hangs on torch's global
# optimizer step hook, filtered to the optimizers that hold these parameters.
_STAGE2: weakref.WeakKeyDictionary[nn.Module, frozenset[int]] = weakref.WeakKeyDictionary()
_HOOK: list[Any] = []


def gather_parameters(model: nn.Module) -> None:
    """All-gathers every FSDP2 unit's parameters of `model` (each rank, the same order) and
    leaves them gathered: the next forward's own gather is then a no-op."""
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.unshard()


def _regather_after_step(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    if not _STAGE2:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for model, ids in list(_STAGE2.items()):
        if ids & stepped:
            gather_parameters(model)


def _register_regather_hook() -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_regather_after_step))


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
