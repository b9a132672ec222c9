"""The one place training chooses its device, precision and process-group backend.

`auto` takes CUDA when torch sees a GPU and the CPU otherwise; asking for CUDA on a machine
without one is the user's error, said in one line, not a CUDA traceback at the first tensor.
"""

from __future__ import annotations

import torch

from vlforge.errors import UserError


def pick_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N` → the device this rank trains on (`cuda` alone: the
    rank's local GPU, as torchrun numbers them)."""
    name = (requested or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = local_rank if name == "cuda" else _index(name, requested)
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {requested}: no CUDA GPU is available here (try auto or cpu)"
            )
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {requested}: GPU {index} asked, {torch.cuda.device_count()} present"
            )
        return torch.device("cuda", index)
    raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")


def _index(name: str, requested: str) -> int:
    digits = name.split(":", 1)[1]
    if not digits.isdigit():
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    return int(digits)


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--precision` on `device`; None = full fp32. `auto` is bf16 on GPUs
    that have it (Ampere and later) and fp32 elsewhere; `bf16` asks for it anywhere."""
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise UserError(f"--precision must be auto, bf16 or fp32, not {precision}")
