"""VisualBERT (Li et al. 2019): one BERT over [text; regions], told apart by segment embeddings.

Text tokens are segment 0, regions segment 1 with their own segment and position tables
(`SegmentEmbeddings`, laid out as HF `VisualBertModel` so converted checkpoints match it; see
train/convert_visualbert.py). Pretraining sums, on every batch, MLM conditioned on the image and
sentence-image prediction (SIP, task "itm") on the pooled [CLS].

SIP as the paper states it: the text segment holds two captions, [CLS] a [SEP] b [SEP]; a always
describes the image, b is the image's caption or (half the time) a random one, and the model
predicts which. The paper's COCO images have five captions; here a is another caption mined for
the image (mine.json "positives", never the same text as the image's own caption or b, drawn
from the batch RNG) by the loader-side hook `two_captions`. An image with none gets the
single-caption form [CLS] b [SEP], which is also what retrieval scores (a batch without a pair
task: there no caption of the candidate image may be shown). Segment ids are 0 for [CLS] a [SEP]
and 1 for b, as BERT's sentence pairs; the MLM targets stay in b. Mined positives are
near-duplicates of the image's caption, so on a matched row a resembles b in text: SIP can be
partly solved from the text alone, as with the paper's five COCO captions of one image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from vlforge.train.blocks import Pooler, SegmentEmbeddings, attention_mask
from vlforge.train.collate import BatchContext
from vlforge.train.losses import IGNORE, ITMHead, itm_score
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    itm_task_loss,
    mlm_head,
    mlm_task_loss,
    require,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def two_captions(batch: dict[str, Any], ctx: BatchContext) -> None:
    """Loader-side: on batches with a pair task, each row whose image has another mined caption
    gets it as the first caption, before its own (masked) one; see the module docstring."""
    pair_task = ctx.task == "itm" if ctx.task is not None else "itm" in ctx.spec.tasks
    if not pair_task or ctx.tokenizer is None or "input_ids" not in batch:
        return
    tok, limit = ctx.tokenizer, ctx.spec.max_text_len
    ids, types, labels = batch["input_ids"], batch["token_type_ids"], batch["mlm_labels"]
    lengths = batch["attention_mask"].sum(1).tolist()
    rows: list[tuple[list[int], list[int], list[int]]] = []
    changed = False
    for i, visual in enumerate(ctx.visual_samples):
        n = int(lengths[i])
        own = (ids[i, :n].tolist(), types[i, :n].tolist(), labels[i, :n].tolist())
        taken = {_norm(visual.get("txt", "")), _norm(ctx.captions[i])}
        others = [
            p["caption"]
            for p in (visual.get("mine.json") or {}).get("positives", [])
            if p.get("caption") and _norm(p["caption"]) not in taken
        ]
        room = limit - n - 1  # [CLS] a [SEP] b [SEP] within the caption length limit
        if not others or room < 1:
            rows.append(own)
            continue
        first = tok.encode(others[int(ctx.rng.integers(len(others)))], limit).ids[1:-1][:room]
        head = [tok.cls_id, *first, tok.sep_id]
        rows.append(
            (
                head + own[0][1:],
                [0] * len(head) + [1] * (n - 1),
                [IGNORE] * len(head) + own[2][1:],
            )
        )
        changed = True
    if not changed:
        return
    width = max(len(r[0]) for r in rows)
    shape = (len(rows), width)
    new_ids, new_types = np.full(shape, tok.pad_id, np.int64), np.zeros(shape, np.int64)
    new_labels, new_keys = np.full(shape, IGNORE, np.int64), np.zeros(shape, np.int64)
    for i, (r_ids, r_types, r_labels) in enumerate(rows):
        k = len(r_ids)
        new_ids[i, :k], new_types[i, :k], new_labels[i, :k], new_keys[i, :k] = (
            r_ids, r_types, r_labels, 1,
        )  # fmt: skip
    batch["input_ids"], batch["token_type_ids"] = (
        torch.from_numpy(new_ids),
        torch.from_numpy(new_types),
    )
    batch["mlm_labels"], batch["attention_mask"] = (
        torch.from_numpy(new_labels),
        torch.from_numpy(new_keys),
    )


@dataclass
class VisualBertConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "itm": 1.0})
    task_mode: str = "sum"


@register_recipe("visualbert")
class VisualBert(Recipe):
    name = "visualbert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "itm"})
    # Sentence-image prediction pairs the image with its caption or a random one: negatives
    # replace the caption, never the image (where a run keeps the default).
    masking_defaults: ClassVar[dict[str, Any]] = {"itm_image_swap": 0.0}
    extra_fields = ("mine.json",)
    batch_hook = staticmethod(two_captions)
    sizes: ClassVar[dict[str, VisualBertConfig]] = {  # type: ignore[assignment]
        "small": VisualBertConfig(**SMALL_REGION_TEXT),
        "base": VisualBertConfig(),  # BERT-base, 2048-d detector features (the COCO models)
    }

    def __init__(self, cfg: VisualBertConfig):
        super().__init__(cfg)
        self.cfg: VisualBertConfig = cfg
        h = cfg.hidden
        self.embed = SegmentEmbeddings(
            cfg.vocab_size, h, cfg.region_dim, 0, cfg.max_len, cfg.type_vocab, eps=cfg.eps,
            dropout=cfg.dropout, pad_id=cfg.pad_id,
        )  # fmt: skip
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.embed.text)
        self.itm = ITMHead(h)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(hidden B×(L+R)×H, L). `visual_token_type_ids` (B×R) may set the regions' segment."""
        require(batch, ["input_ids", "region_feats"], "visualbert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        t_keys = batch.get("attention_mask", torch.ones_like(ids))
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        x = torch.cat(
            [
                self.embed.embed_text(ids, batch.get("token_type_ids")),
                self.embed.embed_regions(feats, token_type_ids=batch.get("visual_token_type_ids")),
            ],
            1,
        )
        keys = torch.cat([t_keys.to(torch.long), v_keys.to(torch.long)], 1)
        return self.encoder(x, attention_mask(keys)), ids.shape[1]

    def pooled(self, batch: dict[str, Any]) -> torch.Tensor:
        """The pooled [CLS] (HF's `pooler_output`)."""
        return self.pooler(self.encode(batch)[0])

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.itm(self.pooled(batch)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_text = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            out["mlm"] = mlm_task_loss(self.mlm, hidden[:, :n_text], batch)
        if "itm" in tasks:
            out["itm"] = itm_task_loss(self.itm, self.pooler(hidden), batch)
        return out
