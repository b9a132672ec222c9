"""VL-BERT, InterBERT and VILLA: each recipe's distinctive piece, tested directly.

VL-BERT: masked RoIs' pixels are zeroed before its detector, the visual feature embedding reaches
every element, all RoIs share one position, text-only rows come at the configured ratio, and the
detector loads from a featurize weights file. InterBERT: span masking, overlapping region groups,
mined hard negatives, ITM on both streams. VILLA: the L2 bound, a zero KL without perturbation,
FreeLB's gradient accumulation against a hand loop, and uniter's update with adversarial on.
Each recipe's loss falls over 30 steps on a fixed batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_recipes import make_batch, small
from test_train_data import _samples

from vlforge.errors import UserError
from vlforge.train import adversarial as adv
from vlforge.train.collate import CLIP_MEAN, CLIP_STD, Assembler
from vlforge.train.masking import IGNORE, MaskingConfig, box_iou
from vlforge.train.recipes.uniter import Uniter
from vlforge.train.recipes.vl_bert import zero_boxes
from vlforge.train.tokenizer import train_wordpiece
from vlforge.train.trainer import TrainConfig, batch_spec, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    samples = _samples(tmp_path_factory.mktemp("vib"), n=24)
    return samples, train_wordpiece([s["txt"] for s in samples], vocab_size=120)


def spec_of(recipe, **kw):
    return batch_spec(recipe, TrainConfig(recipe=recipe.name, shards="-", out="-", **kw))


# -- VL-BERT ----------------------------------------------------------------------------------


def _pixel_boxes(batch: dict) -> torch.Tensor:
    return batch["region_boxes"] * 64  # make_batch: 64 px images, boxes in 0..1 of the image


def test_vl_bert_zeroes_masked_roi_pixels_before_the_detector():
    model = small("vl_bert")
    batch = make_batch(model)  # region 1 of every row is masked
    seen = []
    model.detector.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    model(batch)
    images = seen[0]
    px = batch["pixel_values"]
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    clean = model.detector.normalize(px * std + mean)
    ys, xs = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    for row in range(4):
        x1, y1, x2, y2 = _pixel_boxes(batch)[row, 1]
        inside = (xs >= x1) & (xs < x2) & (ys >= y1) & (ys < y2)
        assert inside.any()
        assert (images[row][:, inside] == 0).all()
        torch.testing.assert_close(images[row][:, ~inside], clean[row][:, ~inside])
    # What the masked pixels showed cannot reach the model; pixels elsewhere do.
    x1, y1, x2, y2 = _pixel_boxes(batch)[0, 1].tolist()
    hidden = batch["pixel_values"].clone()
    hidden[0, :, int(y1) + 1 : int(y2) - 1, int(x1) + 1 : int(x2) - 1] += 3.0
    visible = batch["pixel_values"].clone()
    visible[0] += 3.0
    with torch.no_grad():
        base = model(batch)["loss"]
        assert model(batch | {"pixel_values": hidden})["loss"] == base
        assert model(batch | {"pixel_values": visible})["loss"] != base


@pytest.mark.parametrize(("width", "height"), [(160, 80), (80, 160), (100, 70)])
def test_vl_bert_boxes_follow_the_loaders_resize_and_crop(width, height):
    """The hook's pixel boxes land on the object in `pixel_values` (short side resized, centre
    crop), so the pixels zeroed are the RoI's even for non-square images."""
    from PIL import Image

    from vlforge.train.collate import image_to_tensor
    from vlforge.train.recipes.vl_bert import crop_boxes

    arr = np.zeros((height, width, 3), np.uint8)
    box = np.array([[width * 0.4, height * 0.3, width * 0.6, height * 0.7]], np.float32)
    x1, y1, x2, y2 = box[0].astype(int)
    arr[y1:y2, x1:x2] = 255
    white = image_to_tensor(Image.fromarray(arr), 48)[0] > 0.5

    def iou(boxes: np.ndarray) -> float:
        px = torch.from_numpy(np.asarray(boxes, np.float32))[None]
        chosen = torch.ones(1, 1, dtype=torch.bool)
        zeroed = zero_boxes(torch.ones(1, 1, 48, 48), px, chosen)[0, 0] == 0
        return float((zeroed & white).sum() / (zeroed | white).sum())

    # (Bicubic edges keep it below 1; ignoring the crop, the box misses by a third or more.)
    assert iou(crop_boxes(box, width, height, 48)) > 0.8
    assert iou(box / [width, height, width, height] * 48) < 0.7


def test_vl_bert_visual_feature_embedding_on_every_element():
    model = small("vl_bert").eval()
    batch = make_batch(model)
    with torch.no_grad():
        x, keys, n, r = model.embed(batch)
        assert x.shape[1] == n + r + 1  # text, [IMG] × R, [END]
        # A change of row 0's image moves every element of row 0 (text, [IMG]s, [END]) only.
        brighter = batch["pixel_values"].clone()
        brighter[0] += 1.0
        y = model.embed(batch | {"pixel_values": brighter})[0]
        assert ((x[0] - y[0]).abs().amax(-1) > 1e-4).all()
        torch.testing.assert_close(x[1:], y[1:])
        # Text and [END] carry the whole-image feature: moving RoI 2's box changes [IMG] 2 alone.
        boxes = batch["region_boxes"].clone()
        boxes[0, 2] = torch.tensor([0.1, 0.1, 0.3, 0.4])
        px = _pixel_boxes(batch)
        z = model.embed(batch | {"region_boxes": boxes, "roi_boxes_px": px})[0]
        changed = (x[0] - z[0]).abs().amax(-1) > 1e-4
        assert changed.nonzero().flatten().tolist() == [n + 2]


def test_vl_bert_rois_share_one_position_and_segment_c():
    model = small("vl_bert").eval()
    batch = make_batch(model)
    calls = []
    model.text.position.register_forward_hook(lambda _, args, out: calls.append(args[0]))
    types = []
    model.text.token_type.register_forward_hook(lambda _, args, out: types.append(args[0]))
    with torch.no_grad():
        x, _, n, r = model.embed(batch)
    text_pos, img_pos, end_pos = calls
    lengths = batch["attention_mask"].sum(1, keepdim=True)
    assert img_pos.shape == (4, 1) and torch.equal(img_pos, lengths)  # one position for all RoIs
    assert torch.equal(end_pos, lengths + 1) and torch.equal(text_pos[0], torch.arange(n))
    assert (types[1] == 2).all()  # segment C for the image
    # Two RoIs with the same box and pixels are then the same element.
    boxes = batch["region_boxes"].clone()
    boxes[0, 3] = boxes[0, 2]
    with torch.no_grad():
        y = model.embed(batch | {"region_boxes": boxes, "mrm_mask": torch.zeros(4, 6).bool()})[0]
    torch.testing.assert_close(y[0, n + 2], y[0, n + 3])


def test_vl_bert_text_only_rows_at_the_configured_ratio(data):
    samples, tok = data
    model = small("vl_bert", text_only_ratio=0.3)
    asm = Assembler(spec_of(model), tok)
    draws = torch.cat(
        [asm(samples[:8], np.random.default_rng(i))["text_only_draw"] for i in range(100)]
    )
    share = float((draws < 0.3).float().mean())
    assert 0.25 < share < 0.35
    # The same batch RNG gives the same rows (the loader decides, deterministically on resume).
    b = asm(samples[:8], np.random.default_rng(7))
    assert torch.equal(
        b["text_only_draw"], asm(samples[:8], np.random.default_rng(7))["text_only_draw"]
    )
    assert b["roi_boxes_px"].shape == (*b["region_boxes"].shape[:2], 4)

    # Rows below the ratio are text-only: no visual element to attend to, never seen by the
    # detector, no RoI loss; their text does not depend on the image.
    batch = make_batch(model) | {"text_only_draw": torch.tensor([0.1, 0.9, 0.9, 0.9])}
    seen = []
    model.detector.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    x, keys, n, r = model.embed(batch)
    assert seen == [3] and keys[0, n:].sum() == 0 and keys[1, n:].sum() > 0
    other = batch["pixel_values"].clone()
    other[0] = -other[0]
    with torch.no_grad():
        h0 = model.encode(batch)[0][0, :n]
        torch.testing.assert_close(model.encode(batch | {"pixel_values": other})[0][0, :n], h0)
    model.eval()  # evaluation sees every image
    assert model.text_only_rows(batch, 4, torch.device("cpu")).sum() == 0


def test_vl_bert_loads_the_featurize_detector(tmp_path):
    from vlforge.featurize.detector import BACKGROUND, DetectorConfig, build_detector, save_detector

    config = DetectorConfig(fpn_channels=8, representation_size=24)
    torch.manual_seed(3)
    detector = build_detector([BACKGROUND, "circle", "square"], config)
    path = str(tmp_path / "det.pt")
    save_detector(detector, path, [BACKGROUND, "circle", "square"], config)
    model = small("vl_bert", detector_weights=path)
    assert model.detector.dim == 24 and model.visual.in_features == 24 + model.cfg.geom_dim
    torch.testing.assert_close(
        model.detector.head.fc7.weight, detector.roi_heads.box_head.fc7.weight
    )
    assert torch.isfinite(model(make_batch(model))["loss"])
    with pytest.raises(UserError, match="not found"):
        small("vl_bert", detector_weights=str(tmp_path / "missing.pt"))


# -- InterBERT --------------------------------------------------------------------------------


def _runs(labels: torch.Tensor) -> list[int]:
    """Lengths of the runs of consecutive predicted positions in each row."""
    out = []
    for row in labels != IGNORE:
        run = 0
        for on in row.tolist() + [False]:
            if on:
                run += 1
            elif run:
                out.append(run)
                run = 0
    return out


def test_interbert_masks_contiguous_spans(data):
    _, tok = data
    model = small("interbert")
    spec = spec_of(model, max_text_len=64)
    assert spec.masking.mlm_mode == "span"
    words = [
        "red",
        "green",
        "blue",
        "yellow",
        "circle",
        "square",
        "triangle",
        "left",
        "right",
        "above",
        "below",
        "a",
    ]
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, 40)) for _ in range(64)]
    rows = np.ones(len(captions), dtype=bool)
    spans = _runs(Assembler(spec, tok).text(captions, rows, np.random.default_rng(1))["mlm_labels"])
    tokens = _runs(
        Assembler(spec_of(small("uniter"), max_text_len=64), tok).text(
            captions, rows, np.random.default_rng(1)
        )["mlm_labels"]
    )
    assert np.mean(spans) > 2.0 > 1.3 > np.mean(tokens)
    # An explicit flag still wins over the recipe's default.
    assert spec_of(model, masking=MaskingConfig(mlm_mode="word")).masking.mlm_mode == "word"


def test_interbert_masks_overlapping_regions_together(data):
    samples, tok = data
    model = small("interbert")
    spec = spec_of(model)
    assert spec.region_mask_overlap and spec.masking.overlap_iou == 0.3
    # Pairs of near-duplicate boxes (IoU ≈ 0.8) far from each other.
    base = np.array(
        [[0, 0, 10, 10], [20, 0, 30, 10], [0, 20, 10, 30], [20, 20, 30, 30]], np.float32
    )
    boxes = np.concatenate([base, base + [1, 0, 1, 0]])
    iou = box_iou(boxes / 32)
    region_samples = [
        {**s, "boxes.npy": boxes, "feats.npy": s["feats.npy"][:1].repeat(8, 0),
         "cls_prob.npy": s["cls_prob.npy"][:1].repeat(8, 0)}
        for s in samples[:8]
    ]  # fmt: skip
    asm = Assembler(spec, tok)
    groups = 0
    for seed in range(30):
        mask = asm.regions(region_samples, np.ones(8, bool), np.random.default_rng(seed))[
            "mrm_mask"
        ]
        for row in mask.numpy():
            for i in np.flatnonzero(row):
                partners = np.flatnonzero(iou[i] >= 0.3)
                assert row[partners].all()
                groups += len(partners) > 1
    assert groups > 10


def test_interbert_itm_uses_mined_hard_negatives(data):
    samples, tok = data
    model = small("interbert")
    spec = spec_of(model)
    assert spec.masking.hard_neg_ratio == 0.5
    asm = Assembler(spec, tok)
    hard = negatives = 0
    for seed in range(40):
        captions, _, labels = asm.pairs(samples[:8], np.random.default_rng(seed))
        for s, c, y in zip(samples[:8], captions, labels, strict=True):
            if y == 0:
                negatives += 1
                hard += c == s["mine.json"]["hard_negatives"][0]["caption"]
    assert negatives > 50 and 0.3 < hard / negatives < 0.7


def test_interbert_itm_reads_both_streams():
    model = small("interbert")
    assert model.itm.fc.in_features == 2 * model.cfg.hidden
    batch = make_batch(model)
    out = model.compute_losses(batch, ["itm"])
    out["itm"].backward()
    for part in ("t_pool", "v_pool", "text_stream", "image_stream", "interaction"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), part
    assert all(p.grad is None for p in model.mlm.dense.parameters())


# -- VILLA ------------------------------------------------------------------------------------


def _uniter(**kw):
    return small("uniter", **kw)


def test_villa_is_uniter_with_adversarial_training():
    model = small("villa")
    assert model.cfg.adversarial and isinstance(model, Uniter)
    out = model(make_batch(model) | {"task": "mlm"})
    assert set(out) == {"loss", "mlm", "adv", "adv_kl"}
    torch.testing.assert_close(out["loss"], out["mlm"] + out["adv"] + 1.5 * out["adv_kl"])
    model.eval()  # evaluation is plain
    assert set(model(make_batch(model) | {"task": "mlm"})) == {"loss", "mlm"}


def test_villa_perturbation_respects_the_l2_bound():
    model = _uniter(adversarial=True, adv_lr=5.0, adv_max_norm=0.5, adv_steps=4)
    batch = make_batch(model) | {"task": "itm"}
    norms: list[tuple[str, torch.Tensor]] = []
    seen: dict = {}
    raw_inputs, outputs = model.raw_inputs, model.task_outputs

    def record_raw(b):
        seen["clean"] = raw_inputs(b)
        return seen["clean"]

    def record(b, tasks, raw=None):
        clean = seen["clean"][0]
        if raw is not None and raw[0] is not clean:
            for k in clean:  # one modality perturbed at a time
                if not torch.equal(raw[0][k], clean[k]):
                    norms.append((k, (raw[0][k] - clean[k]).flatten(1).norm(dim=1)))
        return outputs(b, tasks, raw)

    model.raw_inputs, model.task_outputs = record_raw, record
    model(batch)
    assert [k for k, _ in norms] == ["text"] * 4 + ["image"] * 4
    for _, norm in norms:
        assert (norm <= 0.5 + 1e-5).all()
    for k in ("text", "image"):  # the ascent with a large step reaches the bound
        last = [n for m, n in norms if m == k][-1]
        torch.testing.assert_close(last, torch.full((4,), 0.5), rtol=1e-4, atol=1e-5)
    delta = torch.randn(3, 5, 8) * 10
    assert (adv.project(delta, 1.0).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()


def test_villa_kl_is_zero_without_perturbation():
    still = _uniter(adversarial=True, adv_lr=0.0, adv_init_mag=0.0)
    batch = make_batch(still)
    for task in ("mlm", "itm", "mrc_kl"):
        out = still(batch | {"task": task})
        assert out["adv_kl"] == 0.0
        # One unperturbed term per modality: text, then image.
        torch.testing.assert_close(out["adv"], 2 * (out[task] + 0.1 * out.get("wra", 0.0)))
    torch.manual_seed(0)
    moved = _uniter(adversarial=True, adv_lr=1.0)
    assert moved(batch | {"task": "mlm"})["adv_kl"] > 1e-6


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_villa_gradients_accumulate_over_k_steps_like_freelb():
    """One backward through the wrapper = VILLA's loop with a backward per modality and step."""
    k, lr, bound, alpha = 3, 0.5, 0.8, 1.5
    model = _uniter(adversarial=True, adv_steps=k, adv_lr=lr, adv_max_norm=bound)
    batch = make_batch(model) | {"task": "mlm"}
    torch.manual_seed(11)
    model(batch)["loss"].backward()
    wrapped = _grads(model)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    losses, clean = model.task_outputs(batch, ["mlm"])
    losses["mlm"].backward()
    clean = {name: v.detach() for name, v in clean.items()}
    for modality in ("text", "image"):
        raw, masks = model.raw_inputs(batch)
        delta = adv.init_delta(raw[modality], masks[modality], model.cfg.adv_init_mag)
        for _ in range(k):
            raw, masks = model.raw_inputs(batch)  # a fresh graph per step, as FreeLB
            delta.requires_grad_(True)
            perturbed = {**raw, modality: raw[modality] + delta}
            out, logits = model.task_outputs(batch, ["mlm"], (perturbed, masks))
            objective = out["mlm"] + alpha * adv.symmetric_kl(clean, logits)
            (objective / k).backward()
            delta = adv.ascend(delta.detach(), delta.grad * k, masks[modality], lr, bound)
    by_hand = _grads(model)
    assert wrapped.keys() == by_hand.keys()
    # Over all parameters at once, not per element: the two orders of summing six backward
    # passes differ by float32 rounding (~1e-6 absolute, a big relative error on entries that are
    # zero in exact arithmetic, such as the key biases'), while a wrong step weight or a missing
    # modality moves the whole gradient by far more than 1e-4 of its norm.
    flat = torch.cat([wrapped[name].flatten() for name in wrapped])
    expected = torch.cat([by_hand[name].flatten() for name in wrapped])
    assert ((flat - expected).norm() / expected.norm()).item() < 1e-4


def test_uniter_adversarial_flag_changes_the_update():
    """The trainer's own step (no hook: one backward) on uniter with the flag off and on."""

    def one_step(**kw) -> dict[str, torch.Tensor]:
        model = _uniter(**kw)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)  # update = -lr · clipped gradient
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.manual_seed(5)
        batch = make_batch(model) | {"task": "mlm"}
        metrics = train_step(model, opt, sched, [batch], "fp32", 1.0, torch.device("cpu"))
        assert ("adv_kl" in metrics) is bool(kw.get("adversarial"))
        return {n: p.detach() - before[n] for n, p in model.named_parameters()}

    off, again, on = one_step(), one_step(), one_step(adversarial=True)
    assert all(torch.equal(off[n], again[n]) for n in off)
    # (attention key biases get float noise only: softmax ignores a shift of all keys)
    trained = {n for n in off if off[n].abs().max() > 1e-6}
    moved = {n for n in trained if not torch.allclose(off[n], on[n], rtol=1e-3, atol=1e-9)}
    assert "encoder.layers.0.attn.q.weight" in trained and moved == trained


# -- every recipe learns ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vl_bert", "interbert", "villa"])
def test_thirty_steps_loss_falls(name):
    model = small(name)
    batch = make_batch(model)
    batches = [batch | {"task": t} for t in model.tasks] if model.task_mode == "sample" else [batch]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def total() -> float:
        with torch.no_grad():
            return sum(float(model(b)["loss"]) for b in batches)

    first = total()
    for step in range(30):
        opt.zero_grad()
        model(batches[step % len(batches)])["loss"].backward()
        opt.step()
    assert total() < 0.7 * first
