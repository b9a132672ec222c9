"""DALL-E: the sparse masks against hand-drawn grids, the dVAE's relaxation and training, the
transformer's loss, CLIP reranking against the truth of rendered images, and `vlforge generate`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_data import COLOURS, SHAPES, make_shards, render

from tests.conftest import run_cli
from vlforge.train import trainer
from vlforge.train.blocks.sparse_attention import layer_kinds, sparse_mask
from vlforge.train.collate import Assembler, BatchSpec, image_to_tensor
from vlforge.train.dalle_sampling import clip_scores, rerank
from vlforge.train.losses.dvae import gumbel_codes, kl_to_uniform
from vlforge.train.recipes import build_recipe
from vlforge.train.tokenizer import train_wordpiece

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:dalle. no dvae_ckpt"),
]


def grid(text: str) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in row.split()[0]] for row in text.strip().splitlines()])


# 2 text tokens (t0 t1), then a 3×3 image in raster order (i0 … i8); row = query, column = key.
#                  t0t1 i0i1i2i3i4i5i6i7i8
ROW = grid("""
                 x..........   t0
                 xx.........   t1
                 xxx........   i0
                 xxxx.......   i1
                 xxxxx......   i2
                 xxxxxx.....   i3: i0..i3 (back to the same column of the previous row)
                 xx.xxxx....   i4: i1..i4
                 xx..xxxx...   i5
                 xx...xxxx..   i6
                 xx....xxxx.   i7
                 xx.....xxxx   i8
""")
COLUMN = grid("""
                 x..........
                 xx.........
                 xxx........   i0
                 xx.x.......   i1
                 xx..x......   i2
                 xxx..x.....   i3: i0, i3
                 xx.x..x....   i4: i1, i4
                 xx..x..x...   i5: i2, i5
                 xxx..x..x..   i6: i0, i3, i6
                 xx.x..x..x.   i7
                 xx..x..x..x   i8
""")
CONV = grid("""
                 x..........
                 xx.........
                 xxx........   i0
                 xxxx.......   i1: i0, i1
                 xx.xx......   i2: i1, i2
                 xxxx.x.....   i3: i0 i1 / i3
                 xxxxxxx....   i4: i0 i1 i2 / i3 i4
                 xx.xx.xx...   i5: i1 i2 / i4 i5
                 xx...xx.x..   i6: i3 i4 / i6
                 xx...xxxxx.   i7: i3 i4 i5 / i6 i7
                 xx....xx.xx   i8: i4 i5 / i7 i8
""")


def test_sparse_masks_match_hand_drawn_grids():
    for kind, expected in (("row", ROW), ("column", COLUMN), ("conv", CONV)):
        got = sparse_mask(kind, text_len=2, height=3, width=3, kernel=3)
        assert torch.equal(got, expected), kind
        assert not got.triu(1).any(), kind  # causal
    # The paper's cycle: column at (i − 2) mod 4 = 0 (1-based), conv in the last layer.
    assert layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    with pytest.raises(ValueError):
        sparse_mask("diagonal", 2, 3, 3)


def test_gumbel_straight_through_is_one_hot_forward_with_soft_gradients():
    logits = torch.randn(2, 6, 3, 3, requires_grad=True)
    weight = torch.randn(2, 6, 3, 3)
    torch.manual_seed(0)
    hard = gumbel_codes(logits, 0.7, hard=True)
    (hard * weight).sum().backward()
    hard_grad = logits.grad.clone()
    logits.grad = None
    torch.manual_seed(0)  # the same gumbel noise
    soft = gumbel_codes(logits, 0.7, hard=False)
    (soft * weight).sum().backward()
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.sum(1), torch.ones(2, 3, 3))
    assert torch.equal(hard.argmax(1), soft.argmax(1))
    assert (soft.detach() < 1).all()  # the relaxed sample is not one-hot …
    assert torch.allclose(hard_grad, logits.grad)  # … and its gradient is the one used
    assert hard_grad.abs().sum() > 0


def test_kl_to_uniform():
    assert float(kl_to_uniform(torch.zeros(3, 8, 2, 2))) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_uniform(torch.full((1, 8, 2, 2), 5.0))) == pytest.approx(0.0, abs=1e-6)
    peaked = torch.zeros(1, 8, 2, 2)
    peaked[:, 3] = 50.0
    assert float(kl_to_uniform(peaked)) == pytest.approx(np.log(8), rel=1e-4)


def world_pixels(size: int = 32) -> torch.Tensor:
    """Every colour × shape of the test world, as the loader preprocesses them."""
    images = [Image.open(io.BytesIO(render(c, s, 64))) for c in COLOURS for s in SHAPES]
    return torch.stack([image_to_tensor(im, size) for im in images])


def test_dvae_reconstruction_error_falls():
    torch.manual_seed(0)
    model = build_recipe("dvae", "small")
    pixels = world_pixels()
    model.eval()
    before = float(model({"pixel_values": pixels})["recon"])  # through the argmax codes
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        model({"pixel_values": pixels})["loss"].backward()
        opt.step()
    assert int(model.forwards) == 60 and model.temperature() < model.cfg.temperature
    model.eval()
    after = float(model({"pixel_values": pixels})["recon"])
    assert after < 0.6 * before, (before, after)


CAPTIONS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]


@pytest.fixture(scope="module")
def tok():
    return train_wordpiece(CAPTIONS * 3, vocab_size=60)


def pair_batch(tok, captions: list[str], pixels: torch.Tensor) -> dict:
    spec = BatchSpec(inputs=frozenset({"text"}), tasks={}, max_text_len=16)
    text = Assembler(spec, tok).text(
        captions, np.zeros(len(captions), bool), np.random.default_rng()
    )
    return {**text, "pixel_values": pixels}


def test_dalle_loss_falls_on_a_fixed_batch(tok):
    torch.manual_seed(0)
    model = build_recipe("dalle", "small", vocab_size=tok.vocab_size)
    assert not any(p.requires_grad for p in model.dvae.parameters())
    frozen = {k: v.clone() for k, v in model.dvae.state_dict().items()}
    batch = pair_batch(tok, CAPTIONS, world_pixels())
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        out = model(batch)
        out["loss"].backward()
        opt.step()
        losses.append({k: float(v) for k, v in out.items()})
    assert losses[-1]["loss"] < 0.6 * losses[0]["loss"], losses
    # Text comes first, so its loss is bounded by the captions' entropy; both fall.
    assert losses[-1]["image_ce"] < 0.5 * losses[0]["image_ce"]
    assert losses[-1]["text_ce"] < 0.5 * losses[0]["text_ce"]
    w = model.tasks
    assert losses[0]["loss"] == pytest.approx(
        w["text_ce"] * losses[0]["text_ce"] + w["image_ce"] * losses[0]["image_ce"], rel=1e-5
    )
    assert w == {"text_ce": 1 / 8, "image_ce": 7 / 8}
    assert all(torch.equal(v, model.dvae.state_dict()[k]) for k, v in frozen.items())


def test_clip_reranking_finds_the_image_the_caption_describes(tok):
    """A tiny CLIP trained on the rendered world picks, among 4 candidates of which exactly one
    has the caption's colour and shape, that one far more often than chance (1/4)."""
    torch.manual_seed(0)
    clip = build_recipe("clip", "small", vocab_size=tok.vocab_size)
    spec = BatchSpec(
        inputs=frozenset({"text", "pixels"}), tasks={}, max_text_len=16, image_size=clip.image_size
    )
    # Every combination once per batch: no caption is a false negative of another.
    batch = pair_batch(tok, CAPTIONS, world_pixels(clip.image_size))
    opt = torch.optim.Adam(clip.parameters(), lr=1e-3)
    for _ in range(80):
        opt.zero_grad()
        clip(batch)["loss"].backward()
        opt.step()
    clip.eval()
    rng = np.random.default_rng(1)
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    hits, trials = 0, 36
    for t in range(trials):
        colour, shape = combos[t % len(combos)]
        others = [x for x in combos if x != (colour, shape)]
        picks = [others[i] for i in rng.choice(len(others), 3, replace=False)]
        truth = int(rng.integers(4))
        picks.insert(truth, (colour, shape))
        images = [Image.open(io.BytesIO(render(c, s, 48))) for c, s in picks]
        order, scores = rerank(clip, tok, spec, f"a {colour} {shape}", images)
        assert sorted(order) == [0, 1, 2, 3] and scores[order[0]] == max(scores)
        hits += order[0] == truth
    assert hits / trials >= 0.6, hits


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dvae run, a dalle run on its tokens, and a clip run (one step each, by the CLI)."""
    root = tmp_path_factory.mktemp("dalle")
    shards = make_shards(root / "shards", n_shards=1, per_shard=8, size=32)
    tokfile = str(root / "tokenizer.json")
    assert run_cli("tokenizer", "train", "--shards", shards, "--out", tokfile,
                   "--vocab-size", "80")[0] == 0  # fmt: skip
    common = ["--shards", shards, "--steps", "1", "--batch-size", "4", "--workers", "0",
              "--no-progress", "--tokenizer", tokfile]  # fmt: skip
    out = {name: str(root / name) for name in ("dvae", "dalle", "clip")}
    for name, extra in (
        ("dvae", []),
        ("dalle", ["--set", f"dvae_ckpt={out['dvae']}"]),
        ("clip", []),
    ):
        code, _, err = run_cli("train", "--recipe", name, "--out", out[name], *common, *extra)
        assert code == 0, err
    return root, out


def test_generate_writes_reranked_grids_and_an_index(runs):
    root, out = runs
    dvae, _, _ = trainer.load_for_eval(out["dvae"])
    dalle, _, _ = trainer.load_for_eval(out["dalle"])
    # The dalle run tokenizes images with the trained dVAE it was given.
    trained = dvae.vae.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in dalle.dvae.state_dict().items())
    captions = ["a red circle above a blue square", "a <green> & 'yellow' triangle"]
    (root / "captions.txt").write_text("\n".join(captions) + "\n\n")
    gen = root / "gen"
    code, stdout, err = run_cli("generate", "--recipe", "dalle", "--ckpt", out["dalle"],
                                "--clip-ckpt", out["clip"], "--captions", str(root / "captions.txt"),
                                "--n", "3", "--out", str(gen))  # fmt: skip
    assert code == 0, err
    index = json.loads((gen / "index.json").read_text())
    assert index["reranked"] and [e["caption"] for e in index["items"]] == captions
    assert "3 images for each of 2 captions" in stdout
    clip, clip_tok, clip_spec = trainer.load_for_eval(out["clip"])
    for e in index["items"]:
        assert e["n"] == 3 and e["scores"] == sorted(e["scores"], reverse=True)
        with Image.open(gen / e["grid"]) as im:  # 3 tiles of 32 px, 2 px borders
            assert im.format == "PNG" and im.size == (3 * 34 + 2, 36)
            tiles = [im.convert("RGB").crop((2 + 34 * j, 2, 34 + 34 * j, 34)) for j in range(3)]
        # The grid shows the candidates best first: CLIP scores them as the index says.
        again = clip_scores(clip, clip_tok, clip_spec, e["caption"], tiles).tolist()
        assert again == pytest.approx(e["scores"], rel=0, abs=1e-6)
    page = (gen / "index.html").read_text()
    assert (
        "a &lt;green&gt; &amp; &#x27;yellow&#x27; triangle" in page and "caption_0001.png" in page
    )
    # Bad input: one line, exit 2.
    code, _, err = run_cli("generate", "--recipe", "dalle", "--ckpt", out["clip"],
                           "--captions", str(root / "captions.txt"), "--out", str(gen))  # fmt: skip
    assert code == 2 and "not dalle" in err and "Traceback" not in err
    code, _, err = run_cli("generate", "--recipe", "dalle", "--ckpt", out["dalle"],
                           "--out", str(gen))  # fmt: skip
    assert code == 2 and "--captions or --shards" in err
