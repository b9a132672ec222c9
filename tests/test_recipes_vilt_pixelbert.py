"""The two pixel recipes' distinctive pieces: ViLT's patch embeddings, image-swap ITM negatives,
word-patch alignment wiring and whole-word masking (declared by the recipe, applied by the
trainer's batch spec); Pixel-BERT's pixel sampling, semantic embedding and torchvision ResNets;
and, for both, gradients to every parameter and a loss that falls on a fixed batch."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from test_recipes import VOCAB, make_batch

from vlforge.train.blocks import ResNetFeatures
from vlforge.train.collate import Assembler
from vlforge.train.masking import IGNORE, MaskingConfig
from vlforge.train.recipes import build_recipe
from vlforge.train.tokenizer import train_wordpiece
from vlforge.train.trainer import TrainConfig, batch_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "above", "below", "left", "of"]
LONG = ["supercalifragilistic", "antidisestablishment", "floccinaucinihilipilification"]


def small(name: str, **kw):
    torch.manual_seed(0)
    return build_recipe(name, "small", VOCAB, **kw)


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS + LONG, size=6)) for _ in range(n)]


def samples(n: int, seed: int = 0) -> list[dict]:
    caps = captions(n, seed)
    return [
        {"__key__": f"k{i}", "txt": c, "json": {}, "jpg": Image.new("RGB", (16, 16), (i * 9,) * 3)}
        for i, c in enumerate(caps)
    ]


@pytest.fixture(scope="module")
def tok():
    # A small vocabulary: the long words split into several WordPiece pieces.
    return train_wordpiece(captions(200) + WORDS, vocab_size=80)


def spec_for(name: str, masking: MaskingConfig | None = None):
    cfg = TrainConfig(recipe=name, shards="unused", out="unused")
    if masking is not None:
        cfg.masking = masking
    return batch_spec(small(name), cfg)


# -- ViLT --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "patch"), [(32, 8), (64, 16), (64, 8)])
def test_vilt_patch_count_and_shapes(image, patch):
    model = small("vilt", image_size=image, patch_size=patch).eval()
    conv = model.image.proj
    assert conv.kernel_size == conv.stride == (patch, patch)
    grid = image // patch
    b = make_batch(model)
    emb = model.image(b["pixel_values"])
    assert emb.shape == (4, 1 + grid * grid, 64)  # the image [class] token + the patches
    x, mask, n_text = model.embed(b)
    assert x.shape == (4, 9 + 1 + grid * grid, 64) and n_text == 9
    assert mask[:, n_text:].all()
    # modal-type embeddings: text rows carry type 0, image rows type 1
    torch.testing.assert_close(x[:, n_text:] - emb, model.modality.weight[1].expand_as(emb))
    assert model.itm_score(b).shape == (4,) and model.mlm_logits(b).shape == (4, 9, VOCAB)


def test_vilt_other_image_sizes_interpolate_positions():
    model = small("vilt").eval()  # 64 px, 16 px patches: a 4×4 grid
    pos = model.image.grid_positions(4, 4)
    assert torch.equal(pos, model.image.position.weight[1:])
    wide = model.image.grid_positions(6, 6)
    # corners aligned: the grid's corners keep their embeddings
    torch.testing.assert_close(wide.view(6, 6, -1)[0, 0], pos.view(4, 4, -1)[0, 0])
    torch.testing.assert_close(wide.view(6, 6, -1)[-1, -1], pos.view(4, 4, -1)[-1, -1])
    assert model.image(torch.randn(2, 3, 96, 96)).shape == (2, 37, 64)


def test_vilt_declares_its_masking_and_a_set_flag_wins():
    spec = spec_for("vilt")
    assert spec.masking.mlm_mode == "word"
    assert spec.masking.itm_image_swap == 1.0 and spec.masking.itm_neg_ratio == 0.5
    flagged = spec_for("vilt", MaskingConfig(mlm_mode="span")).masking
    assert flagged.mlm_mode == "span" and flagged.itm_image_swap == 1.0
    assert spec_for("pixel_bert").masking == MaskingConfig()  # no declared choices


def test_vilt_itm_negatives_are_image_swaps_half_the_time(tok):
    spec = replace(spec_for("vilt"), tasks={"itm": 1.0})  # unmasked text: compare it whole
    asm = Assembler(spec, tok)
    negatives = rows = 0
    for i in range(40):
        batch_samples = samples(8, seed=i)
        batch = asm(batch_samples, np.random.default_rng(i))
        for r, s in enumerate(batch_samples):
            want = tok.encode(s["txt"], spec.max_text_len).ids
            got = batch["input_ids"][r, : len(want)].tolist()
            assert got == want  # the caption is always the sample's own
            swapped = batch["keys"][r] != s["__key__"]
            assert swapped == (int(batch["itm_labels"][r]) == 0)  # negative ⇔ another image
            negatives += swapped
            rows += 1
    assert 0.4 < negatives / rows < 0.6


def test_vilt_whole_word_masking_masks_all_pieces_together(tok):
    spec = spec_for("vilt")
    caps = captions(300, seed=3)
    batch = Assembler(spec, tok).text(caps, np.ones(len(caps), bool), np.random.default_rng(0))
    labels = batch["mlm_labels"].numpy()
    split_words_masked = 0
    for row, caption in enumerate(caps):
        words = tok.encode(caption, spec.max_text_len).word_ids
        for w in {w for w in words if w is not None}:
            picked = [labels[row, k] != IGNORE for k, x in enumerate(words) if x == w]
            assert all(picked) or not any(picked), f"word {w} of {caption!r} partly masked"
            split_words_masked += len(picked) > 1 and all(picked)
    assert split_words_masked > 10  # the check above saw many multi-piece words masked


def test_vilt_wpa_wiring_aligned_beats_shuffled():
    """A hand case through the recipe's WPA: patches that are the words (permuted) are at
    distance ~0, another caption's patches at 1. [CLS], [SEP] and the image [class] token are
    orthogonal to everything: were they transported, the aligned distance would not be ~0."""
    model = small("vilt")
    e = torch.eye(16)
    # [CLS] words [SEP] padding | [img-cls] patches: row 0 has three words and padding, row 1
    # six (each patch's word twice), so [SEP] sits at a different place in each row.
    text = torch.stack([e[[0, 1, 2, 3, 4, 5, 5, 5]], e[[0, 1, 1, 2, 2, 3, 3, 4]]])
    mask_t = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])
    aligned = torch.stack([e[[6, 3, 1, 2]], e[[6, 2, 3, 1]]])
    hidden = torch.cat([text, aligned], 1)
    mask = torch.cat([mask_t, torch.ones(2, 4, dtype=torch.long)], 1)
    near = model.wpa_distance(hidden, mask, 8)
    assert (near < 0.02).all(), near
    shuffled = torch.cat([text, torch.stack([e[[6, 7, 8, 9]], e[[6, 10, 11, 12]]])], 1)
    far = model.wpa_distance(shuffled, mask, 8)
    torch.testing.assert_close(far, torch.ones(2), atol=1e-4, rtol=0)


def test_vilt_total_is_itm_mlm_and_a_tenth_of_wpa():
    model = small("vilt")
    out = model(make_batch(model))
    assert set(out) == {"loss", "itm", "mlm", "wpa"}
    torch.testing.assert_close(out["loss"], out["itm"] + out["mlm"] + 0.1 * out["wpa"])


def test_vilt_patch_sampling_in_training_only():
    model = small("vilt", image_size=64, patch_size=8, max_image_length=10)
    b = make_batch(model)
    assert model.train().embed(b)[0].shape[1] == 9 + 1 + 10
    assert model.eval().embed(b)[0].shape[1] == 9 + 1 + 64


# -- Pixel-BERT --------------------------------------------------------------------------------


def test_pixel_bert_samples_pixels_in_training_all_at_eval():
    model = small("pixel_bert", pixel_samples=12)  # 32 px, the stem + a stage: 8×8 pixels
    b = make_batch(model)
    full = model.eval().pixel_tokens(b["pixel_values"])
    assert full.shape == (4, 64, 64)
    model.train()
    model.cnn.eval()  # BatchNorm on running stats, so sampled tokens equal full ones
    sampled = model.pixel_tokens(b["pixel_values"])
    assert sampled.shape == (4, 12, 64)
    for row in range(4):  # each sampled token is one of that image's pixels, none twice
        exact = "donot_use_mm_for_euclid_dist"  # large norms: the mm form loses digits
        hit = torch.cdist(sampled[row], full[row], compute_mode=exact).min(1)
        assert (hit.values < 1e-5).all() and len(set(hit.indices.tolist())) == 12
    again = model.pixel_tokens(b["pixel_values"])
    assert not torch.equal(sampled, again)  # a new draw each step
    assert model.encode(b)[0].shape == (4, 9 + 12, 64)


def test_pixel_bert_semantic_embedding_on_every_pixel():
    model = small("pixel_bert").eval()
    pixels = make_batch(model)["pixel_values"]
    with torch.no_grad():
        feats = model.cnn(pixels).flatten(2).transpose(1, 2)
        tokens = model.pixel_tokens(pixels)
        torch.testing.assert_close(
            tokens - model.pixel_proj(feats), model.pixel_semantic.expand_as(tokens)
        )
        delta = torch.randn(64)
        model.pixel_semantic.add_(delta)
        shifted = model.pixel_tokens(pixels)
    torch.testing.assert_close(shifted - tokens, delta.expand_as(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "channels"), [("resnet18", 512), ("resnet50", 2048)])
def test_pixel_bert_any_torchvision_resnet(name, channels):
    cnn = ResNetFeatures(name)
    assert cnn.out_channels == channels and cnn.stride == 32
    model = small(
        "pixel_bert", backbone=name, resnet_blocks=None, resnet_stages=4, image_size=64
    ).eval()
    b = make_batch(model, b=2)
    with torch.no_grad():
        assert model.cnn(b["pixel_values"]).shape == (2, channels, 2, 2)
        assert model.itm_score(b).shape == (2,)
        assert model.mlm_logits(b).shape == (2, 9, VOCAB)
    with pytest.raises(ValueError, match="unknown ResNet"):
        ResNetFeatures("resnet7")


# -- both --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vilt", "pixel_bert"])
def test_every_parameter_trains(name):
    model = small(name)
    model(make_batch(model))["loss"].backward()
    missed = {n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()}
    assert not missed, sorted(missed)


@pytest.mark.parametrize("name", ["vilt", "pixel_bert"])
def test_thirty_steps_loss_falls(name):
    model = small(name)
    batch = make_batch(model, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def total() -> float:
        torch.manual_seed(1)  # the same pixels/patches sampled at both measurements
        with torch.no_grad():
            return float(model(batch)["loss"])

    before = total()
    for _ in range(30):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    assert total() < 0.5 * before
