"""The data stream and the loss curve do not depend on the rank count (issue 18).

Global batch t is a pure function of (seed, t, batch size, streams): the keys of every global
batch are the same for 1, 2 and 3 ranks and 0, 1 or 2 loader workers, a checkpoint taken at one
rank count resumes at another on the same stream, and a two-rank run (DDP, ZeRO-1, ZeRO-3)
logs the loss curve of one process accumulating the same two micro-batches per step.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tests.test_train_data import keys_assembler, make_shards
from tests.test_trainer import curve, tiny_builder
from vlforge.errors import UserError
from vlforge.train import trainer
from vlforge.train.data import Loader, StreamConfig, expand_shards
from vlforge.train.distributed import free_port

BATCH, STEPS = 12, 7


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> StreamConfig:
    pattern = make_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=9)
    return StreamConfig(tuple(expand_shards(pattern)), seed=3, shuffle_buffer=8, units_per_chunk=2)


def global_batches(
    cfg: StreamConfig,
    ranks: int,
    workers: int = 0,
    steps: int = STEPS,
    accum: int = 1,
    states: list | None = None,
) -> tuple[list[list[str]], list[dict]]:
    """Keys of each global batch (rank 0's micro-batches, then rank 1's, …) and every rank's
    loader state after `steps` steps."""
    per_rank, saved = [], []
    for rank in range(ranks):
        loader = Loader(
            cfg, keys_assembler, BATCH, num_workers=workers, rank=rank, world_size=ranks,
            grad_accum=accum, state=states,
        )  # fmt: skip
        it = iter(loader)
        per_rank.append([[k for _ in range(accum) for k in next(it)["keys"]] for _ in range(steps)])
        saved.append(json.loads(json.dumps(loader.state_dict())))  # as a checkpoint holds it
    return [[k for r in per_rank for k in r[t]] for t in range(steps)], saved


def test_global_batches_do_not_depend_on_ranks_or_workers(stream):
    reference, _ = global_batches(stream, 1)
    assert all(len(b) == BATCH for b in reference)
    assert len({k for b in reference for k in b}) > BATCH  # the stream moves on
    for ranks, workers, accum in [(2, 0, 1), (3, 0, 1), (1, 2, 1), (2, 1, 1), (3, 2, 1), (2, 2, 2)]:
        batches, _ = global_batches(stream, ranks, workers, accum=accum)
        assert batches == reference, (ranks, workers, accum)  # same samples, same order


def test_ranks_read_disjoint_streams(stream):
    """Streaming: with N dividing the stream count, each rank reads its own streams only."""
    owned = [
        set(Loader(stream, keys_assembler, BATCH, rank=r, world_size=3).positions) for r in range(3)
    ]
    assert [len(o) for o in owned] == [4, 4, 4] and not (owned[0] & owned[1] | owned[1] & owned[2])


@pytest.mark.parametrize("before,after", [(2, 1), (1, 3), (3, 2)])
def test_resume_at_another_rank_count_continues_the_stream(stream, before, after):
    whole, _ = global_batches(stream, 1, steps=STEPS)
    head, states = global_batches(stream, before, workers=1, steps=3)
    tail, _ = global_batches(stream, after, workers=2, steps=STEPS - 3, states=states)
    assert head + tail == whole


def test_micro_batch_randomness_is_per_position(stream):
    """The RNG of a micro-batch and its forward seed come from (step, first global position)."""

    def draws(samples, rng, shared):
        return {"keys": [s["__key__"] for s in samples], "r": rng.random(), "t": shared.random()}

    one = Loader(stream, draws, BATCH, grad_accum=2)
    two = [Loader(stream, draws, BATCH, rank=r, world_size=2) for r in range(2)]
    a, b = iter(one), [iter(x) for x in two]
    for _ in range(3):
        x, y = [next(a), next(a)], [next(b[0]), next(b[1])]
        assert x == y
        assert x[0]["t"] == x[1]["t"] and x[0]["r"] != x[1]["r"]  # one task per step
        assert x[0]["_seed"] != x[1]["_seed"]


def test_bad_layouts_are_user_errors(stream):
    with pytest.raises(UserError, match="split"):
        Loader(stream, keys_assembler, BATCH, streams=5)
    with pytest.raises(UserError, match="split"):
        Loader(stream, keys_assembler, BATCH, world_size=5)
    with pytest.raises(UserError, match="at least 0"):
        Loader(stream, keys_assembler, BATCH, streams=-1)


# ---------------------------------------------------------------------------------------------
# Loss curves: two ranks against one process


def _run_worker(rank: int, world: int, port: int, shards: str, out: str, extra: dict) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer.build_recipe = tiny_builder  # this process's copy of the module
    cfg = trainer.TrainConfig(
        recipe="tiny", shards=shards, out=out, batch_size=8, lr=3e-3, workers=0, log_every=1,
        progress=False, vocab_size=200, shuffle_buffer=16, device="cpu", **extra,
    )  # fmt: skip
    trainer.run(cfg)


def _train(world: int, shards: str, out: Path, **extra) -> list[dict]:
    mp.start_processes(
        _run_worker, args=(world, free_port(), shards, str(out), extra), nprocs=world,
        start_method="fork",
    )  # fmt: skip
    return curve(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return make_shards(tmp_path_factory.mktemp("curve-shards"), n_shards=3, per_shard=24)


def relative_difference(a: list[dict], b: list[dict]) -> float:
    la, lb = np.array([r["loss"] for r in a]), np.array([r["loss"] for r in b])
    assert len(la) == len(lb) > 0
    return float(np.max(np.abs(la - lb) / np.abs(lb)))


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_two_ranks_log_the_one_process_curve(shards, tmp_path, zero):
    one = _train(1, shards, tmp_path / "one", steps=4, grad_accum=2)
    two = _train(2, shards, tmp_path / "two", steps=4, zero=zero)
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert relative_difference(two, one) <= 1e-5


def test_resume_at_one_rank_continues_a_two_rank_curve(shards, tmp_path):
    whole = _train(1, shards, tmp_path / "whole", steps=4, grad_accum=2)
    _train(2, shards, tmp_path / "split", steps=2, total_steps=4)
    resumed = _train(1, shards, tmp_path / "split", steps=4, grad_accum=2, resume=True)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert relative_difference(resumed, whole) <= 1e-5
