"""Each recipe follows its paper where the survey's recipes differ: the masked-region policy,
UNIMO's one-modality masking, VILLA's raw-embedding perturbations, the MoE router and experts.

Each test is written so that the behaviour it replaced fails it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_train_data import _samples
from torch import nn

from vlforge.train import trainer
from vlforge.train.blocks import MLP
from vlforge.train.collate import Assembler
from vlforge.train.parallel import ParallelConfig
from vlforge.train.parallel.moe import (
    MoE,
    SwitchRouter,
    apply_moe,
    build_router,
    moe_layers,
    take_moe_outputs,
)
from vlforge.train.recipes import build_recipe
from vlforge.train.recipes.base import init_weights
from vlforge.train.schedule import build_scheduler
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


# -- MoE -----------------------------------------------------------------------------------------


def test_moe_experts_start_independent_not_copies_of_the_dense_mlp():
    torch.manual_seed(0)
    template = MLP(8, 32)
    init_weights(template, 0.2)
    moe = MoE(template, SwitchRouter(8, 4, None), 4)
    weights = [e.fc1.weight for e in moe.experts.values()]
    for i, w in enumerate(weights):
        assert not torch.equal(w, template.fc1.weight)
        for other in weights[i + 1 :]:
            assert not torch.equal(w, other)
        # At the dense layer's scale (the recipe's init std), biases and norms as the template's.
        assert float(w.std()) == pytest.approx(float(template.fc1.weight.std()), rel=0.15)
    for e in moe.experts.values():
        torch.testing.assert_close(e.fc1.bias, template.fc1.bias)


def test_switch_z_loss_is_off_unless_asked():
    x = torch.randn(10, 6, generator=torch.Generator().manual_seed(1))
    assert set(SwitchRouter(6, 4, None)(x).aux) == {"balance"}
    asked = SwitchRouter(6, 4, None, z_loss=1e-3)
    logits = x @ asked.gate.weight.t()
    z = 1e-3 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(asked(x).aux["z"], z)


@pytest.mark.parametrize("kind", ["topk", "gshard", "switch"])
def test_router_runs_in_float32_under_bf16_autocast(kind):
    torch.manual_seed(2)
    router = build_router(kind, 16, 4, 2, None)
    nn.init.normal_(router.gate.weight, std=0.5)
    router.eval()  # no noise, no random second expert: the same routing twice
    x = torch.randn(64, 16)
    fp32 = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = router(x)
    assert bf16.gates.dtype == torch.float32
    # A bf16 gate projection rounds the logits at ~3 significant digits and moves the gates.
    torch.testing.assert_close(bf16.gates, fp32.gates, rtol=1e-6, atol=1e-7)
    assert torch.equal(bf16.experts, fp32.experts)


def test_moe_aux_loss_is_in_the_total_loss():
    model = build_recipe("uniter", "small", 60, region_dim=16, num_region_classes=8, max_len=16)
    apply_moe(model, ParallelConfig(moe="switch", experts=2))
    batch = moe_batch()
    cfg = trainer.TrainConfig(recipe="uniter", shards="-", out="-", lr=0.0)
    optimizer = trainer.build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, "constant", 0, 10, 0.0)
    m = trainer.train_step(model, optimizer, scheduler, [batch], "fp32", 1.0, torch.device("cpu"))
    torch.manual_seed(0)
    out = model(batch)
    aux = sum(layer.aux_loss for layer in moe_layers(model))
    assert float(aux) > 0
    assert m["loss"] == pytest.approx(float(out["loss"] + aux), rel=1e-5)
    # The router is trained by the aux loss: the balance loss reaches its gate.
    model.zero_grad()
    take_moe_outputs(model, model(batch))["loss"].backward()
    assert all(float(layer.router.gate.weight.grad.abs().sum()) > 0 for layer in moe_layers(model))


def moe_batch(b: int = 4, length: int = 8, regions: int = 5) -> dict:
    """A UNITER MLM batch over a 60-word vocabulary and 16-d regions."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 60, (b, length), generator=g)
    labels = torch.full((b, length), -100)
    labels[:, 2], ids[:, 2] = ids[:, 2], 3
    xy = torch.rand(b, regions, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.2], -1)
    return {
        "task": "mlm",
        "input_ids": ids,
        "attention_mask": torch.ones(b, length, dtype=torch.long),
        "token_type_ids": torch.zeros(b, length, dtype=torch.long),
        "mlm_labels": labels,
        "region_feats": torch.randn(b, regions, 16, generator=g),
        "region_geom": torch.cat([boxes, torch.full((b, regions, 3), 0.2)], -1),
        "region_mask": torch.ones(b, regions, dtype=torch.long),
    }


# -- UNIMO -------------------------------------------------------------------------------------


def test_unimo_masks_one_modality_per_row(tmp_path):
    # UNIMO masks one modality of a pair at a time (the other left whole, as UNITER's
    # conditional masking); a text-only row can only have its text masked, an image-only row
    # only its regions.
    samples = _samples(tmp_path, 24)
    asm = recipe_assembler("unimo", samples, mlm_prob=0.5, region_prob=0.5)
    counts = {"text": 0, "regions": 0}
    for i in range(40):
        b = asm(samples, np.random.default_rng(i))
        text = (b["mlm_labels"] != -100).any(1)
        regions = b["mrm_mask"].any(1)
        assert not (text & regions).any()
        kind = b["modality"]
        assert not regions[kind == 1].any() and not text[kind == 2].any()
        # The modality left whole is its original input: no [MASK], no zeroed region.
        whole_text = ~text & (kind != 2)
        assert not (b["input_ids"][whole_text] == asm.tok.mask_id).any()
        whole_regions = ~regions & (kind != 1)
        assert torch.equal(
            b["region_feats"][whole_regions], b["region_feats_target"][whole_regions]
        )
        counts["text"] += int(text[kind == 0].sum())
        counts["regions"] += int(regions[kind == 0].sum())
    assert counts["text"] > 250 and counts["regions"] > 250


# -- VILLA -------------------------------------------------------------------------------------


def recorded_villa_forwards(model, batch) -> tuple[dict, list[tuple[dict, dict]]]:
    """(the clean inputs, [(perturbed inputs, losses)] of every perturbed forward) of one
    training forward of an adversarial recipe."""
    seen: dict = {}
    calls: list[tuple[dict, dict]] = []
    raw_inputs, outputs = model.raw_inputs, model.task_outputs

    def record_raw(b):
        seen["clean"] = raw_inputs(b)
        return seen["clean"]

    def record(b, tasks, raw=None):
        losses, logits = outputs(b, tasks, raw)
        if raw is not None and raw[0] is not seen["clean"][0]:
            calls.append((raw[0], {k: float(v) for k, v in losses.items()}))
        return losses, logits

    model.raw_inputs, model.task_outputs = record_raw, record
    model(batch)
    return seen["clean"][0], calls


def test_villa_perturbs_word_embeddings_and_region_features_one_at_a_time():
    from test_recipes import R_DIM, make_batch, small

    model = small("villa", adv_steps=2)
    batch = make_batch(model) | {"task": "itm"}
    clean, calls = recorded_villa_forwards(model, batch)
    # The raw inputs the reference perturbs: word embeddings (hidden wide, before position,
    # segment and LayerNorm) and the region features themselves (their own width).
    torch.testing.assert_close(clean["text"], model.text.word(batch["input_ids"]))
    assert torch.equal(clean["image"], batch["region_feats"])
    assert clean["image"].shape[-1] == R_DIM != model.cfg.hidden
    # K steps for each modality, the other modality left clean in each.
    moved = []
    for perturbed, _ in calls:
        changed = [k for k in clean if not torch.equal(perturbed[k], clean[k])]
        assert len(changed) == 1
        moved.append(changed[0])
    assert sorted(moved) == ["image", "image", "text", "text"]


@pytest.mark.parametrize("task", ["itm", "mlm"])
def test_villa_perturbation_increases_the_loss(task):
    from test_recipes import make_batch, small

    model = small("villa", adv_steps=3, adv_lr=1.0, adv_max_norm=0.0)
    batch = make_batch(model) | {"task": task}
    with torch.no_grad():
        clean_loss = float(model.task_outputs(batch, [task])[0][task])
    clean, calls = recorded_villa_forwards(model, batch)
    by_modality: dict[str, list[float]] = {}
    for perturbed, losses in calls:
        (modality,) = [k for k in perturbed if not torch.equal(perturbed[k], clean[k])]
        by_modality.setdefault(modality, []).append(losses[task])
    assert set(by_modality) == {"text", "image"}
    for losses in by_modality.values():
        # The ascent raises the task loss: from ≈ clean at FreeLB's small random start to above.
        assert losses[-1] > losses[0] and losses[-1] > 1.01 * clean_loss


# -- Unicoder-VL -------------------------------------------------------------------------------


def encoder_input(model, batch) -> torch.Tensor:
    """The sequence a recipe's (single) encoder receives, by a forward hook."""
    seen = {}
    handle = model.encoder.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0]))
    try:
        model.eval()(batch)
    finally:
        handle.remove()
    return seen["x"]


def test_unicoder_vl_puts_an_img_token_before_the_regions():
    from test_recipes import make_batch, small

    model = small("unicoder_vl")
    batch = make_batch(model)
    n_text, regions = batch["input_ids"].shape[1], batch["region_feats"].shape[1]
    x = encoder_input(model, batch)
    assert x.shape[1] == n_text + 1 + regions
    # [IMG]: the whole image — the mean of the real regions' features at the whole-image box.
    m = batch["region_mask"].float()[..., None]
    mean = (batch["region_feats"] * m).sum(1) / m.sum(1)
    whole = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]).expand(len(mean), 5)
    with torch.no_grad():
        img = model.regions(mean[:, None], whole[:, None])[:, 0]
        rest = model.regions(batch["region_feats"], batch["region_geom"])
    torch.testing.assert_close(x[:, n_text], img)
    torch.testing.assert_close(x[:, n_text + 1 :], rest)
    # Masked object classification reads the regions after [IMG].
    hidden, n = model.encode(batch)
    assert n == n_text
    with torch.no_grad():
        want = model.moc(hidden[:, n + 1 :][batch["mrm_mask"].bool()])
    torch.testing.assert_close(model.moc_logits(batch), want)


# -- two-stream wiring -------------------------------------------------------------------------


def perturb_biases(model: nn.Module, seed: int = 0) -> None:
    """Random biases and LayerNorm parameters: zero-initialised ones hide wiring mistakes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or (p.dim() == 1 and "norm" in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("name", ["vilbert", "ernie_vil", "interbert"])
def test_two_stream_img_token_offsets_and_itm_fusion(name):
    from test_recipes import make_batch, small

    from vlforge.train.losses import itm_loss, mrc_kl_loss, mrfr_loss

    model = small(name).eval()
    perturb_biases(model)
    batch = make_batch(model)
    seen = {}
    handle = model.regions.register_forward_pre_hook(lambda _m, args: seen.update(feats=args[0]))
    with torch.no_grad():
        t, v = model.encode(batch)
    handle.remove()
    feats, keys = batch["region_feats"], batch["region_mask"].float()[..., None]
    # Image position 0 is [IMG], the mean of the real regions; the regions follow from 1.
    assert v.shape[1] == feats.shape[1] + 1
    torch.testing.assert_close(seen["feats"][:, 0], (feats * keys).sum(1) / keys.sum(1))
    torch.testing.assert_close(seen["feats"][:, 1:], feats)

    region_task = "mrm" if name == "interbert" else "mrc_kl"
    with torch.no_grad():
        out = model.compute_losses(batch, [region_task, "itm"])
        sel, prob = batch["mrm_mask"].bool(), batch["region_cls_prob"][batch["mrm_mask"].bool()]

        def region_loss(states):
            loss = mrc_kl_loss(model.mrc(states[sel]), prob)
            if name == "interbert":  # InterBERT's MRM: class KL + feature regression
                loss = loss + mrfr_loss(model.mrfr(states[sel]), batch["region_feats_target"][sel])
            return loss

        torch.testing.assert_close(out[region_task], region_loss(v[:, 1:]))
        assert not torch.allclose(out[region_task], region_loss(v[:, :-1]))  # the test can tell

        # ITM on [CLS] (text position 0) and [IMG] (image position 0).
        def pooled(pool, x):
            return pool.act(x[:, 0] @ pool.dense.weight.T + pool.dense.bias)

        if name == "interbert":  # concatenation of the two pooled states
            fused = torch.cat([pooled(model.t_pool, t), pooled(model.v_pool, v)], -1)
        else:  # ViLBERT's element-wise product h_IMG ⊙ h_CLS, ReLU poolers
            assert model.t_pool.act is model.v_pool.act is torch.nn.functional.relu
            fused = pooled(model.t_pool, t) * pooled(model.v_pool, v)
        torch.testing.assert_close(out["itm"], itm_loss(model.itm(fused), batch["itm_labels"]))


# -- VisualBERT --------------------------------------------------------------------------------


def with_positives(samples: list[dict]) -> list[dict]:
    """Samples whose mine.json names other captions describing their image (every second
    sample: the rest have none)."""
    texts = sorted({s["txt"] for s in samples})
    out = []
    for i, s in enumerate(samples):
        others = [t for t in texts if t != s["txt"]][i % 3 : i % 3 + 2]
        positives = [{"key": f"p{i}{k}", "caption": t} for k, t in enumerate(others)]
        out.append({**s, "mine.json": {"positives": positives if i % 2 == 0 else []}})
    return out


def segments(ids: list[int], tok) -> list[list[int]]:
    """The token ids between [CLS]/[SEP] markers of one row (padding dropped)."""
    body, parts = ids[1:], [[]]
    for t in body:
        if t == tok.sep_id:
            parts.append([])
        elif t != tok.pad_id:
            parts[-1].append(t)
    return parts[:-1]


def test_visualbert_sentence_image_prediction_reads_two_captions(tmp_path):
    # VisualBERT's SIP: given the image and two captions, is the second one the image's? The
    # first is always a caption of the image; here another caption mined for it (mine.json
    # positives, never the same text as the image's own caption).
    samples = with_positives(_samples(tmp_path, 24))
    asm = recipe_assembler("visualbert", samples)
    tok = asm.tok
    body = {s["txt"]: tok.encode(s["txt"], 40).ids[1:-1] for s in samples}
    positives = {
        s["__key__"]: [tok.encode(p["caption"], 40).ids[1:-1] for p in s["mine.json"]["positives"]]
        for s in samples
        if s["mine.json"]["positives"]
    }
    key_caption = {s["__key__"]: s["txt"] for s in samples}
    two = one = 0
    for i in range(10):
        b = asm(samples, np.random.default_rng(i))
        for r in range(len(samples)):
            ids = b["input_ids"][r].tolist()
            labels = b["mlm_labels"][r]
            parts = segments(ids, tok)
            original = torch.where(labels != -100, labels, b["input_ids"][r]).tolist()
            second = segments(original, tok)[-1]
            key = b["keys"][r]
            if key in positives:
                assert len(parts) == 2
                two += 1
                first = parts[0]
                assert first in positives[key] and first != body[key_caption[key]]
                n_first = len(first) + 2  # [CLS] first [SEP]
                types = b["token_type_ids"][r]
                assert (types[:n_first] == 0).all() and (types[n_first : len(original)] != 0).any()
                assert (labels[:n_first] == -100).all()  # MLM targets only in the second
            else:  # no other caption of this image: the single-caption form
                assert len(parts) == 1
                one += 1
            # The second caption is the image's own on matched rows, another one on the rest.
            assert (second == body[key_caption[key]]) == bool(b["itm_labels"][r])
    assert two > 50 and one > 50
    # Batches that train no pair task (MLM alone, retrieval scoring) keep one caption.
    plain = recipe_assembler("visualbert", samples)
    plain.spec.tasks = {"mlm": 1.0}
    b = plain(samples, np.random.default_rng(0))
    assert all(len(segments(row, tok)) == 1 for row in b["input_ids"].tolist())
