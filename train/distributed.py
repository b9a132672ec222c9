"""Process groups, the `--nproc` launcher, and the parallelism wrappers applied to a model.

The model code knows nothing about sharding: the trainer builds a plain recipe, then calls
`parallelize`, which applies one `apply_*` function per kind of parallelism from
train/parallel/ (MoE, expert parallel, tensor parallel, ZeRO/DDP) as the run's flags ask.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from vlforge.train.device import backend_for, pick_device
from vlforge.train.parallel.config import ParallelConfig, make_ep_mesh, make_mesh
from vlforge.train.parallel.expert_parallel import apply_ep, expert_parameter_names, is_expert_param
from vlforge.train.parallel.moe import apply_moe
from vlforge.train.parallel.tensor_parallel import apply_tp
from vlforge.train.parallel.zero import apply_ddp, apply_fsdp


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Joins the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU);
    a single process when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend=backend_for(dev),
            timeout=timedelta(seconds=timeout_s),
            **({"device_id": dev} if use_cuda else {}),
        )
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Averages logged scalars over ranks (keys present on every rank)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / dist.get_world_size() for k, v in zip(keys, t.tolist(), strict=True)}


# ---------------------------------------------------------------------------------------------
# Parallelism


def parallelize(model: nn.Module, info: DistInfo, cfg: object | None = None) -> nn.Module:
    """The one place a plain model is made ready for training, from the scaling fields of `cfg`
    (a TrainConfig or ParallelConfig; None: data parallel only). In order: MoE layers replace
    MLPs, experts spread over ranks, tensor parallel shards attention and FFN linears, then data
    parallel by ZeRO stage (DDP, + ZeroRedundancyOptimizer in the trainer, FSDP2). Returns the
    module to call."""
    pcfg = ParallelConfig.of(cfg) if cfg is not None else ParallelConfig()
    pcfg.check_world(info.world_size)
    world, kind = info.world_size, info.device.type
    model = apply_moe(model, pcfg).to(info.device)
    if pcfg.ep > 1:
        ep_mesh = make_ep_mesh(kind, world, pcfg.ep)
        apply_ep(model, ep_mesh["ep"].get_group(), ep_mesh["edp"].get_group())
    dp_mesh = None
    if pcfg.tp > 1:
        mesh = make_mesh(kind, world, pcfg.tp)
        apply_tp(model, mesh["tp"])
        dp_mesh = mesh["dp"]
    if pcfg.dp_size(world) == 1:
        return model
    experts = [p for p in model.parameters() if is_expert_param(p)]
    if pcfg.zero >= 2:
        dp_mesh = dp_mesh or init_device_mesh(kind, (world,), mesh_dim_names=("dp",))
        return apply_fsdp(model, dp_mesh, pcfg.zero, ignored=set(experts) or None)
    return apply_ddp(model, info.device, expert_parameter_names(model))


def data_parallel(info: DistInfo, cfg: object | None = None) -> DistInfo:
    """This rank's place among the data-parallel ranks: tensor-parallel neighbours (consecutive
    ranks, see `make_mesh`) read the same batches and draw the same random numbers."""
    pcfg = ParallelConfig.of(cfg) if cfg is not None else ParallelConfig()
    pcfg.check_world(info.world_size)
    tp = pcfg.tp
    return replace(info, rank=info.rank // tp, world_size=info.world_size // tp)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# ---------------------------------------------------------------------------------------------
# --nproc: launch local ranks with torchrun


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_local(nproc: int, argv: list[str]) -> int:
    """Runs `vlforge ARGV` as `nproc` ranks on this machine under torchrun; returns its exit code."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1",
        f"--master-port={free_port()}",
        "-m",
        "vlforge.cli",
        *argv,
    ]
    env = dict(os.environ)
    # Each rank gets its share of the cores, so N ranks do not oversubscribe the machine.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.run(cmd, env=env, check=False).returncode
