"""ERNIE-ViL (Yu et al. 2021): ViLBERT's two streams with co-attention, pretrained with
scene-graph prediction — the object, attribute and relation words the text parser found in the
caption (`sg.json`) are masked and predicted from the rest of the sentence and the image — plus
MLM, masked region prediction (KL to the detector, as ViLBERT) and image-text matching, summed on
every batch.

The architecture is ViLBERT's (the subclass reuses its encoder and heads); what is ERNIE-ViL's is
the data: `ernie_vil_batch` runs in the loader workers and, on every row, maps every
scene-graph node's word span to WordPiece positions (`scene_graph_positions`), picks each node
with probability `SG_MASK_PROB` (30%, the paper's rate), masks the whole node (80% [MASK],
10% a random token, 10% kept, one draw per node) and, on the matched rows, writes its original
ids into that kind's labels (`sg_object_labels`, `sg_attribute_labels`, `sg_relation_labels`;
IGNORE elsewhere). A position predicted by a scene-graph loss leaves the MLM labels, so no word
is counted twice. The three losses are cross-entropy of the (shared, tied) MLM head on their
own positions only.

Span → WordPiece alignment: `sg.json` spans index the parser's spaCy tokens. Each token is
located in the caption left to right (case-insensitive, skipping only whitespace; after a token
that is not found, the next may skip text), a node is the character range of its tokens, and its
WordPieces are the body tokens whose offsets overlap that range — so punctuation split off by
either tokenizer ("square." / "square" ".") and words they split differently ("blue-ish")
align by characters, not by word counts. A node with a token that cannot be located is left out
rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from vlforge.train.collate import BatchContext
from vlforge.train.losses import (
    IGNORE,
    itm_loss,
    masked_select,
    mlm_loss,
    mrc_kl_loss,
    mrc_loss,
)
from vlforge.train.recipes.base import require
from vlforge.train.recipes.registry import register_recipe
from vlforge.train.recipes.vilbert import SMALL_VILBERT, Vilbert, VilbertConfig
from vlforge.train.tokenizer import TextTokenizer

# Scene-graph kind (sg.json list) → its task name; the batch key is f"{task}_labels".
SG_TASKS = {"objects": "sg_object", "attributes": "sg_attribute", "relations": "sg_relation"}
SG_MASK_PROB = 0.3


@dataclass
class ErnieVilConfig(VilbertConfig):
    tasks: dict[str, float] = field(
        default_factory=lambda: {"mlm": 1.0, "mrc_kl": 1.0, "itm": 1.0, "sg_object": 1.0,
                                 "sg_attribute": 1.0, "sg_relation": 1.0}
    )  # fmt: skip


# -- the loader side ---------------------------------------------------------------------------


def token_char_spans(caption: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Character span of each parser token in `caption`, None where it cannot be located."""
    low = caption.lower()
    out: list[tuple[int, int] | None] = []
    cursor, lost = 0, False
    for token in tokens:
        t = str(token).strip().lower()
        at = low.find(t, cursor) if t else -1
        if at < 0 or (low[cursor:at].strip() and not lost):
            out.append(None)
            lost = True
            continue
        out.append((at, at + len(t)))
        cursor, lost = at + len(t), False
    return out


def scene_graph_positions(
    caption: str, sg: dict[str, Any], tokenizer: TextTokenizer, max_len: int
) -> dict[str, list[list[int]]]:
    """Per kind ("objects", "attributes", "relations"), per node, the WordPiece positions of its
    words in `tokenizer.encode(caption, max_len)`; nodes that cannot be aligned or were cut off
    by truncation are left out."""
    chars = token_char_spans(caption, list(sg.get("tokens") or []))
    enc = tokenizer.tok.encode(caption)
    kept = tokenizer.encode(caption, max_len)
    body = [
        (k, s, e)
        for k, ((s, e), w) in enumerate(zip(enc.offsets, kept.word_ids, strict=False))
        if w is not None and e > s
    ]
    out: dict[str, list[list[int]]] = {kind: [] for kind in SG_TASKS}
    for kind in SG_TASKS:
        for node in sg.get(kind) or []:
            span = node.get("span") if isinstance(node, dict) else None
            if not (isinstance(span, list | tuple) and len(span) == 2):
                continue
            start, end = int(span[0]), int(span[1])
            if not 0 <= start < end <= len(chars):
                continue
            found = chars[start:end]
            if any(c is None for c in found):
                continue
            lo, hi = found[0][0], found[-1][1]  # type: ignore[index]
            pos = [k for k, s, e in body if s < hi and e > lo]
            if pos:
                out[kind].append(pos)
    return out


def mask_scene_graph(batch: dict[str, Any], ctx: BatchContext, prob: float) -> None:
    """Scene-graph masking (see the module docstring); `prob` per node. Every row is masked, the
    labels kept on the matched rows only, as the Assembler does for MLM: masked only on matched
    rows, the [MASK]s told ITM the answer (on the demo world ERNIE-ViL's training ITM loss fell
    to 0.50 while held-out ITM accuracy stayed at 0.50)."""
    tok = ctx.tokenizer
    assert tok is not None and tok.mask_id is not None
    tasks = {ctx.task} if ctx.task is not None else set(ctx.spec.tasks)
    kinds = [k for k, task in SG_TASKS.items() if task in tasks]
    ids, mlm = batch["input_ids"], batch.get("mlm_labels")
    labels = {k: torch.full_like(ids, IGNORE) for k in kinds}
    nodes: list[tuple[int, str, list[int]]] = []
    originals: dict[int, list[int]] = {}
    labelled = {int(i) for i in np.flatnonzero(ctx.loss_rows)}
    for i in range(len(ctx.captions)):
        sample, caption = ctx.samples[i], ctx.captions[i]
        sg = sample.get("sg.json")
        if not isinstance(sg, dict) or sample.get("txt") != caption:
            continue  # no graph, or the row's caption is not the one the graph was parsed from
        originals[int(i)] = tok.encode(caption, ctx.spec.max_text_len).ids
        found = scene_graph_positions(caption, sg, tok, ctx.spec.max_text_len)
        nodes += [(int(i), kind, pos) for kind in kinds for pos in found[kind]]
    chosen = ctx.rng.random(len(nodes)) < prob
    for kind in kinds:
        # Each kind predicts at least one node when the batch has any (no 0/0 loss).
        of_kind = [n for n, (i, k, _) in enumerate(nodes) if k == kind and i in labelled]
        if of_kind and not chosen[of_kind].any():
            chosen[of_kind[int(ctx.rng.integers(len(of_kind)))]] = True
    taken: set[tuple[int, int]] = set()
    for n in np.flatnonzero(chosen):
        i, kind, pos = nodes[n]
        pos = [p for p in pos if (i, p) not in taken]  # a word belongs to one kind's loss
        if not pos:
            continue
        taken |= {(i, p) for p in pos}
        orig = torch.as_tensor([originals[i][p] for p in pos])
        u = ctx.rng.random()
        if u < 0.8:
            new = torch.full_like(orig, tok.mask_id)
        elif u < 0.9 and ctx.random_ids is not None:
            new = torch.as_tensor(
                ctx.random_ids[ctx.rng.integers(len(ctx.random_ids), size=len(pos))]
            )
        else:
            new = orig
        idx = torch.as_tensor(pos)
        ids[i, idx] = new
        if i in labelled:
            labels[kind][i, idx] = orig
        if mlm is not None:
            mlm[i, idx] = IGNORE
    for kind in kinds:
        batch[f"{SG_TASKS[kind]}_labels"] = labels[kind]


def ernie_vil_batch(batch: dict[str, Any], ctx: BatchContext) -> None:
    """ERNIE-ViL's batch keys: scene-graph masks and labels when a scene-graph task trains."""
    tasks = {ctx.task} if ctx.task is not None else set(ctx.spec.tasks)
    if "input_ids" in batch and any(t in tasks for t in SG_TASKS.values()):
        mask_scene_graph(batch, ctx, SG_MASK_PROB)


# -- the model ---------------------------------------------------------------------------------


@register_recipe("ernie_vil")
class ErnieVil(Vilbert):
    name = "ernie_vil"
    supported_tasks = frozenset({"mlm", "mrc_kl", "mrc", "itm", *SG_TASKS.values()})
    sizes: ClassVar[dict[str, ErnieVilConfig]] = {  # type: ignore[assignment]
        "small": ErnieVilConfig(**SMALL_VILBERT),
        "base": ErnieVilConfig(),
    }
    extra_fields = ("sg.json",)
    batch_hook = staticmethod(ernie_vil_batch)

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        t, v = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        wanted = set(tasks)
        if "mlm" in wanted:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(t, batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        for task in SG_TASKS.values():
            if task in wanted:
                require(batch, [f"{task}_labels"], task)
                h, labels = masked_select(t, batch[f"{task}_labels"])
                out[task] = mlm_loss(self.mlm(h), labels)
        if wanted & {"mrc", "mrc_kl"}:
            require(batch, ["mrm_mask", "region_cls_prob"], "masked region prediction")
            sel = batch["mrm_mask"].bool()
            logits = self.mrc(v[:, 1:][sel])  # skip [IMG]
            prob = batch["region_cls_prob"][sel]
            if "mrc_kl" in wanted:
                out["mrc_kl"] = mrc_kl_loss(logits, prob)
            if "mrc" in wanted:
                out["mrc"] = mrc_loss(logits, prob)
        if "itm" in wanted:
            require(batch, ["itm_labels"], "itm")
            out["itm"] = itm_loss(self._itm_logits(t, v), batch["itm_labels"])
        return out
