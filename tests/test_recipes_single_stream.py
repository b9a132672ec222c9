"""The single-stream region recipes of issue 6 — visualbert, unicoder_vl, imagebert, oscar — on
batches the real Assembler builds from the recipe's own batch spec: each recipe's distinctive piece
(MOC's hard label, ImageBERT's two kinds of negatives and matched-only losses, Oscar's tags hook,
tag masking and pollution) and a 30-step run on a fixed batch whose loss falls. VisualBERT's
parity with HF is in test_hf_parity_visualbert.py."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_data import COLOURS, FEAT_DIM, N_CLASSES, SHAPES, caption_of

from tests.conftest import loss_falls
from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.masking import IGNORE, MaskingConfig
from vlforge.train.recipes import build_recipe
from vlforge.train.recipes.base import Recipe
from vlforge.train.recipes.oscar import tag_text
from vlforge.train.tokenizer import TextTokenizer, train_wordpiece
from vlforge.train.trainer import TrainConfig, batch_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPES = ["visualbert", "unicoder_vl", "imagebert", "oscar"]


def _samples(n: int, seed: int = 0) -> list[dict]:
    """Decoded samples shaped like make_shards' (regions, detector classes, tags.json)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption, colour, shape = caption_of(rng)
        k = int(rng.integers(3, 8))
        xy = rng.uniform(0, 20, size=(k, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 12, size=(k, 2))], 1).astype(np.float32)
        feats = rng.normal(size=(k, FEAT_DIM)).astype(np.float32) * 0.1
        feats[:, COLOURS.index(colour)] += 1.0
        feats[:, 4 + SHAPES.index(shape)] += 1.0
        prob = rng.dirichlet(np.ones(N_CLASSES), size=k).astype(np.float32)
        other = SHAPES[(SHAPES.index(shape) + 1) % 3]
        attrs = [{"name": "large", "score": 0.6}, {"name": colour, "score": 0.9}]
        out.append(
            {
                "__key__": f"k{i:03d}",
                "txt": caption,
                "json": {"width": 32, "height": 32, "colour": colour, "shape": shape},
                "boxes.npy": boxes,
                "feats.npy": feats,
                "cls_prob.npy": prob,
                "tags.json": {
                    "tags": [
                        {"name": other, "score": 0.7, "count": 1},
                        {"name": shape, "score": 0.99, "count": 1, "attributes": attrs},
                    ]
                },
            }
        )
    return out


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    words = [s["txt"] for s in _samples(64)] + [" ".join(COLOURS + SHAPES + ["large"])]
    return train_wordpiece(words, vocab_size=120)


def _model(name: str, tok: TextTokenizer) -> Recipe:
    torch.manual_seed(0)
    return build_recipe(
        name, "small", tok.vocab_size, region_dim=FEAT_DIM, num_region_classes=N_CLASSES
    )


def _spec(model: Recipe, masking: MaskingConfig | None = None) -> BatchSpec:
    # The trainer's own translation of a recipe into its batch spec.
    cfg = TrainConfig(recipe=model.name, shards="-", out="-", masking=masking or MaskingConfig())
    return batch_spec(model, cfg)


def _batch(spec: BatchSpec, tok: TextTokenizer, samples: list[dict], seed: int = 0) -> dict:
    return Assembler(spec, tok)(samples, np.random.default_rng(seed))


# -- every recipe -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RECIPES)
def test_thirty_steps_on_a_fixed_batch_lower_the_loss(name, tok):
    model = _model(name, tok)
    batch = _batch(_spec(model), tok, _samples(8))
    assert set(model(batch)) == {"loss", *model.tasks}
    loss_falls(model, batch)


# -- VisualBERT ---------------------------------------------------------------------------------


def test_visualbert_negatives_replace_the_caption_not_the_image(tok):
    spec = _spec(_model("visualbert", tok))
    samples = _samples(8)
    negatives = 0
    for seed in range(10):
        b = _batch(spec, tok, samples, seed)
        assert b["keys"] == [s["__key__"] for s in samples]  # every row shows its own image
        negatives += int((b["itm_labels"] == 0).sum())
    assert negatives >= 20


# -- Unicoder-VL --------------------------------------------------------------------------------


def test_unicoder_vl_moc_label_is_the_detectors_top_class(tok):
    model = _model("unicoder_vl", tok).eval()
    batch = _batch(_spec(model), tok, _samples(8))
    sel = batch["mrm_mask"]
    assert sel.any()
    with torch.no_grad():
        loss = model(batch)["moc"]
        logits = model.moc_logits(batch)
    prob = batch["region_cls_prob"][sel]
    top = prob[:, 1:].argmax(-1) + 1  # background column 0 is never the label
    torch.testing.assert_close(loss, F.cross_entropy(logits, top))

    # A hard label: only the top object class matters, not the rest of the distribution, and a
    # dominant background column changes nothing.
    def detector(top_class: torch.Tensor) -> torch.Tensor:
        out = batch["region_cls_prob"].clone()
        flat = torch.rand(len(top_class), N_CLASSES, generator=torch.Generator().manual_seed(3))
        flat = flat * 0.01
        flat[torch.arange(len(top_class)), top_class] = 0.05
        flat[:, 0] = 0.9
        out[sel] = flat
        return out

    with torch.no_grad():
        same = model(batch | {"region_cls_prob": detector(top)})["moc"]
        moved = model(batch | {"region_cls_prob": detector(top % (N_CLASSES - 1) + 1)})["moc"]
    torch.testing.assert_close(same, loss)
    assert not torch.allclose(moved, loss)


# -- ImageBERT ----------------------------------------------------------------------------------


def test_imagebert_batches_hold_image_and_caption_negatives(tok):
    model = _model("imagebert", tok)
    spec = _spec(model)
    assert {"itm", "moc", "mrfr", "mlm"} == set(spec.tasks)
    samples = _samples(8)
    own = [s["__key__"] for s in samples]
    image_swaps = caption_swaps = 0
    selected = regions = zeroed = 0
    for seed in range(20):
        b = _batch(spec, tok, samples, seed)
        for i, label in enumerate(b["itm_labels"].tolist()):
            if label == 0 and b["keys"][i] != own[i]:
                image_swaps += 1  # the row shows another sample's regions
            elif label == 0:
                caption_swaps += 1  # its own regions, another caption
        # MOC/MRFR masking: 15% of the regions, 90% of those zeroed (the rest kept).
        real = b["region_mask"].bool() & (b["itm_labels"] == 1)[:, None]
        sel = b["mrm_mask"]
        regions += int(real.sum())
        selected += int(sel.sum())
        zeroed += int((b["region_feats"][sel] == 0).all(-1).sum())
    assert image_swaps >= 10 and caption_swaps >= 10, (image_swaps, caption_swaps)
    assert 0.08 < selected / regions < 0.25 and zeroed / selected > 0.75


def test_imagebert_masked_losses_ignore_unmatched_rows(tok):
    model = _model("imagebert", tok).eval()
    b = _batch(_spec(model), tok, _samples(8), seed=1)
    neg = b["itm_labels"] == 0
    assert neg.any() and (~neg).any()
    # The data side's contract: nothing to predict on negative pairs.
    assert (b["mlm_labels"][neg] == IGNORE).all() and not b["mrm_mask"][neg].any()
    # A hand-made batch that labels negative rows too: the recipe leaves them out.
    loud = dict(b)
    loud["mlm_labels"] = b["mlm_labels"].clone()
    loud["mlm_labels"][neg, 1] = b["input_ids"][neg, 1]
    loud["mrm_mask"] = b["mrm_mask"].clone()
    loud["mrm_mask"][neg, 0] = True
    with torch.no_grad():
        want = model(b)
        got = model(loud)
        counted = model(loud | {"itm_labels": torch.ones_like(b["itm_labels"])})
    for task in ("mlm", "moc", "mrfr"):
        torch.testing.assert_close(got[task], want[task])
        assert not torch.allclose(counted[task], want[task]), task  # they would count if matched


# -- Oscar --------------------------------------------------------------------------------------


def _true_tag_ids(b: dict, i: int) -> list[int]:
    """Row i's tag tokens before masking (labels hold the originals of masked positions)."""
    ids, lab = b["tag_ids"][i], b["tag_mlm_labels"][i]
    return torch.where(lab != IGNORE, lab, ids)[b["tag_mask"][i].bool()].tolist()


def test_oscar_hook_puts_the_tags_in_a_second_segment(tok):
    model = _model("oscar", tok).eval()
    samples = _samples(6)
    spec = replace(_spec(model, MaskingConfig(mlm_prob=0.0)), tasks={"mlm": 1.0})
    assert "tags.json" in spec.fields()[0] and spec.hook is not None
    b = _batch(spec, tok, samples)
    assert b["contrastive_labels"].tolist() == [1] * 6  # no pollution without the contrastive task
    for i, s in enumerate(samples):
        text = tag_text(s["tags.json"])
        other = SHAPES[(SHAPES.index(s["json"]["shape"]) + 1) % 3]
        # By falling score, confident attributes first: "red large square circle".
        assert text == f"{s['json']['colour']} large {s['json']['shape']} {other}"
        want = tok.encode(text, 64).ids[1:]  # no [CLS]; closed by [SEP]
        assert b["tag_ids"][i][b["tag_mask"][i].bool()].tolist() == want
        assert want[-1] == tok.sep_id
    # Malformed tags.json (untrusted shard data) gives what can be read, never an error.
    assert tag_text(["square"]) == tag_text(None) == ""
    assert tag_text({"tags": [3, {"name": "cube", "score": "?", "attributes": "red"}]}) == "cube"
    # One row: [CLS] words [SEP] tags [SEP] is exactly a BERT sentence pair (tags = segment 1,
    # positions continuing the caption's).
    one = _batch(spec, tok, samples[:1])
    n_tags = int(one["tag_mask"].sum())
    pair = one | {
        "input_ids": torch.cat([one["input_ids"], one["tag_ids"][:, :n_tags]], 1),
        "token_type_ids": torch.cat(
            [one["token_type_ids"], torch.ones(1, n_tags, dtype=torch.long)], 1
        ),
        "attention_mask": torch.ones(1, one["input_ids"].shape[1] + n_tags, dtype=torch.long),
    }
    del pair["tag_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode(one)[0], model.encode(pair)[0])


def test_oscar_masks_words_and_tags(tok):
    model = _model("oscar", tok)
    spec = _spec(model)
    samples = _samples(8)
    body = chosen = masked = words = 0
    for seed in range(30):
        b = _batch(spec, tok, samples, seed)
        words += int((b["mlm_labels"] != IGNORE).sum())
        lab, ids = b["tag_mlm_labels"], b["tag_ids"]
        special = torch.isin(ids, torch.tensor([tok.sep_id, tok.pad_id]))
        body += int((~special).sum())
        chosen += int((lab != IGNORE).sum())
        masked += int(((lab != IGNORE) & (ids == tok.mask_id)).sum())
        assert (lab[special] == IGNORE).all()
    assert words > 0
    assert 0.09 < chosen / body < 0.21, chosen / body
    assert 0.65 < masked / chosen < 0.95, masked / chosen
    # The masked token loss reads the tag labels too.
    b = _batch(spec, tok, samples, 0)
    with torch.no_grad():
        both = model(b)["mlm"]
        words_only = model(b | {"tag_mlm_labels": torch.full_like(b["tag_mlm_labels"], IGNORE)})
    assert not torch.allclose(both, words_only["mlm"])


def test_oscar_pollutes_half_the_tag_sequences(tok):
    model = _model("oscar", tok)
    spec = _spec(model)
    samples = _samples(8)
    truth = [tag_text(s["tags.json"]) for s in samples]
    true_ids = [tok.encode(t, 64).ids[1:] for t in truth]
    polluted = rows = 0
    for seed in range(40):
        b = _batch(spec, tok, samples, seed)
        for i, label in enumerate(b["contrastive_labels"].tolist()):
            got = _true_tag_ids(b, i)
            if label == 1:
                assert got == true_ids[i]
            else:  # another row's tags, never its own
                assert got != true_ids[i] and got in true_ids
            polluted += label == 0
            rows += 1
    assert 0.4 < polluted / rows < 0.6, polluted / rows
    # Eval batches (plain, ITM, MLM) always carry the image's own tags.
    for tasks in ({}, {"itm": 1.0}, {"mlm": 1.0}):
        b = _batch(replace(spec, tasks=tasks), tok, samples, 5)
        assert b["contrastive_labels"].tolist() == [1] * 8
    assert model.itm_score(b).shape == (8,)


def test_oscar_cuts_tags_past_the_position_table(tok):
    samples = _samples(1)
    b = _batch(replace(_spec(_model("oscar", tok)), tasks={"mlm": 1.0}), tok, samples)
    n_words = b["input_ids"].shape[1]
    torch.manual_seed(0)
    short = build_recipe(
        "oscar", "small", tok.vocab_size, region_dim=FEAT_DIM, num_region_classes=N_CLASSES,
        max_len=n_words + 2,
    ).eval()  # fmt: skip
    assert int(b["tag_mask"].sum()) > 2
    changed = b | {"tag_ids": b["tag_ids"].clone()}
    changed["tag_ids"][:, 2:] = tok.mask_id
    with torch.no_grad():
        a, _, _ = short.encode(b)
        c, _, _ = short.encode(changed)
    # Words, the first two tags and the regions see nothing of the cut tags, and the masked token
    # loss predicts none of them.
    n_regions = b["region_feats"].shape[1]
    keep = torch.cat([torch.arange(n_words + 2), torch.arange(a.shape[1] - n_regions, a.shape[1])])
    torch.testing.assert_close(a[:, keep], c[:, keep])
    cut_only = torch.full_like(b["tag_mlm_labels"], IGNORE)
    cut_only[:, 2:] = b["tag_ids"][:, 2:]
    only_cut = b | {
        "mlm_labels": torch.full_like(b["mlm_labels"], IGNORE),
        "tag_mlm_labels": cut_only,
    }
    assert float(short(only_cut)["mlm"]) == 0.0
