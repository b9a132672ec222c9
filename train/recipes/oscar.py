"""Oscar (Li et al. 2020): one BERT over the triple (w, q, v) — caption words, the detector's object
tags as a second text segment, and region features.

Sequence: [CLS] words [SEP] | tags [SEP] | regions. Tags are segment 1 and continue the caption's
positions, as one BERT sentence pair; regions are a projection of feature + geometry with no
position. The tags come from the sample's `tags.json`, tokenized in the loader workers by
`oscar_batch_hook` (attributes above ATTRIBUTE_MIN_SCORE precede their object's name, as Oscar+
writes "red square"; set it above 1 for Oscar's names only). Pretraining sums, on every batch:
- masked token loss over words AND tags (15%, 80/10/10: the data side masks the words, the hook
  the tags with the same rule);
- the contrastive loss: with probability 0.5 the hook replaces a row's tag sequence by another
  row's ("polluted"), and a binary head on the pooled [CLS] predicts whether (w, q, v) is
  original (`contrastive_labels` 1) or polluted (0).
Eval ranks pairs by that head on unpolluted rows with the image's own tags (`itm_score`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from vlforge.train.blocks import (
    Pooler,
    attention_mask,
)
from vlforge.train.collate import BatchContext
from vlforge.train.losses import (
    IGNORE,
    ITMHead,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
)
from vlforge.train.masking import mask_tokens
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    mlm_head,
    region_embeddings,
    require,
    text_embeddings,
    transformer_encoder,
)
from vlforge.train.recipes.registry import register_recipe

MAX_TAG_TOKENS = 20  # tag tokens per row, the closing [SEP] included
POLLUTE_PROB = 0.5  # Oscar's rate of replaced tag sequences
ATTRIBUTE_MIN_SCORE = 0.5
TAG_SEGMENT = 1


def tag_text(tags: Any) -> str:
    """tags.json → the tag sentence: names by falling score, each after its confident attributes."""
    # tags.json is untrusted shard data: entries that are not tag objects are skipped.
    items = _entries(tags.get("tags") if isinstance(tags, dict) else None)
    words: list[str] = []
    for tag in sorted(items, key=_score, reverse=True):
        attrs = sorted(_entries(tag.get("attributes")), key=_score, reverse=True)
        if tag.get("name"):
            words += [
                str(a["name"]) for a in attrs if a.get("name") and _score(a) >= ATTRIBUTE_MIN_SCORE
            ]
            words.append(str(tag["name"]))
    return " ".join(words)


def _entries(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _score(entry: dict[str, Any]) -> float:
    try:
        return float(entry.get("score", 0.0))
    except (TypeError, ValueError):
        return 0.0


def oscar_batch_hook(batch: dict[str, Any], ctx: BatchContext) -> None:
    """Adds tag_ids, tag_mask, tag_mlm_labels (B×T) and contrastive_labels (B; 1 original, 0
    polluted). Tags describe the image, so they come from the row's visual sample; pollution only
    on batches that train the contrastive task (never in eval)."""
    tok = ctx.tokenizer
    if tok is None or tok.mask_id is None or ctx.random_ids is None:
        raise ValueError("oscar's tags need a tokenizer with a [MASK] token")
    true = [tag_text(s.get("tags.json")) for s in ctx.visual_samples]
    texts, labels = list(true), np.ones(len(true), dtype=np.int64)
    if "contrastive" in ctx.spec.tasks and ctx.task in (None, "contrastive"):
        for i in np.flatnonzero(ctx.rng.random(len(true)) < POLLUTE_PROB):
            # Another row's tags (the batch is Oscar's random draw from the data set); identical
            # tags would be no pollution, so a row with no different donor stays original.
            donors = [j for j, t in enumerate(true) if t != true[i]]
            if donors:
                texts[i] = true[donors[int(ctx.rng.integers(len(donors)))]]
                labels[i] = 0
    ids, mlm = [], []
    for i, text in enumerate(texts):
        enc = tok.encode(text, MAX_TAG_TOKENS + 1)
        start = 1 if enc.ids and enc.ids[0] == tok.cls_id else 0  # [CLS] opens the caption only
        row = np.array(enc.ids[start:], dtype=np.int64)
        lab = np.full(len(row), IGNORE, dtype=np.int64)
        if ctx.text_rows[i]:
            row, lab = mask_tokens(
                row, enc.word_ids[start:], ctx.rng, ctx.spec.masking, tok.mask_id, ctx.random_ids
            )
            if not ctx.loss_rows[i]:
                lab = np.full_like(lab, IGNORE)
        ids.append(torch.as_tensor(row))
        mlm.append(torch.as_tensor(lab))
    batch["tag_ids"] = pad_sequence(ids, batch_first=True, padding_value=tok.pad_id)
    batch["tag_mask"] = pad_sequence(
        [torch.ones(len(r), dtype=torch.long) for r in ids], batch_first=True
    )
    batch["tag_mlm_labels"] = pad_sequence(mlm, batch_first=True, padding_value=IGNORE)
    batch["contrastive_labels"] = torch.as_tensor(labels)


@dataclass
class OscarConfig(RegionTextConfig):
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0, "contrastive": 1.0})
    task_mode: str = "sum"
    # Oscar appends 6-d box geometry (x1, y1, x2, y2, w, h) to the features; the loader's 7-d
    # encoding adds the area to those.
    geometry: int = 7


@register_recipe("oscar")
class Oscar(Recipe):
    name = "oscar"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "contrastive"})
    extra_fields = ("tags.json",)
    batch_hook = staticmethod(oscar_batch_hook)
    sizes: ClassVar[dict[str, OscarConfig]] = {  # type: ignore[assignment]
        "small": OscarConfig(**SMALL_REGION_TEXT),
        "base": OscarConfig(),  # BERT-base; 2048-d features
    }

    def __init__(self, cfg: OscarConfig):
        super().__init__(cfg)
        self.cfg: OscarConfig = cfg
        self.geometry = cfg.geometry
        h = cfg.hidden
        self.text = text_embeddings(cfg)
        self.regions = region_embeddings(cfg)
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.text)
        self.contrastive = ITMHead(h)  # 2-way: polluted (0) or original (1)

    def tag_positions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids, key mask) of the tag tokens, both B×T. Each row's tags continue right
        after its own caption; tags past the position table are cut, as BERT truncates a pair."""
        tags = batch["tag_ids"]
        t_keys = batch.get("tag_mask", torch.ones_like(tags)).to(torch.long)
        words = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(torch.long)
        pos = words.sum(1, keepdim=True) + torch.arange(tags.shape[1], device=tags.device)
        t_keys = t_keys * (pos < self.cfg.max_len)
        return pos * t_keys, t_keys

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int, int]:
        """(hidden B×(L+T+R)×H, L words, T tag tokens); T = 0 for a batch without tags."""
        require(batch, ["input_ids", "region_feats"], "oscar")
        ids, feats = batch["input_ids"], batch["region_feats"]
        w_keys = batch.get("attention_mask", torch.ones_like(ids))
        parts = [self.text(ids, batch.get("token_type_ids"))]
        keys = [w_keys.to(torch.long)]
        n_tags = 0
        if "tag_ids" in batch:
            tags = batch["tag_ids"]
            pos, t_keys = self.tag_positions(batch)
            n_tags = tags.shape[1]
            parts.append(self.text(tags, torch.full_like(tags, TAG_SEGMENT), pos))
            keys.append(t_keys)
        v_keys = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        geom = batch.get("region_geom")
        if geom is None:
            raise KeyError("oscar needs region_geom (7-d)")
        parts.append(self.regions(feats, geom))
        keys.append(v_keys.to(torch.long))
        x, mask = torch.cat(parts, 1), torch.cat(keys, 1)
        return self.encoder(x, attention_mask(mask)), ids.shape[1], n_tags

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.contrastive(self.pooler(self.encode(batch)[0])))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_words, _ = self.encode(batch)
        return self.mlm(hidden[:, :n_words])

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        hidden, n_words, n_tags = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        if "mlm" in tasks:
            require(batch, ["mlm_labels"], "mlm")
            labels = batch["mlm_labels"]
            if n_tags:
                require(batch, ["tag_mlm_labels"], "mlm")
                cut = self.tag_positions(batch)[1] == 0
                labels = torch.cat([labels, batch["tag_mlm_labels"].masked_fill(cut, IGNORE)], 1)
            h, lab = masked_select(hidden[:, : n_words + n_tags], labels)
            out["mlm"] = mlm_loss(self.mlm(h), lab)
        if "contrastive" in tasks:
            require(batch, ["contrastive_labels"], "contrastive")
            logits = self.contrastive(self.pooler(hidden))
            out["contrastive"] = itm_loss(logits, batch["contrastive_labels"])
        return out
