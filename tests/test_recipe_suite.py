"""Every registered recipe through the real command line on the same small shards: it trains,
resumes to exactly the uninterrupted loss curve, evaluates, and trains on two data-parallel ranks.

Parametrized over the registry, so a new recipe file is covered the moment it exists.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from test_train_data import make_shards

from tests.conftest import run_cli
from vlforge.train import trainer
from vlforge.train.recipes import list_recipes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = list_recipes()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    # 64 px images: pixel and patch recipes see whole shapes; regions, tags, sg and mine fields.
    return make_shards(tmp_path_factory.mktemp("suite"), n_shards=2, per_shard=16, size=64)


@pytest.fixture(scope="module")
def tokenizer(shards, tmp_path_factory):
    # One tokenizer file for every run: HF's WordPiece trainer breaks count ties in hash-map order
    # (huggingface/tokenizers#1794), so two trainings on the same captions may differ.
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    code, _, err = run_cli("tokenizer", "train", "--shards", shards, "--out", str(path),
                           "--vocab-size", "120")  # fmt: skip
    assert code == 0, err
    return str(path)


def train_args(name: str, shards: str, out: Path, tokenizer: str, *extra: str) -> list[str]:
    return [
        "train", "--recipe", name, "--shards", shards, "--out", str(out), "--batch-size", "4",
        "--workers", "0", "--log-every", "1", "--no-progress", "--shuffle-buffer", "8",
        "--tokenizer", tokenizer, "--total-steps", "4", *extra,
    ]  # fmt: skip


def curve(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows if "loss" in r]


@pytest.mark.parametrize("name", RECIPES)
def test_trains_resumes_exactly_and_evaluates(name, shards, tokenizer, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, _, err = run_cli(*train_args(name, shards, whole, tokenizer, "--steps", "4"))
    assert code == 0, err
    code, _, err = run_cli(*train_args(name, shards, split, tokenizer, "--steps", "2"))
    assert code == 0, err
    code, _, err = run_cli(*train_args(name, shards, split, tokenizer, "--steps", "4", "--resume"))
    assert code == 0, err
    a, b = curve(whole), curve(split)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in a)
    assert a == b  # exact on CPU in one process: weights, optimizer, RNG and data position

    code, out, err = run_cli(
        "eval", "--ckpt", str(whole), "--shards", shards, "--candidates", "8", "--samples", "16"
    )
    assert code == 0, err
    metrics = json.loads(out[out.index("{") :])
    numbers = [x for v in metrics.values() for x in (v if isinstance(v, list) else [v])]
    assert numbers and all(math.isfinite(x) for x in numbers)  # per-fold R@1 come as lists
    model, _, _ = trainer.load_for_eval(str(whole), "cpu")
    if callable(getattr(model, "itm_score", None)) or callable(getattr(model, "encode_text", None)):
        assert metrics["retrieval_n"] == 8
        assert 0.0 <= metrics["retrieval_i2t_r1"] <= 1.0


def _two_rank_worker(rank: int, ports: list[int], shards: str, tokenizer: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    for name, port in zip(RECIPES, ports, strict=True):
        # A fresh rendezvous per run: rank 0 owns the store, and one rank may still be tearing
        # down the last run's group when the other joins the next one on the same port.
        os.environ["MASTER_PORT"] = str(port)
        cfg = trainer.TrainConfig(
            recipe=name, shards=shards, out=f"{root}/{name}", steps=2, batch_size=4, lr=1e-3,
            workers=0, log_every=1, progress=False, tokenizer=tokenizer, shuffle_buffer=8,
        )  # fmt: skip
        trainer.run(cfg)


def test_every_recipe_trains_on_two_ranks(shards, tokenizer, tmp_path):
    """The `--nproc 2` path (gloo, DDP) for every recipe in one pair of forked processes, so the
    suite pays process start-up once, not once per recipe."""
    import torch.multiprocessing as mp

    from vlforge.train.distributed import free_port

    ports: list[int] = []
    while len(ports) < len(RECIPES):
        port = free_port()
        if port not in ports:
            ports.append(port)
    mp.start_processes(
        _two_rank_worker,
        args=(ports, shards, tokenizer, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    for name in RECIPES:
        rows = curve(tmp_path / name)
        assert [r["step"] for r in rows] == [1, 2], name
        assert all(math.isfinite(r["loss"]) for r in rows), name
