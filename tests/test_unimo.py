"""UNIMO: the seq2seq mask, overlap-aware region masking, CMCL against a hand computation, the
loader's data mixing, and every loss falling on a fixed batch."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from vlforge.train.blocks import seq2seq_attention_mask
from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.losses import IGNORE, cmcl_loss, multi_positive_nce
from vlforge.train.masking import MaskingConfig, select_regions
from vlforge.train.recipes import build_recipe
from vlforge.train.recipes.unimo import IMAGE_ONLY, PAIR, TEXT_ONLY, Unimo
from vlforge.train.tokenizer import train_wordpiece

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["red", "green", "blue", "big", "small", "circle", "square", "star", "left", "above"]


def make_samples(n: int, seed: int = 0, dim: int = 16, classes: int = 6) -> list[dict]:
    """In-memory samples shaped like decoded shard samples (regions + mine.json)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        caption = " ".join(rng.choice(WORDS, size=5)) + f" {WORDS[i % len(WORDS)]}"
        r = int(rng.integers(3, 6))
        xy = rng.uniform(0, 20, size=(r, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(4, 12, size=(r, 2))], 1).astype(np.float32)
        prob = rng.dirichlet(np.ones(classes), size=r).astype(np.float32)
        out.append(
            {
                "__key__": f"k{i}",
                "txt": caption,
                "json": {"width": 32, "height": 32},
                "boxes.npy": boxes,
                "feats.npy": rng.normal(size=(r, dim)).astype(np.float32),
                "cls_prob.npy": prob,
                "mine.json": {
                    "hard_negatives": [],
                    "positives": [{"caption": f"a retrieved {WORDS[i % 3]} text", "key": "zz"}],
                    "image_positives": [],
                    "rewrites": [{"caption": f"a rewritten {WORDS[i % 4]} text", "kind": "obj"}],
                },
            }
        )
    return out


def spec_of(model: Unimo, **kw) -> BatchSpec:
    return BatchSpec(
        inputs=model.inputs,
        tasks=dict(model.tasks),
        geometry=model.geometry,
        region_mask_overlap=model.region_mask_overlap,
        max_text_len=16,
        max_regions=8,
        extra_fields=model.extra_fields,
        hook=type(model).batch_hook,
        **kw,
    )


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(WORDS + ["a retrieved text", "a rewritten text"], 60)


# -- the seq2seq mask -------------------------------------------------------------------------


def test_seq2seq_mask_matches_the_hand_drawn_case():
    # 2 image tokens (i0 i1), 3 caption tokens (c0 c1 c2); rows are queries, columns keys.
    expected = torch.tensor(
        [
            # i0 i1 c0 c1 c2
            [1, 1, 0, 0, 0],  # i0: the image only
            [1, 1, 0, 0, 0],  # i1
            [1, 1, 1, 0, 0],  # c0: image + itself
            [1, 1, 1, 1, 0],  # c1: image + c0, c1
            [1, 1, 1, 1, 1],  # c2: image + every caption token
        ],
        dtype=torch.bool,
    )
    mask = seq2seq_attention_mask(torch.ones(1, 5, dtype=torch.long), 2)
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0], expected)
    # A padded last caption token is hidden from every query; per-row source lengths work.
    padded = seq2seq_attention_mask(torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), 2)
    assert torch.equal(padded[0, 0], expected & torch.tensor([1, 1, 1, 1, 0], dtype=torch.bool))
    prefix = seq2seq_attention_mask(torch.ones(1, 5), torch.tensor([3]))
    assert prefix[0, 0, 0].tolist() == [True, True, True, False, False]  # c0 joins the source


def test_recipe_decodes_left_to_right_only():
    """Under the seq2seq mask the visual part and caption positions ≤ t ignore later tokens
    (changing c3 leaves them alone) while the bidirectional MLM pass sees them; decoding one
    token at a time gives the teacher-forced pass's logits."""
    torch.manual_seed(0)
    model = build_recipe("unimo", "small", 40, region_dim=16, num_region_classes=6).eval()
    batch = {"region_feats": torch.randn(1, 3, 16), "region_geom": torch.rand(1, 3, 5)}
    a, b = torch.tensor([[2, 7, 9, 11]]), torch.tensor([[2, 7, 9, 30]])
    with torch.no_grad():
        ha, n_vis = model.joint(batch, a, None, batch["region_feats"], seq2seq=True)
        hb, _ = model.joint(batch, b, None, batch["region_feats"], seq2seq=True)
        assert n_vis == 4  # [IMG] + 3 regions
        assert torch.equal(ha[:, : n_vis + 3], hb[:, : n_vis + 3])
        assert not torch.allclose(ha[:, -1], hb[:, -1])
        step = model.next_token_logits(batch, a[:, :3])
        assert torch.allclose(step, model.lm(ha[:, n_vis + 2]), atol=1e-5)
        full = {**batch, "input_ids": a, "region_mask": torch.ones(1, 3)}
        m1 = model.mlm_logits(full)[0, 1]
        m2 = model.mlm_logits({**full, "input_ids": b})[0, 1]
        assert not torch.allclose(m1, m2)


# -- overlap-aware region masking -------------------------------------------------------------


class _Draws:
    """An RNG stand-in whose uniform draws are fixed: the test chooses the region."""

    def __init__(self, values: list[float]):
        self.values = np.array(values)

    def random(self, n: int) -> np.ndarray:
        return self.values[:n]


def test_regions_overlapping_a_masked_one_are_masked_with_it():
    boxes = np.array(
        [
            [0, 0, 10, 10],  # A: the chosen one
            [5, 0, 15, 10],  # IoU with A = 50 / 150 = 0.333 ≥ 0.3 → masked too
            [0, 0, 10, 5],  # IoU 0.5 → masked too
            [6, 0, 16, 10],  # IoU 40 / 160 = 0.25 < 0.3 → kept
            [20, 20, 30, 30],  # no overlap → kept
            [12, 0, 22, 10],  # overlaps B (0.25 no) but not A → kept: one hop from the chosen
        ],
        dtype=np.float32,
    )
    cfg = MaskingConfig(region_prob=0.15, overlap_iou=0.3)
    draws = [0.01, 0.9, 0.9, 0.9, 0.9, 0.9]
    with_overlap = select_regions(boxes, _Draws(draws), cfg, overlap=True)
    assert with_overlap.tolist() == [True, True, True, False, False, False]
    alone = select_regions(boxes, _Draws(draws), cfg, overlap=False)
    assert alone.tolist() == [True, False, False, False, False, False]
    assert Unimo.region_mask_overlap  # the recipe asks the loader for it


def test_unimo_batches_mask_overlapping_regions_together(tok):
    model = build_recipe("unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6)
    samples = make_samples(8)
    # Two identical boxes: whenever one is masked the other must be (IoU = 1).
    for s in samples:
        s["boxes.npy"][1] = s["boxes.npy"][0]
    asm = Assembler(spec_of(model, masking=MaskingConfig(region_prob=0.3)), tok)
    hits = 0
    for seed in range(20):
        b = asm(samples, np.random.default_rng(seed))
        m = b["mrm_mask"]
        keep = b["modality"] != TEXT_ONLY
        assert torch.equal(m[keep, 0], m[keep, 1])
        hits += int(m[keep, 0].sum())
    assert hits > 0


# -- CMCL --------------------------------------------------------------------------------------


def test_cmcl_matches_a_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    extra = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # row 0: a retrieved positive, a rewrite
    loss = cmcl_loss(
        img, txt, torch.eye(2, dtype=torch.bool), 2.0,
        extra, torch.tensor([0, 0]), torch.tensor([True, False]),
    )  # fmt: skip
    e = math.exp
    # image 0: captions 1.2 (own), 1.6, the retrieved 2.0 (positive), the rewrite 0.0.
    i0 = math.log(e(1.2) + e(1.6) + e(2.0) + e(0.0)) - math.log(e(1.2) + e(2.0))
    i1 = math.log(e(1.6) + e(-1.2)) - (-1.2)  # image 1: 1.6, −1.2 (own); no extras
    t0 = math.log(e(1.2) + e(1.6)) - 1.2  # caption 0 over the images
    t1 = math.log(e(1.6) + e(-1.2)) - (-1.2)
    assert loss.item() == pytest.approx(((i0 + i1) / 2 + (t0 + t1) / 2) / 2, rel=1e-6)
    # Without the extra positive in the numerator, the loss is higher (it is a positive).
    worse = cmcl_loss(
        img, txt, torch.eye(2, dtype=torch.bool), 2.0,
        extra, torch.tensor([0, 0]), torch.tensor([False, False]),
    )  # fmt: skip
    assert worse.item() > loss.item()
    assert multi_positive_nce(torch.tensor([[0.0, 0.0]]), torch.tensor([[True, True]])) == 0


def test_hook_reads_positives_and_rewrites_from_mine_json(tok):
    model = build_recipe(
        "unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6,
        text_only_ratio=0.0, image_only_ratio=0.0,
    )  # fmt: skip
    samples = make_samples(3)
    samples[0]["mine.json"]["image_positives"] = [{"key": "k2", "score": 0.9}]
    samples[1]["mine.json"]["positives"].append({"caption": samples[2]["txt"], "key": "k2"})
    b = Assembler(spec_of(model), tok)(samples, np.random.default_rng(0))
    pos = b["cmcl_positive"]
    assert pos[2, 0] and pos[1, 2] and pos.diagonal().all()  # in-batch image and text positives
    assert int(pos.sum()) == 5
    texts = [tok.decode(r[m.bool()].tolist()) for r, m in zip(b["cmcl_extra_ids"],
                                                              b["cmcl_extra_mask"], strict=True)]  # fmt: skip
    assert b["cmcl_extra_row"].tolist() == [0, 0, 1, 1, 2, 2]
    assert b["cmcl_extra_positive"].tolist() == [True, False] * 3
    assert texts[0] == "a retrieved red text" and texts[1] == "a rewritten red text"


# -- data mixing -------------------------------------------------------------------------------


def test_mixing_ratios_hold_on_a_large_sample_and_shape_the_rows(tok):
    model = build_recipe(
        "unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6,
        text_only_ratio=0.2, image_only_ratio=0.3,
    )  # fmt: skip
    hook = type(model).batch_hook
    kinds = hook.kinds(np.random.default_rng(0), 40_000)
    assert abs((kinds == TEXT_ONLY).mean() - 0.2) < 0.01
    assert abs((kinds == IMAGE_ONLY).mean() - 0.3) < 0.01
    assert abs((kinds == PAIR).mean() - 0.5) < 0.01

    samples = make_samples(16)
    spec = spec_of(model)
    b = Assembler(spec, tok)(samples, np.random.default_rng(3))
    again = Assembler(spec, tok)(samples, np.random.default_rng(3))
    assert torch.equal(b["modality"], again["modality"])  # decided by the batch RNG
    kind = b["modality"]
    assert set(kind.tolist()) == {PAIR, TEXT_ONLY, IMAGE_ONLY}
    assert (b["region_mask"][kind == TEXT_ONLY] == 0).all()
    assert not b["mrm_mask"][kind == TEXT_ONLY].any()
    assert (b["region_mask"][kind == PAIR].sum(1) > 0).all()
    empty = tok.encode("", 16).ids
    for r in torch.nonzero(kind == IMAGE_ONLY).flatten().tolist():
        assert b["input_ids"][r, : len(empty)].tolist() == empty
        assert int(b["attention_mask"][r].sum()) == len(empty)
        assert (b["mlm_labels"][r] == IGNORE).all()
    # Evaluation batches (another task set) keep every row paired.
    plain = Assembler(replace(spec, tasks={}), tok)(samples, np.random.default_rng(3))
    assert (plain["modality"] == PAIR).all()
    # The ratios are config overrides and are checked.
    with pytest.raises(ValueError, match="must not exceed 1"):
        build_recipe("unimo", "small", 40, text_only_ratio=0.7, image_only_ratio=0.6)


# -- training ----------------------------------------------------------------------------------


def test_each_loss_falls_on_a_fixed_batch(tok):
    torch.manual_seed(0)
    model = build_recipe(
        "unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6,
        text_only_ratio=0.2, image_only_ratio=0.2,
    )  # fmt: skip
    asm, samples = Assembler(spec_of(model), tok), make_samples(8)
    # The first batch RNG that mixes all three kinds of rows: every loss path is exercised.
    batch = next(
        b
        for b in (asm(samples, np.random.default_rng(seed)) for seed in range(100))
        if set(b["modality"].tolist()) == {PAIR, TEXT_ONLY, IMAGE_ONLY}
    )
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = last = None
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        last = {k: v.item() for k, v in out.items()}
        first = first or last
    assert set(first) == {"loss", "cmcl", "mlm", "seq2seq", "mrfr", "mrc"}
    for name, value in first.items():
        assert last[name] < value, (name, value, last[name])


def test_cmcl_uses_the_paired_rows_and_their_own_extras(tok):
    """CMCL of a mixed batch equals CMCL of a batch made of its paired rows alone: text-only and
    image-only rows and their mine.json extras stay out, the extras follow their anchors."""
    torch.manual_seed(0)
    mixed_model = build_recipe(
        "unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6,
        text_only_ratio=0.3, image_only_ratio=0.3,
    )  # fmt: skip
    samples = make_samples(8)
    batch = Assembler(spec_of(mixed_model), tok)(samples, np.random.default_rng(5))
    kind = batch["modality"]
    assert (kind == PAIR).sum() >= 2 and (kind != PAIR).any()
    alone_model = build_recipe(
        "unimo", "small", tok.vocab_size, region_dim=16, num_region_classes=6,
        text_only_ratio=0.0, image_only_ratio=0.0,
    )  # fmt: skip
    alone_model.load_state_dict(mixed_model.state_dict())
    paired = [s for s, k in zip(samples, kind.tolist(), strict=True) if k == PAIR]
    alone = Assembler(spec_of(alone_model), tok)(paired, np.random.default_rng(0))
    with torch.no_grad():
        a = mixed_model.cmcl_loss(batch, kind)
        b = alone_model.cmcl_loss(alone, alone["modality"])
    assert a.item() == pytest.approx(b.item(), rel=1e-4)
