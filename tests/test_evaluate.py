"""Evaluation: recall by hand, oracle and constant scorers through both retrieval paths, zero-shot
prompts, and `vlforge eval` on a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_train_data import COLOURS, make_shards
from test_trainer import train_args
from torch import nn

from vlforge.train.collate import BatchSpec
from vlforge.train.evaluate import evaluate, load_samples, recall_at
from vlforge.train.tokenizer import train_wordpiece


def test_zeroshot_truth():
    from vlforge.train.evaluate import _label_of

    labels = ["circle", "square"]
    assert _label_of({"json": {"shape": "square"}, "txt": "a circle"}, "shape", labels) == "square"
    assert (
        _label_of({"json": {"shapes": ["circle", "circle"]}, "txt": ""}, "shapes", labels)
        == "circle"
    )
    assert (
        _label_of({"json": {"shapes": ["circle", "square"]}, "txt": ""}, "shapes", labels) is None
    )
    assert _label_of({"json": {}, "txt": "A red Square."}, "shape", labels) == "square"
    assert _label_of({"json": {}, "txt": "a circle and a square"}, "shape", labels) is None


def test_recall_by_hand():
    scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.4, 0.6], [0.2, 0.2, 0.2]])
    pos = np.eye(3, dtype=bool)
    r = recall_at(scores, pos, ks=(1, 2, 3))
    # Row 0: first. Row 1: third. Row 2: all tied → ranked last (pessimistic).
    assert r == {1: pytest.approx(1 / 3), 2: pytest.approx(1 / 3), 3: 1.0}
    # A second positive in the row (same caption text) counts.
    pos[1, 2] = True
    assert recall_at(scores, pos, ks=(1,))[1] == pytest.approx(2 / 3)


class KeyOracle(nn.Module):
    """TEST-ONLY dual encoder that knows each sample's key: perfect retrieval (or constant)."""

    def __init__(self, keys: list[str], constant: bool = False):
        super().__init__()
        self.index = {k: i for i, k in enumerate(keys)}
        self.constant = constant
        self.w = nn.Parameter(torch.zeros(1))

    def _embed(self, batch):
        out = torch.zeros(len(batch["keys"]), len(self.index))
        if self.constant:
            return out + 1
        for row, key in enumerate(batch["keys"]):
            if key in self.index:  # an unknown key embeds to zeros: tied with every other
                out[row, self.index[key]] = 1
        return out

    encode_text = encode_image = _embed


class CaptionOracle(nn.Module):
    """TEST-ONLY single-stream scorer: matched iff the caption's tokens are the image key's."""

    def __init__(self, samples, tok):
        super().__init__()
        self.caption = {s["__key__"]: tuple(tok.encode(s["txt"], 40).ids) for s in samples}
        self.w = nn.Parameter(torch.zeros(1))

    def itm_score(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = [tuple(ids[i][mask[i] == 1].tolist()) for i in range(len(ids))]
        return torch.tensor(
            [
                4.0 if self.caption[k] == r else -4.0
                for k, r in zip(batch["keys"], rows, strict=True)
            ]
        )


class ColourOracle(nn.Module):
    """TEST-ONLY zero-shot model: text → the colour word it names; image → its json colour."""

    def __init__(self, samples, tok):
        super().__init__()
        self.tok, self.colour = tok, {s["__key__"]: s["json"]["colour"] for s in samples}
        self.w = nn.Parameter(torch.zeros(1))

    def encode_text(self, batch):
        out = torch.zeros(len(batch["input_ids"]), len(COLOURS))
        for i, ids in enumerate(batch["input_ids"].tolist()):
            words = self.tok.decode(ids).split()
            out[i, next(COLOURS.index(w) for w in words if w in COLOURS)] = 1
        return out

    def encode_image(self, batch):
        out = torch.zeros(len(batch["keys"]), len(COLOURS))
        for i, k in enumerate(batch["keys"]):
            out[i, COLOURS.index(self.colour[k])] = 1
        return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    shards = make_shards(tmp_path_factory.mktemp("eval"), n_shards=2, per_shard=30, seed=7)
    spec = BatchSpec(inputs=frozenset({"text", "regions"}), tasks={}, geometry=5)
    samples = load_samples(shards, spec, 1000)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=150)
    return shards, spec, samples, tok


def test_dual_encoder_retrieval(world):
    shards, spec, samples, tok = world
    keys = [s["__key__"] for s in samples]
    good = evaluate(KeyOracle(keys), tok, spec, shards, n_candidates=50, batch_size=16)
    assert good["retrieval_n"] == 50
    assert good["retrieval_i2t_r1"] == 1.0 and good["retrieval_t2i_r10"] == 1.0
    flat = evaluate(KeyOracle(keys, constant=True), tok, spec, shards, n_candidates=50)
    assert flat["retrieval_i2t_r1"] == 0.0 and flat["retrieval_t2i_r1"] == 0.0


def test_retrieval_folds_average_disjoint_pools(world):
    shards, spec, samples, tok = world
    # Perfect on the first 20 samples only: fold 1 scores 1.0, fold 2 (all tied) 0.0.
    model = KeyOracle([s["__key__"] for s in samples[:20]])
    out = evaluate(model, tok, spec, shards, n_candidates=20, n_folds=2)
    assert out["retrieval_n"] == 20 and out["retrieval_folds"] == 2
    assert out["retrieval_i2t_r1_folds"] == [1.0, 0.0] and out["retrieval_i2t_r1"] == 0.5
    assert out["retrieval_t2i_r1_folds"] == [1.0, 0.0] and out["retrieval_t2i_r1"] == 0.5
    # Only full pools count: 60 samples hold three pools of 20, not a fourth partial one.
    out = evaluate(model, tok, spec, shards, n_candidates=20, n_folds=5)
    assert out["retrieval_folds"] == 3 and out["retrieval_i2t_r1_folds"] == [1.0, 0.0, 0.0]


def test_single_stream_retrieval_and_itm(world):
    shards, spec, samples, tok = world
    out = evaluate(CaptionOracle(samples, tok), tok, spec, shards, n_candidates=20, batch_size=64)
    assert out["retrieval_n"] == 20
    assert out["retrieval_i2t_r1"] == 1.0 and out["retrieval_t2i_r1"] == 1.0
    assert out["itm_accuracy"] == 1.0 and out["itm_n"] == 60


def test_zeroshot_prompts(world):
    shards, spec, samples, tok = world
    model = ColourOracle(samples, tok)
    out = evaluate(model, tok, spec, shards, n_candidates=10, zeroshot={"colour": COLOURS})
    assert out["zeroshot_colour_acc"] == 1.0 and out["zeroshot_colour_n"] == 60
    # Shuffled labels: the prompts name the wrong colours, so accuracy collapses.
    wrong = {"colour": COLOURS[1:] + COLOURS[:1]}
    model.colour = {k: COLOURS[(COLOURS.index(c) + 1) % 4] for k, c in model.colour.items()}
    out = evaluate(model, tok, spec, shards, n_candidates=10, zeroshot=wrong)
    assert out["zeroshot_colour_acc"] < 0.5


def test_eval_cli_on_a_trained_run(cli, world, tmp_path):
    shards = world[0]
    out = tmp_path / "run"
    code, _, err = cli(*train_args(shards, out, "--steps", "2", "--workers", "0"))
    assert code == 0, err
    code, stdout, err = cli(
        "eval", "--ckpt", str(out), "--shards", shards, "--candidates", "12", "--folds", "2",
        "--out", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["retrieval_n"] == 12 and metrics["retrieval_folds"] == 2
    assert len(metrics["retrieval_i2t_r1_folds"]) == 2
    for key in ("retrieval_i2t_r1", "retrieval_t2i_r5", "itm_accuracy", "mlm_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert json.loads(stdout) == metrics
    # A single checkpoint directory works too.
    code, _, err = cli(
        "eval",
        "--ckpt",
        str(out / "checkpoints" / "step_00000002"),
        "--shards",
        shards,
        "--candidates",
        "5",
    )
    assert code == 0, err


@pytest.fixture
def cli(monkeypatch):
    from test_trainer import tiny_builder

    import vlforge.cli
    from tests.conftest import run_cli
    from vlforge.train import trainer

    monkeypatch.setattr(trainer, "build_recipe", tiny_builder)
    if "vlforge.train.cli" not in vlforge.cli.STAGE_CLIS:
        monkeypatch.setattr(
            vlforge.cli, "STAGE_CLIS", (*vlforge.cli.STAGE_CLIS, "vlforge.train.cli")
        )
    return run_cli


# An asymmetric score matrix (rows images, columns captions): every image's own caption is its
# best, so image→text R@1 is 1, but image 0 outscores the owners of captions 1 and 2, so
# text→image R@1 is 1/3. Swapping the orientation anywhere swaps the two.
ASYMMETRIC = np.array([[1.0, 0.9, 0.9], [0.0, 0.5, 0.4], [0.0, 0.3, 0.35]])


class TableScorer(nn.Module):
    """TEST-ONLY single-stream scorer: ASYMMETRIC[image index, caption index]."""

    def __init__(self, samples, tok):
        super().__init__()
        self.image = {s["__key__"]: i for i, s in enumerate(samples)}
        self.caption = {tuple(tok.encode(s["txt"], 40).ids): j for j, s in enumerate(samples)}
        self.w = nn.Parameter(torch.zeros(1))

    def itm_score(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows = [self.caption[tuple(ids[r][mask[r] == 1].tolist())] for r in range(len(ids))]
        cols = [self.image[k] for k in batch["keys"]]
        return torch.tensor([ASYMMETRIC[i, j] for i, j in zip(cols, rows, strict=True)])


class TableEncoder(TableScorer):
    """TEST-ONLY dual encoder: image i = e_i, caption j = column j of ASYMMETRIC (normalised,
    which keeps each row's and column's best where they are)."""

    def encode_image(self, batch):
        return torch.eye(3)[[self.image[k] for k in batch["keys"]]]

    def encode_text(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        cols = [self.caption[tuple(ids[r][mask[r] == 1].tolist())] for r in range(len(ids))]
        return torch.tensor(ASYMMETRIC[:, cols].T, dtype=torch.float32)


@pytest.mark.parametrize("scorer", [TableScorer, TableEncoder])
def test_recall_orientation_on_an_asymmetric_score_matrix(world, scorer):
    from vlforge.train.evaluate import Evaluator

    _, spec, samples, tok = world
    distinct = list({s["txt"]: s for s in samples}.values())[:3]
    model = scorer(distinct, tok)
    evaluator = Evaluator(model, tok, spec, batch_size=2)
    np.testing.assert_allclose(
        np.argmax(evaluator.similarity(distinct), 1), [0, 1, 2]
    )  # rows are images
    out = evaluator.retrieval(distinct)
    assert out["retrieval_i2t_r1"] == 1.0
    assert out["retrieval_t2i_r1"] == pytest.approx(1 / 3)
    assert recall_at(ASYMMETRIC, np.eye(3, dtype=bool), ks=(1,))[1] == 1.0
    assert recall_at(ASYMMETRIC.T, np.eye(3, dtype=bool), ks=(1,))[1] == pytest.approx(1 / 3)
