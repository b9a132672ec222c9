"""Trainer: exact resume, falling loss, schedules, checkpoints that never unpickle, data-parallel
ranks, the --nproc launcher and the command line's one-line errors.

`TinyRecipe` is a TEST-ONLY stand-in that follows the recipe contract (train/recipes/ holds the
real ones); it keeps these tests about the trainer and seconds long.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_data import make_shards
from torch import nn

import vlforge.cli
from tests.conftest import run_cli
from vlforge.train import checkpoint as ckpt
from vlforge.train import trainer
from vlforge.train.schedule import WarmupDecay


class TinyRecipe(nn.Module):
    """TEST-ONLY recipe: bag-of-words text, linear regions, MLM + ITM + MRFR heads, dropout."""

    def __init__(
        self,
        vocab_size: int,
        region_dim: int = 16,
        num_region_classes: int = 5,
        task_mode: str = "sum",
        hidden: int = 32,
        **_: object,
    ):
        super().__init__()
        self.name = "tiny"
        self.tasks = {"mlm": 1.0, "itm": 1.0, "mrfr": 1.0}
        self.task_mode = task_mode
        self.inputs = {"text", "regions"}
        self.geometry = 5
        self.region_mask_overlap = False
        self.conditional_masking = False
        self.tok = nn.Embedding(vocab_size, hidden)
        self.reg = nn.Linear(region_dim + 5, hidden)
        self.drop = nn.Dropout(0.1)
        self.mlm = nn.Linear(hidden, vocab_size)
        self.itm = nn.Linear(hidden, 1)
        self.mrfr = nn.Linear(hidden, region_dim)

    def _encode(self, b):
        t = self.drop(self.tok(b["input_ids"]))
        r = self.drop(self.reg(torch.cat([b["region_feats"], b["region_geom"]], -1)))
        tm, rm = b["attention_mask"].unsqueeze(-1).float(), b["region_mask"].unsqueeze(-1).float()
        tp, rp = (t * tm).sum(1) / tm.sum(1), (r * rm).sum(1) / rm.sum(1)
        return t + rp[:, None], r + tp[:, None], tp, rp

    def itm_score(self, b):
        _, _, tp, rp = self._encode(b)
        return self.itm(tp * rp).squeeze(-1)

    def mlm_logits(self, b):
        return self.mlm(self._encode(b)[0])

    def forward(self, b):
        t, r, tp, rp = self._encode(b)
        active = [b["task"]] if self.task_mode == "sample" else list(self.tasks)
        losses = {}
        if "mlm" in active:
            losses["mlm"] = F.cross_entropy(self.mlm(t).flatten(0, 1), b["mlm_labels"].flatten())
        if "itm" in active:
            score = self.itm(tp * rp).squeeze(-1)
            losses["itm"] = F.binary_cross_entropy_with_logits(score, b["itm_labels"].float())
        if "mrfr" in active:
            m = b["mrm_mask"]
            losses["mrfr"] = F.mse_loss(self.mrfr(r)[m], b["region_feats_target"][m])
        return {"loss": sum(losses.values()), **losses}


def tiny_builder(name, size="small", vocab_size=100, **overrides):
    assert name == "tiny"
    return TinyRecipe(vocab_size, **overrides)


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(trainer, "build_recipe", tiny_builder)
    if "vlforge.train.cli" not in vlforge.cli.STAGE_CLIS:
        monkeypatch.setattr(
            vlforge.cli, "STAGE_CLIS", (*vlforge.cli.STAGE_CLIS, "vlforge.train.cli")
        )
    return run_cli


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=24)


def train_args(shards, out, *extra):
    return [
        "train", "--recipe", "tiny", "--shards", shards, "--out", str(out), "--batch-size", "8",
        "--lr", "3e-3", "--log-every", "1", "--no-progress", "--shuffle-buffer", "16",
        "--vocab-size", "200", *extra,
    ]  # fmt: skip


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[dict]:
    drop = ("samples_per_s",)
    return [{k: v for k, v in r.items() if k not in drop} for r in records(out) if "loss" in r]


@pytest.mark.parametrize(
    "extra",
    [
        ["--workers", "2", "--grad-accum", "2", "--warmup", "2"],
        ["--workers", "0", "--set", "task_mode=sample", "--schedule", "linear"],
    ],
)
def test_resume_equals_uninterrupted(cli, shards, tmp_path, extra):
    whole, split = tmp_path / "whole", tmp_path / "split"
    code, _, err = cli(*train_args(shards, whole, "--steps", "8", *extra))
    assert code == 0, err
    code, _, err = cli(*train_args(shards, split, "--steps", "3", "--total-steps", "8", *extra))
    assert code == 0, err
    # The interrupted run logged a step past its checkpoint before dying: resume drops it.
    with (split / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    code, _, err = cli(*train_args(shards, split, "--steps", "8", "--resume", *extra))
    assert code == 0, err
    a, b = curve(whole), curve(split)
    assert [r["step"] for r in a] == list(range(1, 9))
    assert a == b  # exact: losses, task losses, lr, grad norms


def test_loss_falls_and_lr_follows_the_schedule(cli, shards, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = cli(
        *train_args(shards, out, "--steps", "30", "--warmup", "3", "--workers", "1", "--lr", "1e-2")
    )
    assert code == 0, err
    assert "trained 30 steps" in stdout
    rec = curve(out)
    first, last = np.mean([r["loss"] for r in rec[:5]]), np.mean([r["loss"] for r in rec[-5:]])
    assert last < 0.8 * first, (first, last)
    schedule = WarmupDecay(3, 30, "cosine")
    np.testing.assert_allclose(
        [r["lr"] for r in rec], [1e-2 * schedule(s) for s in range(30)], rtol=1e-9
    )
    assert all({"mlm", "itm", "mrfr", "samples_per_s"} <= set(r) for r in records(out))
    config = json.loads((out / "config.json").read_text())
    assert config["recipe_overrides"] == {"region_dim": 16, "num_region_classes": 5}
    assert (out / "tokenizer.json").is_file()
    assert ckpt.latest_checkpoint(out).name == "step_00000030"
    # TensorBoard (a dev dependency) gets the same curve as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx({r["step"]: r["loss"] for r in rec}, rel=1e-6)


def test_resume_takes_the_new_total_steps(cli, shards, tmp_path):
    out = tmp_path / "run"
    args = ["--workers", "0", "--schedule", "linear"]
    assert cli(*train_args(shards, out, "--steps", "2", *args))[0] == 0  # lr 1, ½ (→ 0 next)
    assert cli(*train_args(shards, out, "--steps", "4", "--resume", *args))[0] == 0
    lrs = [r["lr"] for r in curve(out)]
    np.testing.assert_allclose(lrs, [3e-3, 3e-3 / 2, 3e-3 * 2 / 4, 3e-3 * 1 / 4], rtol=1e-9)


def test_schedule_shapes():
    cos, lin = WarmupDecay(10, 110, "cosine"), WarmupDecay(10, 110, "linear")
    assert [cos(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(60) == pytest.approx(0.5) and lin(60) == pytest.approx(0.5)
    assert cos(110) == pytest.approx(0.0) and lin(200) == 0.0
    assert WarmupDecay(0, 100, "constant")(50) == 1.0


def test_user_errors_are_one_line(cli, shards, tmp_path):
    out = tmp_path / "run"
    assert cli(*train_args(shards, out, "--steps", "1", "--workers", "0"))[0] == 0
    for argv, needle in [
        (train_args(shards, out, "--steps", "2"), "--resume"),
        (train_args(shards, out, "--steps", "1", "--resume"), "already at step"),
        (train_args(shards, tmp_path / "b", "--batch-size", "7", "--grad-accum", "2"), "split"),
        (train_args(str(tmp_path / "missing-{0..2}.tar"), tmp_path / "c"), "not found"),
        (train_args(shards, tmp_path / "d", "--mlm-prob", "2"), "between 0 and 1"),
        (train_args(shards, tmp_path / "e", "--steps", "5", "--total-steps", "3"), "total-steps"),
        (["eval", "--ckpt", str(tmp_path / "nothing"), "--shards", shards], "checkpoint"),
        (train_args(shards, tmp_path / "f", "--tokenizer", str(tmp_path / "no.json")), "tokenizer"),
    ]:
        code, _, err = cli(*argv)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_tokenizer_cli(cli, shards, tmp_path):
    from vlforge.train.tokenizer import load_tokenizer

    out = tmp_path / "tok.json"
    code, stdout, err = cli(
        "tokenizer", "train", "--shards", shards, "--out", str(out), "--vocab-size", "150"
    )
    assert code == 0, err
    tok = load_tokenizer(out)
    enc = tok.encode("a red circle left of a blue square", 40)
    assert enc.ids[0] == tok.cls_id and enc.ids[-1] == tok.sep_id and tok.unk_id not in enc.ids
    assert tok.mask_id is not None and tok.vocab_size <= 150


def test_checkpoint_loading_never_unpickles(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from vlforge.errors import UserError

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "trainer": Evil()}, checkpoint_id=str(tmp_path / "ck"))
    with pytest.raises(UserError, match="Weights only load failed"):
        ckpt.load_checkpoint(tmp_path / "ck", model, optimizer)
    assert not (tmp_path / "pwned").exists()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    state = json.loads(json.dumps(ckpt.rng_state()))
    a = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(2)
    np.random.seed(2)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _ddp_worker(rank: int, world: int, port: int, shards: str, out: str, steps: int, resume: bool):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    trainer.build_recipe = tiny_builder  # this process's copy of the module
    cfg = trainer.TrainConfig(
        recipe="tiny", shards=shards, out=out, steps=steps, total_steps=6, batch_size=8,
        lr=3e-3, workers=0, log_every=1, progress=False, vocab_size=200, resume=resume,
        shuffle_buffer=16,
    )  # fmt: skip
    trainer.run(cfg)


def test_two_ranks_train_and_resume(shards, tmp_path):
    import torch.multiprocessing as mp

    from vlforge.train.distributed import free_port

    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    for out, steps, resume in [(whole, 6, False), (split, 3, False), (split, 6, True)]:
        mp.start_processes(
            _ddp_worker, args=(2, free_port(), shards, out, steps, resume), nprocs=2,
            start_method="fork",
        )  # fmt: skip
    a, b = curve(Path(whole)), curve(Path(split))
    assert len(a) == 6 and all(np.isfinite(r["loss"]) for r in a)
    # Two ranks on CPU: the same data and updates after resume; float sums may differ in order.
    for x, y in zip(a, b, strict=True):
        assert x["step"] == y["step"] and x["loss"] == pytest.approx(y["loss"], rel=1e-5)


def test_nproc_launcher(shards, tmp_path):
    """`--nproc 2` through torchrun with a real recipe."""
    out = tmp_path / "run"
    code, _, err = run_cli(
        "train", "--recipe", "uniter", "--shards", shards, "--out", str(out), "--steps", "2",
        "--batch-size", "4", "--workers", "0", "--log-every", "1", "--no-progress", "--nproc", "2",
        "--vocab-size", "200",
    )  # fmt: skip
    assert code == 0, err
    assert [r["step"] for r in curve(out)] == [1, 2]
