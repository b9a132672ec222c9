"""Expert parallelism: each of `ep` ranks holds E/ep experts; tokens travel by all-to-all.

Every rank routes its own tokens, sends each kept (token, expert) pair to the rank holding that
expert (`all_to_all_single_autograd`, variable split sizes, after one all-to-all of the counts),
runs its local experts on what arrives, and sends the results back the same way. Backward runs
the same exchanges in reverse, so an expert's gradient sums every rank's tokens; the DP
wrappers skip expert parameters (they differ per rank), and a gradient hook averages them over
the world like DDP would (all-reduced first over `edp` replicas when ep < world).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from vlforge.train.parallel.moe import MoE, moe_layers

EP_GROUP_ATTR = "_vlforge_ep_group"  # on expert parameters: the group their grad norm spans


class ExpertParallel:
    """The all-to-all dispatch of one MoE layer (a plain callable, not a submodule)."""

    def __init__(self, group: dist.ProcessGroup, num_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.local = num_experts // self.size
        self.num_experts = num_experts

    def local_experts(self) -> range:
        return range(self.rank * self.local, (self.rank + 1) * self.local)

    def __call__(
        self, x: torch.Tensor, tokens: torch.Tensor, experts: torch.Tensor, modules: nn.ModuleDict
    ) -> torch.Tensor:
        """Expert outputs for the (token, expert) pairs grouped by expert, in their order."""
        counts = torch.bincount(experts, minlength=self.num_experts)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        send = counts.view(self.size, self.local).sum(1).tolist()
        recv_by_src = recv_counts.view(self.size, self.local)
        recv = recv_by_src.sum(1).tolist()
        arrived = funcol.all_to_all_single_autograd(x[tokens], recv, send, self.group)
        # Arrivals are source-major, then by local expert: regroup them by expert, run each
        # local expert (even on no rows, so every rank's backward has the same collectives).
        which = torch.arange(self.local, device=x.device).repeat(self.size)
        which = which.repeat_interleave(recv_by_src.reshape(-1))
        order = torch.sort(which, stable=True).indices
        sizes = torch.bincount(which, minlength=self.local).tolist()
        first = self.rank * self.local
        parts = [
            modules[str(first + j)](rows) for j, rows in enumerate(arrived[order].split(sizes))
        ]
        done = torch.empty_like(arrived).index_copy(0, order, torch.cat(parts))
        return funcol.all_to_all_single_autograd(done, send, recv, self.group)


def is_expert_param(p: torch.Tensor) -> bool:
    return hasattr(p, EP_GROUP_ATTR)


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names of the rank-local expert parameters (after `apply_ep`)."""
    return [name for name, p in model.named_parameters() if is_expert_param(p)]


def apply_ep(
    model: nn.Module, ep_group: dist.ProcessGroup, edp_group: dist.ProcessGroup | None
) -> nn.Module:
    """Keeps each MoE layer's local experts, installs the all-to-all dispatch, and averages expert
    gradients over the world (summed over `edp_group` replicas first)."""
    world = dist.get_world_size()
    edp = edp_group if edp_group is not None and dist.get_world_size(edp_group) > 1 else None

    def average(grad: torch.Tensor) -> torch.Tensor:
        if edp is not None:
            grad = grad.clone()
            dist.all_reduce(grad, group=edp)
        return grad / world

    for layer in moe_layers(model):
        ep = ExpertParallel(ep_group, layer.num_experts)
        keep = {str(e) for e in ep.local_experts()}
        for key in list(layer.experts.keys()):
            if key not in keep:
                del layer.experts[key]
        layer.expert_parallel = ep
        for p in layer.experts.parameters():
            setattr(p, EP_GROUP_ATTR, ep_group)
            p.register_hook(average)
    return model


__all__ = ["MoE", "apply_ep", "expert_parameter_names", "is_expert_param"]
