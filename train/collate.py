"""Batch assembly: decoded samples → the batch dict every recipe reads (see BatchSpec).

Runs in the loader workers with one RNG per batch (from its place in the stream), so a batch —
its task, negatives and masks — is the same in a resumed run. Keys of a batch:

text     input_ids, attention_mask, token_type_ids (B×L long), mlm_labels (B×L, -100 = none)
regions  region_feats (B×R×D, masked ones zeroed / replaced / kept per the recipe's masking),
         region_feats_target (B×R×D),
         region_boxes (B×R×4 xyxy in 0..1), region_geom (B×R×G), region_mask (B×R), region_cls_prob
         (B×R×C, background column 0), mrm_mask (B×R bool)
pixels   pixel_values (B×3×H×W, CLIP mean/std)
pairs    itm_labels (B long: 1 matched, 0 replaced caption or image)
         task (sample-mode recipes: the task of this batch), keys (key of the row's image)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from vlforge.train.masking import (
    IGNORE,
    MaskingConfig,
    conditional_choice,
    mask_regions,
    mask_tokens,
    select_regions,
)
from vlforge.train.tokenizer import TextTokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Which batch preparation each task name needs. Names follow the papers; a recipe's unknown task
# gets a plain batch (no masking, no negatives), which is what contrastive losses want.
TEXT_MASK_TASKS = {"mlm", "msm", "mlm_wwm", "mlm_span", "masked_lm", "mtl", "mlm_vl"}
REGION_MASK_TASKS = {"mrm", "mrc", "mrc_kl", "mrfr", "moc", "mrm_kl", "mor", "mrm_cls", "mrm_feat"}
PAIR_TASKS = {"itm", "wra", "vlm", "cmm", "itm_ot"}
GEOMETRIES = (0, 4, 5, 7)


@dataclass
class BatchSpec:
    """What a recipe's batches contain; built from the recipe's attributes and the CLI flags."""

    inputs: frozenset[str] = frozenset({"text", "regions"})
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0})
    task_mode: str = "sum"  # sum: every task on every batch; sample: one task per batch
    geometry: int = 0
    region_mask_overlap: bool = False
    conditional_masking: bool = False
    max_text_len: int = 40
    max_regions: int = 100
    image_size: int = 224
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    # Sample fields a recipe reads beyond its inputs' (e.g. "tags.json", "sg.json"); decoded
    # when present, never required.
    extra_fields: tuple[str, ...] = ()
    # A recipe's own batch additions: a module-level function (picklable, it runs in the loader
    # workers) called last with the batch and a BatchContext; see Recipe.batch_hook.
    hook: Callable[[dict[str, Any], BatchContext], None] | None = None

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, not {self.geometry}")
        if self.task_mode not in ("sum", "sample"):
            raise ValueError(f"task_mode must be 'sum' or 'sample', not {self.task_mode!r}")

    def fields(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(fields to decode, fields a sample must have) for the loader."""
        # A pixel-only recipe (the dVAE) trains on images whether or not they have captions.
        required = ["txt"] if "text" in self.inputs else ["jpg"]
        if "regions" in self.inputs:
            required += ["boxes.npy", "feats.npy", "cls_prob.npy"]
        if "pixels" in self.inputs and "jpg" not in required:
            required += ["jpg"]
        optional = [f for f in ("txt", "json") if f not in required]
        optional += ["mine.json"] if set(self.tasks) & PAIR_TASKS else []
        optional += [f for f in self.extra_fields if f not in required + optional]
        return tuple(required + optional), tuple(required)


@dataclass
class BatchContext:
    """What a recipe's batch hook may read: the rows as the Assembler built them."""

    task: str | None
    captions: list[str]  # the caption of each row (negatives already swapped in)
    samples: list[dict[str, Any]]  # the sample each row's caption came from
    visual_samples: list[dict[str, Any]]  # the sample whose image/regions each row shows
    itm_labels: np.ndarray  # 1 matched, 0 negative
    text_rows: np.ndarray  # rows whose text was masked
    region_rows: np.ndarray  # rows whose regions were masked
    loss_rows: np.ndarray  # rows whose masked losses count (matched pairs)
    rng: np.random.Generator  # this batch's RNG (deterministic on resume)
    spec: BatchSpec
    tokenizer: TextTokenizer | None
    random_ids: np.ndarray | None  # non-special token ids, for 10% random replacement


def region_geometry(boxes: np.ndarray, dims: int) -> np.ndarray:
    """Normalized xyxy boxes (N×4) → the recipe's geometry: 4 = xyxy (LXMERT), 5 = xyxy + area
    (ViLBERT), 7 = xyxy, w, h, area (UNITER)."""
    x1, y1, x2, y2 = boxes.T
    w, h = x2 - x1, y2 - y1
    cols = {4: [x1, y1, x2, y2], 5: [x1, y1, x2, y2, w * h], 7: [x1, y1, x2, y2, w, h, w * h]}
    if dims not in cols:
        raise ValueError(f"no {dims}-d geometry")
    return np.stack(cols[dims], axis=1).astype(np.float32)


def normalize_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes.astype(np.float32) / scale, 0.0, 1.0)


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP preprocessing: bicubic resize of the short side, centre crop, mean/std normalisation."""
    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [size, size])
    return TF.normalize(TF.to_tensor(image), CLIP_MEAN, CLIP_STD)


def _pad(rows: list[np.ndarray], value: float, dtype: torch.dtype) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    shape = (len(rows), longest, *rows[0].shape[1:])
    out = np.full(shape, value, dtype=rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.as_tensor(out, dtype=dtype)


class Assembler:
    """Callable (samples, rng) → batch; picklable, so each loader worker holds a copy."""

    def __init__(self, spec: BatchSpec, tokenizer: TextTokenizer | None):
        self.spec, self.tok = spec, tokenizer
        if "text" in spec.inputs and tokenizer is None:
            raise ValueError("a text recipe needs a tokenizer")
        if tokenizer is not None:
            special = set(tokenizer.special_ids)
            self.random_ids = np.array(
                [i for i in range(tokenizer.vocab_size) if i not in special], dtype=np.int64
            )

    # -- what this batch trains --------------------------------------------------------------

    def plan(self, shared: np.random.Generator) -> tuple[str | None, bool, bool, bool]:
        """(task, mask text, mask regions, make ITM negatives) for one batch; the task is drawn
        from the RNG every rank shares for this step."""
        spec = self.spec
        tasks = set(spec.tasks)
        task = None
        if spec.task_mode == "sample":
            names = sorted(spec.tasks)
            p = np.array([spec.tasks[n] for n in names], dtype=np.float64)
            task = names[int(shared.choice(len(names), p=p / p.sum()))]
            tasks = {task}
        text = "text" in spec.inputs and bool(tasks & TEXT_MASK_TASKS)
        regions = "regions" in spec.inputs and bool(tasks & REGION_MASK_TASKS)
        pairs = bool(tasks & PAIR_TASKS)
        return task, text, regions, pairs

    # -- pairs --------------------------------------------------------------------------------

    def pairs(
        self, samples: list[dict], rng: np.random.Generator
    ) -> tuple[list[str], list[int], np.ndarray]:
        """(caption per row, index of the sample whose image the row uses, ITM label per row)."""
        cfg = self.spec.masking
        n = len(samples)
        captions = [s["txt"] for s in samples]
        visual = list(range(n))
        labels = np.ones(n, dtype=np.int64)
        negative = rng.random(n) < cfg.itm_neg_ratio
        if cfg.itm_paired:  # exactly the ratio's share, so each matched row anchors one negative
            negative = np.zeros(n, dtype=bool)
            negative[rng.permutation(n)[: min(n - 1, round(n * cfg.itm_neg_ratio))]] = True
        if negative.all():
            # Keep one matched pair: masked losses are computed on matched pairs only, and a batch
            # without any would give them nothing to predict (0/0).
            negative[int(rng.integers(n))] = False
        # Paired negatives (cfg.itm_paired) borrow the image or caption of a matched row, each
        # matched row in turn (in a random order), so the two rows' shared modality cancels.
        anchors = rng.permutation(np.flatnonzero(~negative))
        for t, i in enumerate(np.flatnonzero(negative)):
            if cfg.itm_paired:
                a = int(anchors[t % len(anchors)])
                self.paired_negative(samples, i, a, captions, visual, labels, rng)
                continue
            hard = [
                h["caption"]
                for h in (samples[i].get("mine.json") or {}).get("hard_negatives", [])
                if h.get("caption") and h["caption"] != captions[i]
            ]
            if hard and rng.random() < cfg.hard_neg_ratio:
                captions[i] = hard[int(rng.integers(len(hard)))]
                labels[i] = 0
                continue
            # A random pair from the batch; a donor with the very same caption is no negative.
            donors = [j for j in range(n) if j != i and samples[j]["txt"] != samples[i]["txt"]]
            if not donors:
                continue
            j = donors[int(rng.integers(len(donors)))]
            if rng.random() < cfg.itm_image_swap and self.spec.inputs - {"text"}:
                visual[i] = j
            else:
                captions[i] = samples[j]["txt"]
            labels[i] = 0
        return captions, visual, labels

    def paired_negative(
        self,
        samples: list[dict],
        i: int,
        a: int,
        captions: list[str],
        visual: list[int],
        labels: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        """Row i becomes a negative whose donor is matched row a, so the two rows share one
        modality: a caption swap keeps row i's own image under a's caption, an image swap
        (`itm_image_swap`) keeps row i's caption over a's image — the recipe's kind of negative,
        only with the donor drawn from the batch's matched rows. A mined hard negative
        (`hard_neg_ratio`) is row i's own image under one of its mined captions, as unpaired."""
        cfg = self.spec.masking
        own, mine = samples[a]["txt"], samples[i]["txt"]
        hard = [
            h["caption"]
            for h in (samples[i].get("mine.json") or {}).get("hard_negatives", [])
            if h.get("caption") and h["caption"] != mine
        ]
        if hard and rng.random() < cfg.hard_neg_ratio:
            captions[i] = hard[int(rng.integers(len(hard)))]
        elif mine == own:
            return  # the same caption as its donor: row i stays its own matched pair
        elif rng.random() < cfg.itm_image_swap and self.spec.inputs - {"text"}:
            visual[i] = a
        else:
            captions[i] = own
        labels[i] = 0

    # -- the batch ----------------------------------------------------------------------------

    def __call__(
        self,
        samples: list[dict[str, Any]],
        rng: np.random.Generator,
        shared: np.random.Generator | None = None,
    ) -> dict[str, Any]:
        spec, cfg = self.spec, self.spec.masking
        task, mask_text, mask_regs, make_pairs = self.plan(rng if shared is None else shared)
        n = len(samples)
        if make_pairs:
            captions, visual, labels = self.pairs(samples, rng)
        else:
            captions, visual, labels = (
                [s.get("txt", "") for s in samples],
                list(range(n)),
                np.ones(n),
            )
        # Masking is applied to every row, the masked losses counted on matched pairs only: were
        # only matched rows masked, a [MASK] would tell ITM the answer whenever both tasks share a
        # batch (task_mode "sum", as ViLBERT). Conditional masking picks one modality per row.
        eligible = labels == 1 if cfg.masked_only_matched else np.ones(n, dtype=bool)
        text_rows = np.full(n, mask_text)
        region_rows = np.full(n, mask_regs)
        if spec.conditional_masking and mask_text and mask_regs:
            on_text = conditional_choice(rng, n)
            text_rows, region_rows = text_rows & on_text, region_rows & ~on_text

        # keys name the sample whose image a row shows (a swapped image brings its own key).
        batch: dict[str, Any] = {"keys": [samples[v]["__key__"] for v in visual]}
        if task is not None:
            batch["task"] = task
        if make_pairs:
            batch["itm_labels"] = torch.as_tensor(labels, dtype=torch.long)
        if "text" in spec.inputs:
            batch.update(self.text(captions, text_rows, rng, text_rows & eligible))
        visual_samples = [samples[v] for v in visual]
        if "regions" in spec.inputs:
            batch.update(self.regions(visual_samples, region_rows, rng, region_rows & eligible))
        if "pixels" in spec.inputs:
            batch["pixel_values"] = torch.stack(
                [image_to_tensor(s["jpg"], spec.image_size) for s in visual_samples]
            )
        if spec.hook is not None:
            # The sample each row's caption came from: its own unless a donor caption replaced it.
            by_caption = {s["txt"]: s for s in samples}
            text_samples = [by_caption.get(c, samples[i]) for i, c in enumerate(captions)]
            ctx = BatchContext(
                task=task,
                captions=list(captions),
                samples=text_samples,
                visual_samples=visual_samples,
                itm_labels=np.asarray(labels, dtype=np.int64),
                text_rows=text_rows,
                region_rows=region_rows,
                loss_rows=eligible,
                rng=rng,
                spec=spec,
                tokenizer=self.tok,
                random_ids=getattr(self, "random_ids", None),
            )
            spec.hook(batch, ctx)
        return batch

    def text(
        self,
        captions: list[str],
        rows: np.ndarray,
        rng: np.random.Generator,
        loss_rows: np.ndarray | None = None,
    ) -> dict:
        """Token ids with `rows` masked; MLM labels only on `loss_rows` (default: `rows`)."""
        assert self.tok is not None
        loss_rows = rows if loss_rows is None else loss_rows
        cfg = self.spec.masking
        ids, types, labels = [], [], []
        for caption, masked in zip(captions, rows, strict=True):
            enc = self.tok.encode(caption, self.spec.max_text_len)
            row = np.array(enc.ids, dtype=np.int64)
            lab = np.full(len(row), IGNORE, dtype=np.int64)
            if masked:
                row, lab = mask_tokens(
                    row, enc.word_ids, rng, cfg, self.tok.mask_id, self.random_ids
                )
            ids.append(row)
            types.append(np.array(enc.type_ids, dtype=np.int64))
            labels.append(lab)
        labels = [
            lab if keep else np.full_like(lab, IGNORE)
            for lab, keep in zip(labels, loss_rows, strict=True)
        ]
        # A batch whose masking chose nothing would give the MLM loss 0/0: predict one token.
        if loss_rows.any() and all((lab == IGNORE).all() for lab in labels):
            i = int(np.flatnonzero(loss_rows)[0])
            body = [
                k
                for k, w in enumerate(self.tok.encode(captions[i], self.spec.max_text_len).word_ids)
                if w is not None
            ]
            if body:
                k = body[int(rng.integers(len(body)))]
                labels[i][k], ids[i][k] = ids[i][k], self.tok.mask_id
        input_ids = _pad(ids, self.tok.pad_id, torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": _pad([np.ones(len(r), dtype=np.int64) for r in ids], 0, torch.long),
            "token_type_ids": _pad(types, 0, torch.long),
            "mlm_labels": _pad(labels, IGNORE, torch.long),
        }

    def regions(
        self,
        samples: list[dict],
        rows: np.ndarray,
        rng: np.random.Generator,
        loss_rows: np.ndarray | None = None,
    ) -> dict:
        """Region inputs with `rows` masked; `mrm_mask` (the loss positions) only on `loss_rows`."""
        spec, cfg = self.spec, self.spec.masking
        loss_rows = rows if loss_rows is None else loss_rows
        feats, targets, boxes, geoms, probs, masks = [], [], [], [], [], []
        # Where a recipe replaces masked regions by random ones (LXMERT), they come from the batch.
        pool = (
            np.concatenate([s["feats.npy"][: spec.max_regions] for s in samples]).astype(np.float32)
            if cfg.region_random_frac > 0
            else None
        )
        for sample, masked in zip(samples, rows, strict=True):
            k = spec.max_regions
            f = sample["feats.npy"][:k].astype(np.float32)
            b = sample["boxes.npy"][:k].astype(np.float32)
            meta = sample.get("json") or {}
            width = float(meta.get("width") or max(1.0, b[:, 2].max(initial=1.0)))
            height = float(meta.get("height") or max(1.0, b[:, 3].max(initial=1.0)))
            nb = normalize_boxes(b, width, height)
            sel = (
                select_regions(nb, rng, cfg, spec.region_mask_overlap)
                if masked
                else np.zeros(len(nb), dtype=bool)
            )
            feats.append(mask_regions(f, sel, rng, cfg, pool) if sel.any() else f)
            targets.append(f)
            boxes.append(nb)
            geoms.append(region_geometry(nb, spec.geometry) if spec.geometry else nb[:, :0])
            probs.append(sample["cls_prob.npy"][:k].astype(np.float32))
            masks.append(sel)
        masks = [m if keep else np.zeros_like(m) for m, keep in zip(masks, loss_rows, strict=True)]
        if loss_rows.any() and not any(m.any() for m in masks):
            i = int(np.flatnonzero(loss_rows)[0])
            j = int(rng.integers(len(masks[i])))
            masks[i][j] = True
            if rng.random() < cfg.region_zero_frac:
                feats[i] = feats[i].copy()
                feats[i][j] = 0
        out = {
            "region_feats": _pad(feats, 0.0, torch.float32),
            "region_feats_target": _pad(targets, 0.0, torch.float32),
            "region_boxes": _pad(boxes, 0.0, torch.float32),
            "region_mask": _pad([np.ones(len(f), dtype=np.int64) for f in feats], 0, torch.long),
            "region_cls_prob": _pad(probs, 0.0, torch.float32),
            "mrm_mask": _pad(masks, False, torch.bool),
        }
        if spec.geometry:
            out["region_geom"] = _pad(geoms, 0.0, torch.float32)
        return out
