"""Checkpoints with torch.distributed.checkpoint: model, optimizer, scheduler, RNG and data position.

Layout under the run directory:
    checkpoints/step_00000100/   one DCP checkpoint (written as .tmp-…, renamed when complete)
    checkpoints/latest           the name of the newest complete one

Model and optimizer go through DCP's `get_state_dict`/`set_state_dict`, so sharded models (FSDP2,
tensor parallel, rank-local experts) save and reshard without this file knowing; ZeRO-1 saves each
rank's inner optimizer, whose entries are named by parameter, so the union of the ranks' files is
the whole state and any rank count loads what its own share needs. Everything else — step, scheduler,
every rank's RNG states and loader positions — is one JSON string, identical on all ranks, so DCP's
deduplication keeps one copy and loading it needs no unpickling. DCP's own loader unpickles
non-tensor items with `weights_only=False`; `SafeLoadPlanner` loads them with `weights_only=True`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from vlforge.errors import UserError
from vlforge.train.parallel.zero import local_optimizer

# Optimizer entries keyed by parameter name, hyperparameters included ("param_groups.{fqn}.lr"):
# ranks that each hold part of the optimizer (ZeRO-1) write disjoint keys that add up to the
# whole, where the nested form's per-group parameter lists would collide.
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every call without a process group that it assumes one process: we know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _safe_dcp_load(state: dict[str, Any], path: str | Path, partial: bool = False) -> None:
    """dcp.load with SafeLoadPlanner; its failures (a BaseException) become one-line UserErrors."""
    try:
        planner = SafeLoadPlanner(allow_partial_load=partial)
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), planner=planner, no_dist=not _dist())
    except CheckpointException as exn:
        causes = [f[0] if isinstance(f, tuple) else f for f in exn.failures.values()]
        first = str(causes[0]).strip().splitlines()[0] if causes else "unknown error"
        raise UserError(f"checkpoint {path} cannot be loaded: {first}") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item, value) -> None:  # type: ignore[override]
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rng_state() -> dict[str, Any]:
    """This process's RNG states as JSON-able values."""

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

    state = {
        "torch": b64(torch.get_rng_state()),
        "python": _lists(random.getstate()),
        "numpy": _lists(np.random.get_state(legacy=True)),
    }
    if torch.cuda.is_available():
        state["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
    random.setstate(_tuples(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _lists(x: Any) -> Any:
    """Tuples and arrays → lists, numpy scalars → Python numbers (JSON-able)."""
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, list | tuple):
        return [_lists(v) for v in x]
    return x.item() if isinstance(x, np.generic) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if not _dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    pointer = checkpoint_dir(out) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_dir(out) / pointer.read_text().strip()
    return path if (path / ".metadata").is_file() else None


def save_checkpoint(
    out: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Collective: every rank calls it. `trainer_state` is this rank's JSON-able state; the saved
    record holds all ranks' in rank order."""
    ckdir = checkpoint_dir(out)
    name = f"step_{step:08d}"
    final, tmp = ckdir / name, ckdir / f".tmp-{name}"
    rank = dist.get_rank() if _dist() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if _dist():
        dist.barrier()
    model_sd, optim_sd = get_state_dict(model, local_optimizer(optimizer), options=FLAT)
    record = json.dumps({"step": step, "ranks": gather(trainer_state)}, sort_keys=True)
    state = {"model": model_sd, "optim": optim_sd, "trainer": record}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _dist())
    if _dist():
        dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = ckdir / ".latest.tmp"
        pointer_tmp.write_text(name + "\n")
        os.replace(pointer_tmp, ckdir / "latest")
        for old in sorted(ckdir.glob("step_*"))[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    if _dist():
        dist.barrier()
    return final


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restores model and optimizer in place; returns {"step", "state": this rank's state,
    "world_size": ranks that saved it, "ranks": every rank's state}."""
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    optimizer = local_optimizer(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
    missing = [k for k in model_sd if f"model.{k}" not in saved]
    if missing:
        raise UserError(f"checkpoint {path} lacks model weights such as {missing[0]}")
    state = {"model": model_sd, "optim": optim_sd, "trainer": ""}
    # Parameters that had no gradient yet (a task not sampled so far) have no optimizer state in
    # the checkpoint, while get_state_dict initialises state for all: load what exists, then
    # drop the rest so Adam's step count for them starts at 0 again, as in the unbroken run.
    _safe_dcp_load(state, path, partial=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=FLAT,
    )
    for name, param in model.named_parameters():
        fqn = name.removeprefix("module.")
        if param in optimizer.state and not any(k.startswith(f"optim.state.{fqn}.") for k in saved):
            del optimizer.state[param]
    record = json.loads(state["trainer"])
    ranks = record["ranks"]
    rank = dist.get_rank() if _dist() else 0
    return {
        "step": int(record["step"]),
        "state": ranks[rank] if rank < len(ranks) else None,
        "world_size": len(ranks),
        "ranks": ranks,
    }


def load_model_weights(path: str | Path, model: torch.nn.Module) -> None:
    """Only the model's weights (evaluation); the optimizer's entries are left unread."""
    if not (Path(path) / ".metadata").is_file():
        raise UserError(f"not a checkpoint: {path}")
    sd = get_model_state_dict(model)
    state = {"model": sd}
    _safe_dcp_load(state, path)
    set_model_state_dict(model, state["model"])
