"""Process groups, the `--nproc` launcher, and the parallelism wrappers applied to a model.

The model code knows nothing about sharding: the trainer builds a plain recipe, then calls
`parallelize`, which applies one `apply_*` function per kind of parallelism. Data parallelism
(DDP) lives here; ZeRO, tensor parallel and MoE expert placement add their own `apply_*`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


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
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
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


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Data parallel: gradients averaged over ranks. Unused parameters are allowed because a
    task-sampling recipe runs only some heads on a step."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def parallelize(model: nn.Module, info: DistInfo) -> nn.Module:
    """The one place a plain model is wrapped for training. Returns the module to call."""
    model = model.to(info.device)
    return apply_ddp(model, info)


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
