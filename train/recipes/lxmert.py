"""LXMERT (Tan & Bansal 2019): a language encoder, an object-relationship encoder and a
cross-modality encoder, pretrained on five tasks summed on every batch.

Regions enter as LayerNorm(FC(feat)) and LayerNorm(FC(4-d box)) averaged. The language layers
and the object-relationship layers are BERT layers; each cross-modality layer cross-attends
(one module for both directions), then runs self-attention and an FFN per stream
(`CrossModalityLayer`). The pooled output is the first language token's (dense + tanh). Layer
names line up with HF `LxmertModel`, which train/convert_lxmert.py converts.

Tasks: "mlm" (masked cross-modality LM), "mrc" (detected-label classification: the detector's
top object class, `argmax(cls_prob[:, 1:]) + 1` as in train/losses/mrc.py), "mrfr" (RoI-feature
regression, L2), "match" (cross-modality matching) and "qa" (image QA).

The batch hook (`lxmert_batch`, in the loader workers) does two things the shared assembler
does not:
- Matching replaces the caption (never the image, as LXMERT) of each row with probability
  `itm_neg_ratio` (0.5) by another row's caption, re-masks it like the others and sets
  `itm_labels`; the masked losses (MLM, MRC, MRFR) count on matched rows only.
- QA: a row whose image sample's json carries `questions` (the demo world writes them; a JSON
  list or its string of {"question", "answer"}) gets one of them, drawn with the batch RNG. The
  question is a *separate* text field (`qa_input_ids`, `qa_attention_mask`, `qa_token_type_ids`)
  and the answer a string (`qa_answers`, None where there is no question). Keeping the caption
  in place leaves matching and MLM untouched; the QA loss runs a second pass of the encoder over
  (question, the row's unmasked regions) for the rows whose answer is in the recipe's `answers`
  vocabulary (a config field, so the loader needs no recipe config) and trains the answer head on
  the pooled state. Rows without a question add nothing to the QA loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from vlforge.train.blocks import (
    CrossModalityLayer,
    MeanRegionEmbeddings,
    Pooler,
    TransformerLayer,
    attention_mask,
)
from vlforge.train.collate import BatchContext
from vlforge.train.losses import (
    IGNORE,
    AnswerHead,
    ITMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_loss,
    mrfr_loss,
    qa_loss,
)
from vlforge.train.masking import mask_tokens
from vlforge.train.recipes.base import (
    SMALL_REGION_TEXT,
    Recipe,
    RegionTextConfig,
    mlm_head,
    require,
    text_embeddings,
)
from vlforge.train.recipes.registry import register_recipe
from vlforge.world.questions import ANSWERS


@dataclass
class LxmertConfig(RegionTextConfig):
    """`layers` counts the language layers (LXMERT's l_layers)."""

    tasks: dict[str, float] = field(
        default_factory=lambda: {"mlm": 1.0, "mrc": 1.0, "mrfr": 1.0, "match": 1.0, "qa": 1.0}
    )
    task_mode: str = "sum"
    layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    geometry: int = 4
    answers: tuple[str, ...] = ANSWERS


# -- the loader side ---------------------------------------------------------------------------


def _pad(rows: list[np.ndarray], value: int) -> torch.Tensor:
    return pad_sequence([torch.as_tensor(r) for r in rows], batch_first=True, padding_value=value)


def sample_questions(sample: dict[str, Any]) -> list[dict[str, str]]:
    """The sample json's well-formed {"question", "answer"} items (a list or its JSON string)."""
    value = (sample.get("json") or {}).get("questions")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return []
    if not isinstance(value, list):
        return []
    return [
        q
        for q in value
        if isinstance(q, dict) and isinstance(q.get("question"), str) and q.get("answer")
    ]


def _replace_captions(batch: dict[str, Any], ctx: BatchContext) -> None:
    """Cross-modality matching: each row's caption replaced with probability itm_neg_ratio."""
    tok, spec = ctx.tokenizer, ctx.spec
    assert tok is not None
    n = len(ctx.captions)
    replace = ctx.rng.random(n) < spec.masking.itm_neg_ratio
    if replace.all() and n:
        replace[int(ctx.rng.integers(n))] = False  # keep a matched row for the masked losses
    lengths = batch["attention_mask"].sum(1).tolist()
    ids = [batch["input_ids"][i, : lengths[i]].numpy() for i in range(n)]
    types = [batch["token_type_ids"][i, : lengths[i]].numpy() for i in range(n)]
    labels = [batch["mlm_labels"][i, : lengths[i]].numpy() for i in range(n)]
    matched = np.ones(n, dtype=np.int64)
    for i in np.flatnonzero(replace):
        donors = [j for j in range(n) if ctx.captions[j] != ctx.captions[i]]
        if not donors:
            continue
        enc = tok.encode(
            ctx.captions[donors[int(ctx.rng.integers(len(donors)))]], spec.max_text_len
        )
        row = np.array(enc.ids, dtype=np.int64)
        if ctx.text_rows[i]:
            # Masked like every row, so a [MASK] cannot tell the matching head which rows are
            # negatives; its labels are dropped (no MLM on a mismatched pair).
            assert ctx.random_ids is not None
            row, _ = mask_tokens(
                row, enc.word_ids, ctx.rng, spec.masking, tok.mask_id, ctx.random_ids
            )
        ids[i], types[i] = row, np.array(enc.type_ids, dtype=np.int64)
        labels[i] = np.full(len(row), IGNORE, dtype=np.int64)
        matched[i] = 0
    batch["input_ids"] = _pad(ids, tok.pad_id)
    batch["attention_mask"] = _pad([np.ones(len(r), dtype=np.int64) for r in ids], 0)
    batch["token_type_ids"] = _pad(types, 0)
    batch["mlm_labels"] = _pad(labels, IGNORE)
    batch["itm_labels"] = torch.as_tensor(matched)
    if "mrm_mask" in batch:
        batch["mrm_mask"][torch.as_tensor(matched == 0)] = False


def _add_questions(batch: dict[str, Any], ctx: BatchContext) -> None:
    tok = ctx.tokenizer
    assert tok is not None
    per_row = [sample_questions(s) for s in ctx.visual_samples]
    if not any(per_row):
        return
    ids, types, answers = [], [], []
    for qs in per_row:
        q = qs[int(ctx.rng.integers(len(qs)))] if qs else None
        enc = tok.encode(q["question"] if q else "", ctx.spec.max_text_len)
        ids.append(np.array(enc.ids, dtype=np.int64))
        types.append(np.array(enc.type_ids, dtype=np.int64))
        answers.append(str(q["answer"]) if q else None)
    batch["qa_input_ids"] = _pad(ids, tok.pad_id)
    batch["qa_attention_mask"] = _pad([np.ones(len(r), dtype=np.int64) for r in ids], 0)
    batch["qa_token_type_ids"] = _pad(types, 0)
    batch["qa_answers"] = answers


def lxmert_batch(batch: dict[str, Any], ctx: BatchContext) -> None:
    """LXMERT's batch keys: replaced captions for matching, and questions for QA (also on
    evaluation batches, which train no task)."""
    tasks = {ctx.task} if ctx.task is not None else set(ctx.spec.tasks)
    if "match" in tasks and "input_ids" in batch:
        _replace_captions(batch, ctx)
    if "qa" in tasks or not tasks:
        _add_questions(batch, ctx)


# -- the model ---------------------------------------------------------------------------------


@register_recipe("lxmert")
class Lxmert(Recipe):
    name = "lxmert"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "mrc", "mrfr", "match", "qa"})
    sizes: ClassVar[dict[str, LxmertConfig]] = {  # type: ignore[assignment]
        "small": LxmertConfig(**SMALL_REGION_TEXT | {"layers": 1, "r_layers": 1, "x_layers": 2}),
        "base": LxmertConfig(),
    }
    batch_hook = staticmethod(lxmert_batch)
    # LXMERT's `random_feat`: of the masked regions 80% zeroed, 10% replaced by a random region
    # feature (here from the batch; the reference draws from the whole dataset), 10% kept.
    masking_defaults: ClassVar[dict[str, Any]] = {
        "region_zero_frac": 0.8,
        "region_random_frac": 0.1,
    }

    def __init__(self, cfg: LxmertConfig):
        super().__init__(cfg)
        self.cfg: LxmertConfig = cfg
        self.geometry = cfg.geometry
        if not cfg.answers:
            raise ValueError("lxmert needs a non-empty answer vocabulary (answers)")
        self.answer_index = {a: i for i, a in enumerate(cfg.answers)}
        h, eps = cfg.hidden, cfg.eps
        kw = dict(act=cfg.act, eps=eps, dropout=cfg.dropout, attn_dropout=cfg.attn_dropout)
        self.text = text_embeddings(cfg)
        self.regions = MeanRegionEmbeddings(
            cfg.region_dim, cfg.geometry, h, eps, cfg.dropout, mask_embedding=True
        )
        self.lang_layers = nn.ModuleList(
            TransformerLayer(h, cfg.heads, cfg.mlp, **kw)  # type: ignore[arg-type]
            for _ in range(cfg.layers)
        )
        self.r_layers = nn.ModuleList(
            TransformerLayer(h, cfg.heads, cfg.mlp, **kw)  # type: ignore[arg-type]
            for _ in range(cfg.r_layers)
        )
        self.x_layers = nn.ModuleList(
            CrossModalityLayer(h, cfg.heads, cfg.mlp, **kw)  # type: ignore[arg-type]
            for _ in range(cfg.x_layers)
        )
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.text)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.itm = ITMHead(h)
        self.qa = AnswerHead(h, len(cfg.answers), cfg.act, eps)

    # -- the encoder -------------------------------------------------------------------------

    def encode_pair(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None,
        text_mask: torch.Tensor,
        feats: torch.Tensor,
        geom: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(language output B×L×H, vision output B×R×H, pooled B×H), as HF LxmertModel."""
        t_mask, v_mask = attention_mask(text_mask), attention_mask(region_mask)
        lang = self.text(input_ids, token_type_ids)
        vision = self.regions(feats, geom)
        for layer in self.lang_layers:
            lang = layer(lang, t_mask)
        for layer in self.r_layers:
            vision = layer(vision, v_mask)
        for layer in self.x_layers:
            lang, vision = layer(lang, vision, t_mask, v_mask)
        return lang, vision, self.pooler(lang)

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        require(batch, ["input_ids", "region_feats", "region_geom"], "lxmert")
        ids, feats = batch["input_ids"], batch["region_feats"]
        return self.encode_pair(
            ids,
            batch.get("token_type_ids"),
            batch.get("attention_mask", torch.ones_like(ids)),
            feats,
            batch["region_geom"],
            batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device)),
        )

    def answer_logits(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits Q×A, answer ids Q) of the rows whose question's answer is in the vocabulary;
        the regions are the unmasked ones (`region_feats_target`) when the batch has them."""
        answers = batch.get("qa_answers") or []
        rows = [i for i, a in enumerate(answers) if a in self.answer_index]
        device = batch["region_feats"].device
        idx = torch.as_tensor(rows, dtype=torch.long, device=device)
        labels = torch.as_tensor(
            [self.answer_index[answers[i]] for i in rows], dtype=torch.long, device=device
        )
        if not rows:
            return self.qa(torch.zeros(0, self.cfg.hidden, device=device)), labels
        feats = batch.get("region_feats_target", batch["region_feats"])
        region_mask = batch.get("region_mask", torch.ones(feats.shape[:2], device=device))
        _, _, pooled = self.encode_pair(
            batch["qa_input_ids"][idx],
            batch["qa_token_type_ids"][idx],
            batch["qa_attention_mask"][idx],
            feats[idx],
            batch["region_geom"][idx],
            region_mask[idx],
        )
        return self.qa(pooled), labels

    # -- inference entry points (eval) -------------------------------------------------------

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        return itm_score(self.itm(self.encode(batch)[2]))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.mlm(self.encode(batch)[0])

    def extra_metrics(self, evaluator: Any, samples: list[dict[str, Any]]) -> dict[str, float]:
        """QA accuracy (argmax over `answers`) on the held-out rows that carry a question."""
        right = total = 0
        for i in range(0, len(samples), evaluator.bs):
            batch = evaluator._batch(samples[i : i + evaluator.bs], i=i // evaluator.bs)
            logits, labels = self.answer_logits(batch)
            right += int((logits.argmax(-1) == labels).sum())
            total += len(labels)
        if not total:
            return {"qa_n": 0}
        return {"qa_accuracy": right / total, "qa_n": total}

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        lang, vision, pooled = self.encode(batch)
        out: dict[str, torch.Tensor] = {}
        wanted = set(tasks)
        if "mlm" in wanted:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(lang, batch["mlm_labels"])
            out["mlm"] = mlm_loss(self.mlm(h), labels)
        if wanted & {"mrc", "mrfr"}:
            require(batch, ["mrm_mask"], "masked region tasks")
            sel = batch["mrm_mask"].bool()
            h = vision[sel]
            if "mrc" in wanted:
                require(batch, ["region_cls_prob"], "mrc")
                out["mrc"] = mrc_loss(self.mrc(h), batch["region_cls_prob"][sel])
            if "mrfr" in wanted:
                require(batch, ["region_feats_target"], "mrfr")
                out["mrfr"] = mrfr_loss(self.mrfr(h), batch["region_feats_target"][sel])
        if "match" in wanted:
            require(batch, ["itm_labels"], "match")
            out["match"] = itm_loss(self.itm(pooled), batch["itm_labels"])
        if "qa" in wanted:
            logits, labels = self.answer_logits(batch)
            out["qa"] = qa_loss(logits, labels)
        return out
