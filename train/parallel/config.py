"""The scaling flags of a run (`--zero`, `--tp`, `--moe`, `--ep`, …), their checks and meshes.

Flags that cannot work end in one `UserError` line before anything is built: `check` tests what
the flags alone decide, `check_world` what needs the world size, and the `apply_*` functions what
needs the model (e.g. `--tp` against each attention's heads).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from vlforge.errors import UserError

ROUTERS = ("topk", "gshard", "switch")
# top-k of each router: Shazeer's noisy top-k takes --top-k (default 2); GShard is top-2 and
# Switch top-1 by definition.
DEFAULT_TOP_K = {"topk": 2, "gshard": 2, "switch": 1}
# Capacity factor when none is given: Switch's training default 1.25; GShard's 2N/E per expert
# (factor 1 of top-2 assignments); Shazeer's noisy top-k had no capacity limit (None).
DEFAULT_CAPACITY = {"topk": None, "gshard": 1.0, "switch": 1.25}


@dataclass(frozen=True)
class ParallelConfig:
    zero: int = 0  # 0 DDP, 1 + sharded optimizer, 2 + sharded gradients, 3 + sharded parameters
    tp: int = 1  # tensor-parallel ranks
    ep: int = 1  # expert-parallel ranks
    moe: str | None = None  # topk | gshard | switch
    experts: int = 8
    top_k: int | None = None
    capacity_factor: float | None = None
    moe_every: int = 1  # MLPs n-1, 2n-1, … (0-based, module order) become MoE layers
    z_loss: float = 0.0  # Switch: ST-MoE's router z-loss weight (0.001 there); 0 = off

    @classmethod
    def of(cls, obj: Any) -> ParallelConfig:
        """The scaling fields of any object that has them (a TrainConfig); absent ones default."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls) if hasattr(obj, f.name)})

    @property
    def k(self) -> int:
        assert self.moe is not None
        return self.top_k if self.top_k is not None else DEFAULT_TOP_K[self.moe]

    @property
    def capacity(self) -> float | None:
        assert self.moe is not None
        return self.capacity_factor if self.capacity_factor else DEFAULT_CAPACITY[self.moe]

    @property
    def sharded(self) -> bool:
        """Whether a forward pass needs every rank (collectives inside the model)."""
        return self.zero >= 2 or self.tp > 1 or self.ep > 1

    def check(self) -> None:
        """What the flags alone decide."""
        if self.zero not in (0, 1, 2, 3):
            raise UserError(f"--zero must be 0, 1, 2 or 3, not {self.zero}")
        for name in ("tp", "ep", "moe_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1")
        if self.moe is None:
            if self.ep > 1:
                raise UserError("--ep needs --moe (experts to spread over ranks)")
            return
        if self.moe not in ROUTERS:
            raise UserError(f"--moe must be one of {', '.join(ROUTERS)}, not {self.moe}")
        if self.experts < 2:
            raise UserError("--experts must be at least 2")
        if self.top_k is not None and self.top_k != DEFAULT_TOP_K[self.moe] and self.moe != "topk":
            raise UserError(f"--moe {self.moe} routes to {DEFAULT_TOP_K[self.moe]} expert(s); "
                            "--top-k applies to --moe topk")  # fmt: skip
        if not 1 <= self.k <= self.experts:
            raise UserError(f"--top-k must be between 1 and --experts ({self.experts})")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise UserError("--capacity-factor must be positive")
        if self.experts % self.ep:
            raise UserError(f"--ep {self.ep} does not divide --experts {self.experts}")

    def check_world(self, world: int) -> None:
        """What needs the number of ranks."""
        self.check()
        if world % self.tp:
            raise UserError(f"--tp {self.tp} does not divide the {world} ranks")
        if world % self.ep:
            raise UserError(f"--ep {self.ep} does not divide the {world} ranks")
        if self.tp > 1 and self.zero < 2 and world > self.tp:
            raise UserError(
                f"--tp {self.tp} on {world} ranks shards data over a {world // self.tp}×{self.tp} "
                "mesh with FSDP2: use --zero 2 or 3 (or --tp equal to the ranks)"
            )
        if self.tp > 1 and self.ep > 1:
            raise UserError("--ep and --tp together are not supported; pick one")
        if self.ep > 1 and self.zero == 1:
            raise UserError("--zero 1 shards the optimizer over all ranks and cannot hold "
                            "rank-local experts; use --zero 0, 2 or 3 with --ep")  # fmt: skip

    def dp_size(self, world: int) -> int:
        """Data-parallel ranks: tensor-parallel ranks share one batch."""
        return world // self.tp


def make_mesh(device_type: str, world: int, tp: int) -> DeviceMesh:
    """A (dp, tp) mesh; tp-rank neighbours are consecutive ranks (one node's GPUs on NCCL)."""
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


def make_ep_mesh(device_type: str, world: int, ep: int) -> DeviceMesh:
    """An (edp, ep) mesh: `ep` consecutive ranks hold all experts between them; `edp` replicas."""
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))
