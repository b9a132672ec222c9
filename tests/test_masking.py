"""Each masking rule's rates on large samples, and the structural rules (whole words, spans,
overlap groups, one modality at a time, matched pairs only)."""

from __future__ import annotations

import numpy as np
import pytest
from test_train_data import _samples

from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.masking import (
    IGNORE,
    MaskingConfig,
    box_iou,
    mask_regions,
    mask_tokens,
    select_regions,
)
from vlforge.train.tokenizer import train_wordpiece

MASK, VOCAB, SPECIAL = 4, 1000, 5
RANDOM_IDS = np.arange(SPECIAL, VOCAB)


def sequences(rng, n=4000, words=12, pieces=(1, 3)):
    """[CLS] + words of 1..3 pieces + [SEP]: ids and word ids (None on specials)."""
    for _ in range(n):
        ids, wids = [2], [None]
        for w in range(words):
            for _ in range(int(rng.integers(pieces[0], pieces[1] + 1))):
                ids.append(int(rng.integers(SPECIAL, VOCAB)))
                wids.append(w)
        ids.append(3)
        wids.append(None)
        yield np.array(ids), wids


@pytest.mark.parametrize("mode", ["token", "word", "span"])
def test_mlm_rates(mode):
    rng = np.random.default_rng(0)
    cfg = MaskingConfig(mlm_mode=mode)
    selected = candidates = masked = randomized = kept = 0
    for ids, wids in sequences(rng):
        out, labels = mask_tokens(ids, wids, rng, cfg, MASK, RANDOM_IDS)
        sel = labels != IGNORE
        special = np.array([w is None for w in wids])
        assert not sel[special].any() and (out[special] == ids[special]).all()
        assert (labels[sel] == ids[sel]).all() and (out[~sel] == ids[~sel]).all()
        selected += sel.sum()
        candidates += (~special).sum()
        masked += (out[sel] == MASK).sum()
        changed = sel & (out != MASK) & (out != ids)
        randomized += changed.sum()
        kept += (sel & (out == ids)).sum()
        if mode in ("word", "span"):  # all pieces of a word go together
            w = np.array([-1 if x is None else x for x in wids])
            for word in np.unique(w[sel]):
                assert sel[w == word].all()
    rate = selected / candidates
    assert abs(rate - 0.15) < 0.01, rate
    assert abs(masked / selected - 0.8) < 0.015
    # A random draw equals the original 1/995 of the time; that is inside the tolerance.
    assert abs(randomized / selected - 0.1) < 0.01
    assert abs(kept / selected - 0.1) < 0.01


def test_span_masking_makes_spans():
    rng = np.random.default_rng(1)
    cfg = MaskingConfig(mlm_mode="span")
    runs, selected = 0, 0
    for ids, wids in sequences(rng, n=2000, words=40, pieces=(1, 1)):
        _, labels = mask_tokens(ids, wids, rng, cfg, MASK, RANDOM_IDS)
        sel = labels != IGNORE
        selected += sel.sum()
        runs += int((sel[1:] & ~sel[:-1]).sum() + sel[0])
    # Geometric(0.2) clipped at 10 has mean ≈ 3.9 words; spans may touch, so runs ≥ 2 is safe,
    # while token masking at 15% gives runs of mean ≈ 1.18.
    assert selected / runs > 2.0


def test_region_rates_and_zeroing():
    rng = np.random.default_rng(2)
    cfg = MaskingConfig()
    n_sel = n_total = n_zero = 0
    for _ in range(3000):
        n = 20
        boxes = np.sort(rng.uniform(0, 1, size=(n, 2, 2)), axis=1).transpose(0, 2, 1).reshape(n, 4)
        feats = rng.normal(size=(n, 8)).astype(np.float32) + 3
        sel = select_regions(boxes, rng, cfg, overlap=False)
        out = mask_regions(feats, sel, rng, cfg)
        zeroed = (out == 0).all(axis=1)
        assert not zeroed[~sel].any() and (out[~sel] == feats[~sel]).all()
        assert ((out[sel] == 0).all(1) | (out[sel] == feats[sel]).all(1)).all()
        n_sel += sel.sum()
        n_total += n
        n_zero += zeroed.sum()
    assert abs(n_sel / n_total - 0.15) < 0.01
    assert abs(n_zero / n_sel - 0.9) < 0.015


def test_overlapping_regions_are_masked_together():
    rng = np.random.default_rng(3)
    cfg = MaskingConfig()
    grew = 0
    for _ in range(500):
        xy = rng.uniform(0, 0.7, size=(15, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(0.1, 0.3, size=(15, 2))], axis=1)
        iou = box_iou(boxes)
        state = rng.bit_generator.state
        alone = select_regions(boxes, rng, cfg, overlap=False)
        rng.bit_generator.state = state
        together = select_regions(boxes, rng, cfg, overlap=True)
        assert (together >= alone).all()  # the same seeds, plus their neighbours
        for i in np.flatnonzero(alone):
            assert together[iou[i] >= 0.3].all()
        # Nothing joins without an overlapping selected seed.
        for j in np.flatnonzero(together & ~alone):
            assert (iou[j][alone] >= 0.3).any()
        grew += int((together & ~alone).sum())
    assert grew > 0


def test_box_iou_by_hand():
    a = np.array([[0, 0, 2, 2], [1, 1, 3, 3], [5, 5, 6, 6]], dtype=np.float32)
    iou = box_iou(a)
    np.testing.assert_allclose(iou[0, 1], 1 / 7, rtol=1e-6)
    assert iou[0, 2] == 0 and iou[1, 1] == 1


def test_conditional_masking_one_modality_per_row(tmp_path):
    samples = _samples(tmp_path, 24)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    spec = BatchSpec(
        tasks={"mlm": 1, "mrfr": 1},
        conditional_masking=True,
        masking=MaskingConfig(mlm_prob=0.5, region_prob=0.5),
    )
    asm = Assembler(spec, tok)
    text_rows = region_rows = 0
    for i in range(40):
        b = asm(samples, np.random.default_rng(i))
        t = (b["mlm_labels"] != IGNORE).any(1)
        r = b["mrm_mask"].any(1)
        assert not (t & r).any()
        text_rows += int(t.sum())
        region_rows += int(r.sum())
    assert text_rows > 300 and region_rows > 300
    # Without conditional masking both modalities are masked in the same rows.
    both = Assembler(BatchSpec(tasks=spec.tasks, masking=spec.masking), tok)
    b = both(samples, np.random.default_rng(0))
    assert ((b["mlm_labels"] != IGNORE).any(1) & b["mrm_mask"].any(1)).any()


def test_batch_masking_rates_through_the_assembler(tmp_path):
    samples = _samples(tmp_path, 24)
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    asm = Assembler(BatchSpec(tasks={"mlm": 1, "mrc": 1}), tok)
    sel = cand = regs = reg_sel = 0
    for i in range(150):
        b = asm(samples, np.random.default_rng(i))
        body = (
            (b["attention_mask"] == 1)
            & (b["input_ids"] != tok.cls_id)
            & (b["input_ids"] != tok.sep_id)
        )
        sel += int((b["mlm_labels"] != IGNORE).sum())
        cand += int(body.sum())
        regs += int(b["region_mask"].sum())
        reg_sel += int(b["mrm_mask"].sum())
        target = b["region_feats_target"][b["mrm_mask"]]
        feats = b["region_feats"][b["mrm_mask"]]
        assert ((feats == 0).all(1) | (feats == target).all(1)).all()
    assert abs(sel / cand - 0.15) < 0.015
    assert abs(reg_sel / regs - 0.15) < 0.015
