"""Recipes: the registry, the contract attributes, forward on a random contract batch (finite
losses, gradients to every parameter a task should train), and a 30-step run whose loss falls."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_data import make_shards

from vlforge.train.recipes import build_recipe, list_recipes, register_recipe
from vlforge.train.recipes.base import Recipe

VOCAB = 50
R_DIM, N_CLS = 12, 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: OpenMP threads cost more than they give, and spin on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_batch(recipe: Recipe, b: int = 4, L: int = 9, R: int = 6, seed: int = 0) -> dict:
    """A random batch in the data side's contract format, with every key the recipe may read."""
    g = torch.Generator().manual_seed(seed)
    out: dict = {"keys": [f"k{i}" for i in range(b)]}
    if "text" in recipe.inputs:
        ids = torch.randint(5, VOCAB, (b, L), generator=g)
        mask = torch.ones(b, L, dtype=torch.long)
        mask[0, L - 3 :] = 0  # one padded caption
        ids[mask == 0] = 0
        labels = torch.full((b, L), -100)
        labels[:, 1:3] = ids[:, 1:3]
        out |= {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": torch.zeros(b, L, dtype=torch.long),
            "mlm_labels": labels,
        }
    if "regions" in recipe.inputs:
        boxes = torch.rand(b, R, 4, generator=g).sort(-1).values[..., [0, 1, 2, 3]]
        x1, y1, x2, y2 = boxes.unbind(-1)
        boxes = torch.stack([x1.minimum(x2), y1.minimum(y2), x1.maximum(x2), y1.maximum(y2)], -1)
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        geom = {
            0: boxes[..., :0],
            4: boxes,
            5: torch.cat([boxes, (w * h)[..., None]], -1),
            7: torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], -1),
        }[recipe.geometry]
        rmask = torch.ones(b, R, dtype=torch.long)
        rmask[1, R - 2 :] = 0
        mrm = torch.zeros(b, R, dtype=torch.bool)
        mrm[:, 1] = True
        feats = torch.rand(b, R, R_DIM, generator=g)
        target = feats.clone()
        feats[mrm] = 0.0
        out |= {
            "region_feats": feats,
            "region_feats_target": target,
            "region_boxes": boxes,
            "region_geom": geom,
            "region_mask": rmask,
            "region_cls_prob": torch.softmax(torch.randn(b, R, N_CLS, generator=g) * 2, -1),
            "mrm_mask": mrm,
        }
    if "pixels" in recipe.inputs:
        size = recipe.image_size  # type: ignore[attr-defined]
        out["pixel_values"] = torch.randn(b, 3, size, size, generator=g)
    out["itm_labels"] = torch.tensor([1, 0] * (b // 2) + [1] * (b % 2))
    return out


def small(name: str, **kw) -> Recipe:
    torch.manual_seed(0)
    return build_recipe(name, "small", VOCAB, region_dim=R_DIM, num_region_classes=N_CLS, **kw)


def test_registry_lists_and_rejects():
    assert {"uniter", "vilbert", "clip"} <= set(list_recipes())
    with pytest.raises(ValueError, match="unknown recipe"):
        build_recipe("nope")
    with pytest.raises(ValueError, match="unknown size"):
        build_recipe("uniter", "huge")
    with pytest.raises(ValueError, match="unknown config field"):
        build_recipe("uniter", "small", hiddne=3)
    with pytest.raises(ValueError, match="cannot train"):
        build_recipe("clip", "small", tasks={"mlm": 1.0})


def test_new_recipe_is_one_decorator():
    from vlforge.train.recipes import registry

    def _builder(size: str = "small", vocab_size: int = 10, **kw):
        return build_recipe("uniter", size, vocab_size, **kw)

    registry._REGISTRY.pop("_test_only", None)
    register_recipe("_test_only")(_builder)
    with pytest.raises(ValueError, match="twice"):
        register_recipe("_test_only")(_builder)
    assert "_test_only" in list_recipes()
    assert build_recipe("_test_only", vocab_size=VOCAB).name == "uniter"
    registry._REGISTRY.pop("_test_only")


@pytest.mark.parametrize(
    ("name", "mode", "inputs", "geometry"),
    [
        ("uniter", "sample", {"text", "regions"}, 7),
        ("vilbert", "sum", {"text", "regions"}, 5),
        ("clip", "sum", {"text", "pixels"}, 0),
    ],
)
def test_contract_attributes(name, mode, inputs, geometry):
    r = small(name)
    assert r.name == name and r.task_mode == mode and set(r.inputs) == inputs
    assert r.geometry == geometry and isinstance(r.tasks, dict) and r.tasks
    assert isinstance(r.region_mask_overlap, bool)
    assert r.conditional_masking is (name == "uniter")


def test_clip_ignores_region_sizes_from_the_data():
    # The trainer passes the data's region sizes to every recipe.
    assert build_recipe("clip", "small", VOCAB, region_dim=5, num_region_classes=3).name == "clip"


def test_paper_tasks():
    # UNITER's released pretraining mix (config/pretrain-indomain-base-8gpu.json).
    assert small("uniter").tasks == {"itm": 2.0, "mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0}
    assert set(small("vilbert").tasks) == {"mlm", "mrc_kl", "itm"}
    assert set(small("clip").tasks) == {"contrastive"}


def _grads(model: Recipe, batch: dict) -> tuple[dict, set[str]]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    return out, got


def test_sum_mode_forward_trains_every_parameter():
    for name in ("vilbert", "clip"):
        model = small(name)
        out, got = _grads(model, make_batch(model))
        assert set(out) == {"loss", *model.tasks}
        assert all(torch.isfinite(v) for v in out.values())
        missed = {n for n, _ in model.named_parameters()} - got
        assert not missed, f"{name}: no gradient for {sorted(missed)}"


def test_clip_resnet_tower_trains_every_parameter():
    model = small("clip", vision="resnet")
    out, got = _grads(model, make_batch(model))
    assert torch.isfinite(out["loss"])
    assert not {n for n, _ in model.named_parameters()} - got


def test_uniter_sampled_tasks_cover_every_parameter():
    model = small("uniter")
    base = make_batch(model)
    covered: set[str] = set()
    expected_keys = {
        "mlm": {"mlm"},
        "mrfr": {"mrfr"},
        "mrc_kl": {"mrc_kl"},
        "mrc": {"mrc"},
        "itm": {"itm", "wra"},
        "wra": {"wra"},
    }
    for task, keys in expected_keys.items():
        out, got = _grads(model, base | {"task": task})
        assert set(out) == {"loss", *keys}
        assert all(torch.isfinite(v) for v in out.values())
        covered |= got
    # ITM weighs WRA by λ = 0.1 in its total
    out = model(base | {"task": "itm"})
    torch.testing.assert_close(out["loss"], out["itm"] + 0.1 * out["wra"])
    missed = {n for n, _ in model.named_parameters()} - covered
    assert not missed, f"no task trains {sorted(missed)}"


def test_uniter_zeroed_masked_regions_keep_gradients_tame():
    # Zeroed features reach UNITER's per-part LayerNorm as a constant vector; without the
    # learned mask embedding the gradient norm at init is ~1e4–1e5 (1/√eps).
    model = small("uniter")
    model(make_batch(model) | {"task": "mrfr"})["loss"].backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 1e12) < 1e3


def test_uniter_text_only_and_region_only_paths():
    model = small("uniter").eval()
    b = make_batch(model)
    text = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    h, mask, n = model.encode(text)
    assert h.shape == (4, 9, 64) and n == 9
    regions = {k: b[k] for k in ("region_feats", "region_geom", "region_mask")}
    h, _, n = model.encode(regions)
    assert h.shape == (4, 6, 64) and n == 0


@pytest.mark.parametrize("name", ["uniter", "vilbert"])
def test_eval_entry_points(name):
    model = small(name).eval()
    b = make_batch(model)
    assert model.itm_score(b).shape == (4,)
    assert model.mlm_logits(b).shape == (4, 9, VOCAB)


def test_clip_embeddings():
    model = small("clip").eval()
    b = make_batch(model)
    assert model.encode_text(b).shape == (4, model.cfg.embed_dim)
    assert model.encode_image(b).shape == (4, model.cfg.embed_dim)


def test_padding_does_not_change_real_outputs():
    # Appending padded tokens/regions leaves the real positions' ITM score unchanged.
    model = small("uniter").eval()
    b = make_batch(model)
    padded = dict(b)
    padded["input_ids"] = torch.cat([b["input_ids"], torch.zeros(4, 3, dtype=torch.long)], 1)
    for k in ("attention_mask", "token_type_ids"):
        padded[k] = torch.cat([b[k], torch.zeros(4, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        torch.testing.assert_close(model.itm_score(b), model.itm_score(padded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["uniter", "vilbert", "clip"])
def test_thirty_steps_loss_falls(name):
    model = small(name)
    batches = [make_batch(model, seed=0)]
    if model.task_mode == "sample":  # cycle through the tasks as the loader would
        batches = [batches[0] | {"task": t} for t in model.tasks]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def total() -> float:
        with torch.no_grad():
            return sum(float(model(b)["loss"]) for b in batches)

    first = total()
    for step in range(30):
        opt.zero_grad()
        model(batches[step % len(batches)])["loss"].backward()
        opt.step()
    last = total()
    assert last < 0.7 * first, (first, last)


def _itr_batch(
    hard_neg_ratio: float, seed: int = 0, itr_negatives: int = 3
) -> tuple[dict, list[dict]]:
    """A real "itr" batch from the Assembler over make_shards samples (mine.json included)."""
    from vlforge.train.collate import Assembler
    from vlforge.train.data import expand_shards, iter_shard
    from vlforge.train.decode import decode_sample
    from vlforge.train.masking import MaskingConfig
    from vlforge.train.tokenizer import train_wordpiece
    from vlforge.train.trainer import TrainConfig, batch_spec

    root = Path(tempfile.mkdtemp())
    url = expand_shards(make_shards(root, n_shards=1, per_shard=8, seed=seed))[0]
    samples = [decode_sample(raw) for raw in iter_shard(url)]
    tok = train_wordpiece([s["txt"] for s in samples], 80)
    model = build_recipe("uniter", "small", tok.vocab_size, region_dim=16, num_region_classes=5,
                         tasks={"itr": 1.0})  # fmt: skip
    cfg = TrainConfig(recipe="uniter", shards=url, out=str(root / "run"),
                      masking=MaskingConfig(hard_neg_ratio=hard_neg_ratio,
                                            itr_negatives=itr_negatives))  # fmt: skip
    batch = Assembler(batch_spec(model, cfg), tok)(samples, np.random.default_rng(seed))
    return batch | {"model": model, "tok": tok}, samples


def test_uniter_itr_groups_each_image_with_other_captions():
    batch, samples = _itr_batch(hard_neg_ratio=0.0, itr_negatives=5)
    tok = batch["tok"]
    assert batch["task"] == "itr" and batch["itr_input_ids"].shape[:2] == (8, 5)
    captions = {" ".join(s["txt"].lower().split()) for s in samples}
    for i, s in enumerate(samples):
        for k in range(5):
            ids = batch["itr_input_ids"][i, k][batch["itr_attention_mask"][i, k] == 1]
            text = tok.decode(ids.tolist())
            assert text != " ".join(s["txt"].lower().split()) and text in captions
    # With every negative mined, each comes from the row's own mine.json.
    batch, samples = _itr_batch(hard_neg_ratio=1.0)
    tok = batch["tok"]
    for i, s in enumerate(samples):
        hard = {h["caption"].lower() for h in s["mine.json"]["hard_negatives"]}
        ids = batch["itr_input_ids"][i, 0][batch["itr_attention_mask"][i, 0] == 1]
        assert tok.decode(ids.tolist()) in hard


def test_uniter_itr_loss_is_a_softmax_over_each_images_candidates():
    batch, _ = _itr_batch(hard_neg_ratio=0.0)
    model = batch.pop("model").eval()
    batch.pop("tok")
    loss = model(batch)["itr"]
    # By hand: each (image, caption) pair scored alone through the ITM head.
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        scores = []
        cands = [(batch["input_ids"][i], batch["attention_mask"][i])] + [
            (batch["itr_input_ids"][i, k], batch["itr_attention_mask"][i, k])
            for k in range(batch["itr_input_ids"].shape[1])
        ]
        for ids, keys in cands:
            n = int(keys.sum())
            one = {
                "input_ids": ids[None, :n], "attention_mask": keys[None, :n],
                "token_type_ids": torch.zeros(1, n, dtype=torch.long),
                **{k: batch[k][i : i + 1] for k in ("region_feats", "region_geom", "region_mask")},
            }  # fmt: skip
            scores.append(model.itm_score(one)[0])
        rows.append(-torch.log_softmax(torch.stack(scores), 0)[0])
    torch.testing.assert_close(loss, torch.stack(rows).mean(), rtol=1e-4, atol=1e-5)
