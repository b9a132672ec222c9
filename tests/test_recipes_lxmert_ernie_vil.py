"""LXMERT and ERNIE-ViL: what each adds to the shared recipes, checked directly.

LXMERT: captions replaced for cross-modality matching (~50%, images untouched, masked losses on
matched rows only), the QA head trained on question rows only and its accuracy in eval.
ERNIE-ViL: scene-graph spans mapped to WordPieces (punctuation, multi-word relations, split
words, mismatches), exactly those words masked, and each scene-graph loss on its own positions.
Both: a 30-step run on a fixed batch lowers the loss.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from test_train_data import caption_of, make_shards, scene_graph_of

from tests.conftest import loss_falls
from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.data import iter_shard
from vlforge.train.evaluate import Evaluator, evaluate, load_samples
from vlforge.train.losses import IGNORE
from vlforge.train.masking import MaskingConfig
from vlforge.train.recipes import build_recipe
from vlforge.train.recipes.ernie_vil import (
    SG_TASKS,
    ernie_vil_batch,
    mask_scene_graph,
    scene_graph_positions,
    token_char_spans,
)
from vlforge.train.recipes.lxmert import lxmert_batch
from vlforge.train.tokenizer import train_wordpiece
from vlforge.world.questions import ANSWERS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

R_DIM, N_CLS = 12, 6
QUESTIONS = [
    {"question": "what colour is the circle?", "answer": "red"},
    {"question": "how many squares are there?", "answer": "two"},
]


def make_samples(n: int, seed: int = 0, questions: bool = True) -> list[dict]:
    """Decoded samples as the loader yields them; every other one carries questions."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption, _, _ = caption_of(rng)
        k = int(rng.integers(3, 6))
        xy = rng.uniform(0, 20, (k, 2))
        meta: dict = {"width": 32, "height": 32}
        if questions and i % 2 == 0:
            # As the shard writer stores a URL-list column: a JSON string.
            meta["questions"] = json.dumps(QUESTIONS[: 1 + i % 4 // 2])
        out.append(
            {
                "__key__": f"s{seed}-{i}",
                "txt": caption,
                "json": meta,
                "boxes.npy": np.concatenate([xy, xy + 8], 1).astype(np.float32),
                "feats.npy": rng.normal(size=(k, R_DIM)).astype(np.float32),
                "cls_prob.npy": rng.dirichlet(np.ones(N_CLS), k).astype(np.float32),
                "sg.json": scene_graph_of(caption),
            }
        )
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [s["txt"] for s in make_samples(64)] + [q["question"] for q in QUESTIONS]
    return train_wordpiece(texts + ["a red circle, left of a blue-ish square."], vocab_size=150)


def spec_of(model, **kw) -> BatchSpec:
    return BatchSpec(
        inputs=model.inputs, tasks=dict(model.tasks), task_mode=model.task_mode,
        geometry=model.geometry, extra_fields=model.extra_fields, hook=type(model).batch_hook,
        max_text_len=40, **kw,
    )  # fmt: skip


def small(name: str, vocab: int, **kw):
    torch.manual_seed(0)
    sizes = {"region_dim": R_DIM, "num_region_classes": N_CLS}
    return build_recipe(name, "small", vocab, **(sizes | kw))


# -- LXMERT ------------------------------------------------------------------------------------


def test_lxmert_contract(tok):
    model = small("lxmert", tok.vocab_size)
    assert model.geometry == 4 and model.task_mode == "sum"
    assert type(model).batch_hook is lxmert_batch
    assert set(model.tasks) == {"mlm", "mrc", "mrfr", "match", "qa"}
    assert model.cfg.answers == ANSWERS
    assert model.mrc.decoder.out_features == N_CLS  # all columns, background 0 (mrc.py)


def test_matching_replaces_half_the_captions_and_never_the_image(tok):
    model = small("lxmert", tok.vocab_size, tasks={"match": 1.0})
    asm = Assembler(spec_of(model), tok)
    replaced = total = 0
    for b in range(40):
        samples = make_samples(8, seed=100 + b, questions=False)
        batch = asm(samples, np.random.default_rng(b))
        assert batch["keys"] == [s["__key__"] for s in samples]  # regions are the row's own
        for i, label in enumerate(batch["itm_labels"].tolist()):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            own = tok.encode(samples[i]["txt"], 40).ids
            others = [
                tok.encode(s["txt"], 40).ids for s in samples if s["txt"] != samples[i]["txt"]
            ]
            assert (ids == own) if label == 1 else (ids in others)
        replaced += int((batch["itm_labels"] == 0).sum())
        total += 8
        assert batch["itm_labels"].any()
    assert 0.4 < replaced / total < 0.6


def test_masked_losses_skip_replaced_rows(tok):
    model = small("lxmert", tok.vocab_size)
    asm = Assembler(spec_of(model, masking=MaskingConfig(mlm_prob=0.5, region_prob=0.5)), tok)
    batch = asm(make_samples(8, seed=3), np.random.default_rng(0))
    neg = batch["itm_labels"] == 0
    assert neg.any() and (~neg).any()
    assert (batch["mlm_labels"][neg] == IGNORE).all()
    assert not batch["mrm_mask"][neg].any()
    assert (batch["mlm_labels"][~neg] != IGNORE).any() and batch["mrm_mask"][~neg].any()
    # Replaced captions are masked too, so a [MASK] does not give the negatives away.
    assert (batch["input_ids"][neg] == tok.mask_id).any()


def test_qa_trains_only_on_rows_with_questions(tok):
    model = small("lxmert", tok.vocab_size)
    asm = Assembler(spec_of(model), tok)
    samples = make_samples(6, seed=5)
    batch = asm(samples, np.random.default_rng(1))
    has_q = [bool(s["json"].get("questions")) for s in batch_samples(batch, samples)]
    assert [a is not None for a in batch["qa_answers"]] == has_q
    for a, s in zip(batch["qa_answers"], batch_samples(batch, samples), strict=True):
        if a is not None:
            assert a in [q["answer"] for q in json.loads(s["json"]["questions"])]
    # The loss is the CE over exactly the question rows.
    logits, labels = model.answer_logits(batch)
    assert len(labels) == sum(has_q)
    want = [ANSWERS.index(a) for a in batch["qa_answers"] if a is not None]
    assert labels.tolist() == want
    loss = model(batch)["qa"]
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels))
    # A row without a question cannot move the QA loss, whatever its regions.
    other = dict(batch)
    rows = torch.tensor([not h for h in has_q])
    other["region_feats_target"] = batch["region_feats_target"].clone()
    other["region_feats_target"][rows] += 5.0
    torch.testing.assert_close(model(other)["qa"], loss)
    # No question in the batch: no QA gradient at all.
    plain = asm(make_samples(6, seed=5, questions=False), np.random.default_rng(1))
    assert "qa_answers" not in plain
    model.zero_grad()
    out = model(plain)
    assert float(out["qa"]) == 0.0
    out["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.qa.parameters())


def batch_samples(batch: dict, samples: list[dict]) -> list[dict]:
    by_key = {s["__key__"]: s for s in samples}
    return [by_key[k] for k in batch["keys"]]


def test_qa_accuracy_is_reported_by_eval(tok, tmp_path):
    # Shards whose json carries questions (as the world's URL-list column makes them).
    src = make_shards(tmp_path / "src", n_shards=1, per_shard=6)
    out_dir = tmp_path / "qa"
    out_dir.mkdir()
    with wds.TarWriter(str(out_dir / "train-000000.tar")) as w:
        for raw in iter_shard(src.replace("{000000..000000}", "000000")):
            meta = json.loads(raw["json"])
            meta["questions"] = json.dumps([{"question": "what colour is it?", "answer": "red"}])
            w.write({**{k: v for k, v in raw.items() if k != "__url__"}, "json": meta})
    model = small("lxmert", tok.vocab_size, region_dim=16, num_region_classes=5).eval()
    spec = spec_of(model)
    red = ANSWERS.index("red")
    with torch.no_grad():
        model.qa.fc2.bias.zero_()
        model.qa.fc2.bias[red] = 1e4  # always answers "red": every question right
    shard = str(out_dir / "train-000000.tar")
    metrics = evaluate(model, tok, spec, shard, 4, 6)
    assert metrics["qa_n"] == 6 and metrics["qa_accuracy"] == 1.0
    with torch.no_grad():
        model.qa.fc2.bias[red] = -1e4  # never "red": every question wrong
    ev = Evaluator(model, tok, spec)
    samples = load_samples(shard, spec, 6)
    assert model.extra_metrics(ev, samples) == {"qa_accuracy": 0.0, "qa_n": 6}
    # Answers outside the vocabulary and rows without questions are not counted.
    for s in samples[:2]:
        s["json"] = {**s["json"], "questions": [{"question": "what?", "answer": "maybe"}]}
    for s in samples[2:4]:
        s["json"] = {k: v for k, v in s["json"].items() if k != "questions"}
    assert model.extra_metrics(ev, samples) == {"qa_accuracy": 0.0, "qa_n": 2}
    assert model.extra_metrics(ev, samples[:4]) == {"qa_n": 0}


def test_lxmert_zeroed_masked_regions_keep_gradients_tame(tok):
    # FC(0) is the bias (0 at init): LayerNorm of a constant vector has gradients ~1/√eps unless
    # the mask embedding marks the zeroed regions (measured without it: ~1e5).
    model = small("lxmert", tok.vocab_size)
    masking = MaskingConfig(region_prob=0.5, region_zero_frac=1.0)
    batch = Assembler(spec_of(model, masking=masking), tok)(
        make_samples(6), np.random.default_rng(0)
    )
    assert (batch["region_feats"][batch["mrm_mask"]] == 0).all() and batch["mrm_mask"].any()
    model(batch)["loss"].backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e12) < 1e3


def test_lxmert_loss_falls(tok):
    model = small("lxmert", tok.vocab_size)
    batch = Assembler(spec_of(model), tok)(make_samples(6, seed=2), np.random.default_rng(0))
    assert {"qa_input_ids", "itm_labels", "mlm_labels", "mrm_mask"} <= set(batch)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "mrc", "mrfr", "match", "qa"} and float(out["qa"]) > 0
    loss_falls(model, batch)


# -- ERNIE-ViL ---------------------------------------------------------------------------------

HAND_CAPTION = "A red circle, left of a blue-ish square."
HAND_SG = {
    "tokens": ["A", "red", "circle", ",", "left", "of", "a", "blue", "-", "ish", "square", "."],
    "objects": [
        {"id": 0, "name": "circle", "count": 1, "span": [2, 3]},
        {"id": 1, "name": "square", "count": 1, "span": [10, 11]},
    ],
    "attributes": [
        {"object": 0, "name": "red", "span": [1, 2]},
        {"object": 1, "name": "blue-ish", "span": [7, 10]},
    ],
    "relations": [{"subject": 0, "name": "left of", "object": 1, "span": [4, 6]}],
}


def _words(tok, caption: str, nodes: list[list[int]]) -> list[str]:
    ids = tok.encode(caption, 40).ids
    return [tok.decode([ids[p] for p in node]).replace(" ##", "") for node in nodes]


def test_scene_graph_spans_map_to_wordpieces(tok):
    assert token_char_spans("Hi, you.", ["Hi", ",", "you", "."]) == [(0, 2), (2, 3), (4, 7), (7, 8)]
    pos = scene_graph_positions(HAND_CAPTION, HAND_SG, tok, 40)
    assert _words(tok, HAND_CAPTION, pos["objects"]) == ["circle", "square"]
    assert _words(tok, HAND_CAPTION, pos["relations"]) == ["left of"]
    # "blue-ish" is three parser tokens and the pieces the WordPiece makes of it, "-" included.
    ids = tok.encode(HAND_CAPTION, 40).ids
    assert [ids[p] for p in pos["attributes"][1]] == tok.encode("blue-ish", 40).ids[1:-1]
    assert _words(tok, HAND_CAPTION, pos["attributes"][:1]) == ["red"]
    # Punctuation around the words is never part of a node.
    comma, stop = tok.tok.token_to_id(","), tok.tok.token_to_id(".")
    assert all(ids[p] not in (comma, stop) for nodes in pos.values() for n in nodes for p in n)
    # A token the caption does not hold drops its node, not the others; nor does it shift them.
    bad = json.loads(json.dumps(HAND_SG))
    bad["tokens"][4] = "right"
    pos = scene_graph_positions(HAND_CAPTION, bad, tok, 40)
    assert pos["relations"] == [] and _words(tok, HAND_CAPTION, pos["objects"]) == [
        "circle",
        "square",
    ]
    # A graph of another caption aligns nothing; spans out of range are ignored.
    assert all(not v for v in scene_graph_positions("two green stars", HAND_SG, tok, 40).values())
    assert scene_graph_positions(HAND_CAPTION, {**HAND_SG, "tokens": []}, tok, 40)["objects"] == []
    # Truncation drops the nodes it cut off.
    short = scene_graph_positions(HAND_CAPTION, HAND_SG, tok, 5)  # [CLS] a red circle [SEP]
    assert _words(tok, HAND_CAPTION, short["objects"]) == ["circle"]
    assert short["relations"] == []


def _ernie_batch(tok, model, samples, seed=0, prob=None, **kw):
    asm = Assembler(spec_of(model, **kw), tok)
    if prob is None:
        return asm(samples, np.random.default_rng(seed))
    asm.spec.hook = lambda b, ctx: mask_scene_graph(b, ctx, prob)
    return asm(samples, np.random.default_rng(seed))


def test_ernie_vil_masks_exactly_the_parsed_words(tok):
    model = small("ernie_vil", tok.vocab_size)
    assert model.extra_fields == ("sg.json",) and type(model).batch_hook is ernie_vil_batch
    hand = {**make_samples(1)[0], "txt": HAND_CAPTION, "sg.json": HAND_SG}
    samples = [hand] + make_samples(3, seed=4)
    tasks = {t: 1.0 for t in SG_TASKS.values()}  # no MLM: only the scene graph is masked
    m = small("ernie_vil", tok.vocab_size, tasks=tasks)
    batch = _ernie_batch(tok, m, samples, prob=1.0)
    for i, s in enumerate(samples):
        ids = torch.tensor(tok.encode(s["txt"], 40).ids)
        pos = scene_graph_positions(s["txt"], s["sg.json"], tok, 40)
        for kind, task in SG_TASKS.items():
            labels = batch[f"{task}_labels"][i, : len(ids)]
            want = sorted(p for node in pos[kind] for p in node)
            assert torch.nonzero(labels != IGNORE).flatten().tolist() == want, (s["txt"], kind)
            assert (labels[want] == ids[want]).all()
        changed = torch.nonzero(batch["input_ids"][i, : len(ids)] != ids).flatten().tolist()
        every = {p for nodes in pos.values() for node in nodes for p in node}
        assert set(changed) <= every  # nothing but scene-graph words is touched
    hand_rel = batch["sg_relation_labels"][0]
    assert tok.decode(hand_rel[hand_rel != IGNORE].tolist()) == "left of"
    # With MLM on, a scene-graph position is never an MLM target too.
    both = _ernie_batch(tok, model, samples, prob=1.0, masking=MaskingConfig(mlm_prob=0.9))
    sg_pos = sum((both[f"{t}_labels"] != IGNORE) for t in SG_TASKS.values())
    assert sg_pos.any() and not ((both["mlm_labels"] != IGNORE) & sg_pos.bool()).any()


def test_ernie_vil_default_rate_and_mismatched_rows(tok):
    model = small("ernie_vil", tok.vocab_size)
    chosen = total = 0
    for b in range(30):
        samples = make_samples(8, seed=200 + b)
        batch = _ernie_batch(tok, model, samples, seed=b)
        neg = batch["itm_labels"] == 0
        for task in SG_TASKS.values():
            labels = batch[f"{task}_labels"]
            assert not (labels[neg] != IGNORE).any()  # no scene-graph loss on a mismatched pair
            assert (labels != IGNORE).any()  # at least one node per kind and batch
        chosen += int((batch["sg_object_labels"] != IGNORE).sum())
        for i in torch.nonzero(~neg).flatten().tolist():
            s = samples[i]
            total += sum(
                map(len, scene_graph_positions(s["txt"], s["sg.json"], tok, 40)["objects"])
            )
    assert 0.2 < chosen / total < 0.45


def test_ernie_vil_masks_mismatched_rows_as_often_as_matched_ones(tok):
    # Scene-graph [MASK]s on matched rows only would tell ITM which pairs match.
    tasks = {"itm": 1.0, **{t: 1.0 for t in SG_TASKS.values()}}  # no MLM: only the graph masks
    model = small("ernie_vil", tok.vocab_size, tasks=tasks)
    masks, rows = [0, 0], [0, 0]
    for b in range(20):
        batch = _ernie_batch(tok, model, make_samples(8, seed=300 + b), seed=b)
        for i, y in enumerate(batch["itm_labels"].tolist()):
            masks[y] += int((batch["input_ids"][i] == tok.mask_id).sum())
            rows[y] += 1
    assert masks[0] > 0 and 0.6 < (masks[0] / rows[0]) / (masks[1] / rows[1]) < 1.6, (masks, rows)


def test_each_scene_graph_loss_is_on_its_positions_only(tok):
    model = small("ernie_vil", tok.vocab_size).eval()
    batch = _ernie_batch(tok, model, make_samples(6, seed=7), prob=0.5)
    out = model(batch)
    assert set(out) == {"loss", "mlm", "mrc_kl", "itm", *SG_TASKS.values()}
    with torch.no_grad():
        logits = model.mlm_logits(batch)
    for task in SG_TASKS.values():
        labels = batch[f"{task}_labels"]
        sel = labels != IGNORE
        want = F.cross_entropy(logits[sel], labels[sel])
        torch.testing.assert_close(out[task], want)
        # Moving another kind's labels does not change this loss.
        other = dict(batch)
        for t in SG_TASKS.values():
            if t != task:
                other[f"{t}_labels"] = torch.full_like(labels, IGNORE)
        torch.testing.assert_close(model(other)[task], out[task])


def test_ernie_vil_loss_falls(tok):
    model = small("ernie_vil", tok.vocab_size)
    batch = _ernie_batch(tok, model, make_samples(6, seed=2))
    loss_falls(model, batch)


def test_hooks_survive_a_pickle_round_trip(tok):
    # Loader workers get the spec by pickling: the hooks must be module-level functions.
    import pickle

    for name in ("lxmert", "ernie_vil"):
        spec = spec_of(small(name, tok.vocab_size))
        assert pickle.loads(pickle.dumps(spec)).hook is spec.hook
