"""Each recipe follows its paper where the survey's recipes differ: the masked-region policy,
UNIMO's one-modality masking, VILLA's raw-embedding perturbations, the MoE router and experts.

Each test is written so that the behaviour it replaced fails it."""

from __future__ import annotations

import numpy as np
import pytest
from test_train_data import _samples

from vlforge.train import trainer
from vlforge.train.collate import Assembler
from vlforge.train.recipes import build_recipe
from vlforge.train.tokenizer import train_wordpiece


def recipe_assembler(name: str, samples: list[dict], **masking) -> Assembler:
    """The Assembler a run of `name` builds: the recipe's declared masking over the defaults."""
    tok = train_wordpiece([s["txt"] for s in samples], vocab_size=120)
    model = build_recipe(name, "small", tok.vocab_size, region_dim=samples[0]["feats.npy"].shape[1])
    cfg = trainer.TrainConfig(recipe=name, shards="-", out="-")
    spec = trainer.batch_spec(model, cfg)
    if masking:
        spec.masking = type(spec.masking)(**{**spec.masking.__dict__, **masking})
    return Assembler(spec, tok)


def masked_region_outcomes(name: str, tmp_path, batches: int = 60) -> dict[str, int]:
    """Counts of the masked regions a recipe's batches zero, replace or keep, over many batches
    at a high region rate; "replaced" rows must equal some other region of the same batch."""
    samples = _samples(tmp_path, 24)
    asm = recipe_assembler(name, samples, region_prob=0.5, itm_neg_ratio=0.0)
    asm.spec.tasks = {"mrfr": 1.0}  # region masking on every row (one task per batch)
    asm.spec.task_mode = "sum"
    asm.spec.conditional_masking = False
    counts = {"zeroed": 0, "replaced": 0, "kept": 0, "foreign": 0}
    for i in range(batches):
        b = asm(samples, np.random.default_rng(i))
        sel = b["mrm_mask"]
        feats, target = b["region_feats"][sel], b["region_feats_target"][sel]
        pool = b["region_feats_target"][b["region_mask"].bool()]
        zeroed = (feats == 0).all(1)
        kept = (feats == target).all(1)
        replaced = ~zeroed & ~kept
        counts["zeroed"] += int(zeroed.sum())
        counts["kept"] += int(kept.sum())
        counts["replaced"] += int(replaced.sum())
        for f in feats[replaced]:  # a real region feature of this batch, not noise
            counts["foreign"] += int(not (pool == f).all(1).any())
    return counts


@pytest.mark.parametrize("name", ["uniter", "villa"])
def test_uniter_and_villa_zero_every_masked_region(name, tmp_path):
    # UNITER's reference (`_mask_img_feat`) zeroes every masked region: a kept one would let
    # feature regression copy its input.
    c = masked_region_outcomes(name, tmp_path)
    assert c["zeroed"] > 500
    assert c["kept"] == 0 and c["replaced"] == 0


def test_lxmert_masks_regions_80_10_10(tmp_path):
    # LXMERT's `random_feat`: 80% zeroed, 10% a random region feature, 10% kept.
    c = masked_region_outcomes("lxmert", tmp_path, batches=120)
    total = sum(c[k] for k in ("zeroed", "replaced", "kept"))
    assert total > 1500
    assert abs(c["zeroed"] / total - 0.8) < 0.04
    assert abs(c["replaced"] / total - 0.1) < 0.03
    assert abs(c["kept"] / total - 0.1) < 0.03
    assert c["foreign"] == 0


@pytest.mark.parametrize("name", ["vilbert", "imagebert"])
def test_vilbert_and_imagebert_keep_their_90_10(name, tmp_path):
    c = masked_region_outcomes(name, tmp_path, batches=120)
    total = sum(c[k] for k in ("zeroed", "replaced", "kept"))
    assert c["replaced"] == 0
    assert abs(c["zeroed"] / total - 0.9) < 0.03
