"""UNITER (Chen et al. 2020): one transformer over [text; regions].

Text: BERT embeddings. Regions: LayerNorm(W_f·feat) + LayerNorm(W_g·7-d geometry) + the image
segment embedding, LayerNorm'd. Tasks sampled per batch with the mix ratio of UNITER's released
pretraining config (ITM 2 : MLM 2 : MRFR 1 : MRC-KL 1); ITM batches also train word-region
alignment by optimal transport (λ = 0.1). "mrc" (hard label), "mrm" (MRFR + MRC-KL) and "wra"
alone are available by override. Masking is conditional (one modality per row), done by the data
side.

"itr" is UNITER's retrieval fine-tuning objective as a task: each image scored against its caption
and `--itr-negatives` others (mined hard negatives from `mine.json` for a `--hard-neg-ratio` share,
else other captions of the batch) through the ITM head, with a softmax over the group. Among
candidates for one image, whatever the head reads off the image alone cancels, so only the
text-image interaction is rewarded — what binary ITM needs ~1000 steps of its ln 2 saddle to find.

`raw_inputs` / `task_outputs` are the seam adversarial training (train/adversarial.py, VILLA)
uses: `--set adversarial=true` perturbs the word embeddings and the region features, one
modality at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from vlforge.train.adversarial import (
    AdversarialConfig,
    Embedded,
    adversarial_loss_weights,
    adversarial_losses,
    check_config,
)
from vlforge.train.blocks import (
    Pooler,
    attention_mask,
)
from vlforge.train.losses import (
    ITMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    itm_loss,
    itm_score,
    masked_select,
    mlm_loss,
    mrc_kl_loss,
    mrc_loss,
    mrfr_loss,
    optimal_transport_distance,
    wra_loss,
)
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

REGION_TASKS = ("mrfr", "mrc", "mrc_kl")


def ranking_negatives(batch: dict[str, Any], ctx: Any) -> None:
    """Loader-side: `itr_input_ids`/`itr_attention_mask`/`itr_token_type_ids` (B×K×L), K other
    captions per row, on the batches that train "itr" (ctx is train/collate.py's BatchContext)."""
    tasks = {ctx.task} if ctx.task is not None else set(ctx.spec.tasks)
    if "itr" not in tasks or ctx.tokenizer is None:
        return
    rng, captions = ctx.rng, ctx.captions
    picked: list[list[str]] = []
    for i, own in enumerate(captions):
        hard = [
            h["caption"]
            for h in (ctx.samples[i].get("mine.json") or {}).get("hard_negatives", [])
            if h.get("caption") and h["caption"] != own
        ]
        others = [c for c in captions if c != own] or ["[UNK]"]
        picks = []
        for _ in range(ctx.spec.masking.itr_negatives):
            pool = hard if hard and rng.random() < ctx.spec.masking.hard_neg_ratio else others
            picks.append(pool[int(rng.integers(len(pool)))])
        picked.append(picks)
    # Negatives repeat within a batch (B x K picks from B captions): tokenize each caption once.
    encoded = {
        c: ctx.tokenizer.encode(c, ctx.spec.max_text_len) for c in {c for p in picked for c in p}
    }
    rows = [[encoded[c] for c in picks] for picks in picked]
    longest = max(len(e.ids) for row in rows for e in row)
    shape = (len(rows), len(rows[0]), longest)
    ids, keys, types = (
        np.zeros(shape, np.int64),
        np.zeros(shape, np.int64),
        np.zeros(shape, np.int64),
    )
    for i, row in enumerate(rows):
        for k, enc in enumerate(row):
            n = len(enc.ids)
            ids[i, k, :n], keys[i, k, :n], types[i, k, :n] = enc.ids, 1, enc.type_ids
    batch["itr_input_ids"] = torch.from_numpy(ids)
    batch["itr_attention_mask"] = torch.from_numpy(keys)
    batch["itr_token_type_ids"] = torch.from_numpy(types)


@dataclass
class UniterConfig(RegionTextConfig, AdversarialConfig):
    # The mix of UNITER's released pretraining configs (config/pretrain-indomain-base-8gpu.json:
    # itm 2 : mlm 2 : mrfr 1 : mrckl 1). The earlier MLM 2 : MRFR 2 : MRC-KL 1 : ITM 1 gave ITM a
    # sixth of the batches, and on the demo world its loss was still at ln 2 after 600 steps.
    tasks: dict[str, float] = field(
        default_factory=lambda: {"itm": 2.0, "mlm": 2.0, "mrfr": 1.0, "mrc_kl": 1.0}
    )
    task_mode: str = "sample"
    geometry: int = 7
    ot_weight: float = 0.1  # UNITER's itm_ot_lambda: WRA on every ITM batch; 0 turns it off
    ot_beta: float = 0.5
    ot_iterations: int = 50


@register_recipe("uniter")
class Uniter(Recipe):
    name = "uniter"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"mlm", "mrm", *REGION_TASKS, "itm", "wra", "itr"})
    sizes: ClassVar[dict[str, UniterConfig]] = {  # type: ignore[assignment]
        "small": UniterConfig(**SMALL_REGION_TEXT),
        "base": UniterConfig(),
    }
    conditional_masking = True
    # UNITER's `_mask_img_feat` zeroes every masked region (no 10% kept: feature regression
    # could copy a kept region's input to its output).
    masking_defaults: ClassVar[dict[str, Any]] = {"region_zero_frac": 1.0}
    extra_fields = ("mine.json",)
    batch_hook = staticmethod(ranking_negatives)

    def __init__(self, cfg: UniterConfig):
        super().__init__(cfg)
        self.cfg: UniterConfig = cfg
        self.geometry = cfg.geometry
        self.loss_weights = {"wra": cfg.ot_weight} if "wra" not in cfg.tasks else {}
        check_config(cfg)
        self.loss_weights |= adversarial_loss_weights(cfg)
        h, eps = cfg.hidden, cfg.eps
        self.text = text_embeddings(cfg)
        self.regions = region_embeddings(cfg, part_norm=True, mask_embedding=True)
        self.encoder = transformer_encoder(cfg)
        self.pooler = Pooler(h)
        self.mlm = mlm_head(cfg, self.text)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.itm = ITMHead(h)

    # -- the encoder -------------------------------------------------------------------------

    def raw_inputs(self, batch: dict[str, Any]) -> Embedded:
        """({"text": word vectors B×L×H, "image": region features B×R×D}, their key masks) for
        whichever modalities the batch has: what adversarial training perturbs (VILLA's
        `txt_emb` and `img_feat`, before positions, geometry and LayerNorms)."""
        raw, masks = {}, {}
        if "input_ids" in batch:
            ids = batch["input_ids"]
            raw["text"] = self.text.word(ids)
            masks["text"] = batch.get("attention_mask", torch.ones_like(ids)).to(torch.long)
        if "region_feats" in batch:
            feats = batch["region_feats"]
            raw["image"] = feats
            masks["image"] = batch.get(
                "region_mask", torch.ones(feats.shape[:2], device=feats.device)
            ).to(torch.long)
        if not raw:
            raise KeyError("uniter needs input_ids and/or region_feats")
        return raw, masks

    def embed(self, batch: dict[str, Any], raw: Embedded | None = None) -> Embedded:
        """({"text": B×L×H, "image": B×R×H}, key masks) in encoder order, from the batch's raw
        inputs or given (perturbed) ones."""
        inputs, masks = raw if raw is not None else self.raw_inputs(batch)
        embeds = {}
        if "text" in inputs:
            embeds["text"] = self.text(
                batch["input_ids"], batch.get("token_type_ids"), word_embeds=inputs["text"]
            )
        if "image" in inputs:
            feats = batch["region_feats"]
            img_type = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
            segment = self.text.token_type(img_type) if self.text.token_type is not None else None
            geom = batch.get("region_geom") if self.geometry else None
            # The mask embedding marks the regions the data side zeroed, perturbed or not.
            embeds["image"] = self.regions(
                inputs["image"], geom, segment, batch.get("mrm_mask"), (feats == 0).all(-1)
            )
        return embeds, masks

    def encode_embedded(self, embedded: Embedded) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(hidden B×(L+R)×H, key mask B×(L+R), L) of given embeddings."""
        embeds, masks = embedded
        x = torch.cat(list(embeds.values()), 1)
        mask = torch.cat(list(masks.values()), 1)
        n_text = embeds["text"].shape[1] if "text" in embeds else 0
        return self.encoder(x, attention_mask(mask)), mask, n_text

    def encode(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(hidden B×(L+R)×H, key mask B×(L+R), L) over whichever modalities the batch has."""
        return self.encode_embedded(self.embed(batch))

    # -- inference entry points (eval) -------------------------------------------------------

    def itm_score(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, _ = self.encode(batch)
        return itm_score(self.itm(self.pooler(hidden)))

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, _, n_text = self.encode(batch)
        return self.mlm(hidden[:, :n_text])

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        if self.cfg.adversarial and self.training:
            return adversarial_losses(self, batch, tasks, self.cfg)
        return self.task_outputs(batch, tasks)[0]

    def task_outputs(
        self, batch: dict[str, Any], tasks: list[str], raw: Embedded | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(task losses, classification logits by head) from the batch or given raw inputs
        (`raw_inputs`' format, perturbed by adversarial training)."""
        hidden, mask, n_text = self.encode_embedded(self.embed(batch, raw))
        out: dict[str, torch.Tensor] = {}
        logits_by_head: dict[str, torch.Tensor] = {}
        wanted = set(tasks)
        if "mrm" in wanted:
            wanted |= {"mrfr", "mrc_kl"}
        if "itm" in wanted and self.cfg.ot_weight > 0:
            wanted.add("wra")
        if "mlm" in wanted:
            require(batch, ["mlm_labels"], "mlm")
            h, labels = masked_select(hidden[:, :n_text], batch["mlm_labels"])
            logits_by_head["mlm"] = self.mlm(h)
            out["mlm"] = mlm_loss(logits_by_head["mlm"], labels)
        if wanted & set(REGION_TASKS):
            require(batch, ["mrm_mask"], "masked region modeling")
            sel = batch["mrm_mask"].bool()
            h = hidden[:, n_text:][sel]
            if "mrfr" in wanted:
                require(batch, ["region_feats_target"], "mrfr")
                out["mrfr"] = mrfr_loss(self.mrfr(h), batch["region_feats_target"][sel])
            if wanted & {"mrc", "mrc_kl"}:
                require(batch, ["region_cls_prob"], "mrc")
                logits, prob = self.mrc(h), batch["region_cls_prob"][sel]
                logits_by_head["mrc"] = logits
                if "mrc" in wanted:
                    out["mrc"] = mrc_loss(logits, prob)
                if "mrc_kl" in wanted:
                    out["mrc_kl"] = mrc_kl_loss(logits, prob)
        if "itm" in wanted:
            require(batch, ["itm_labels"], "itm")
            logits_by_head["itm"] = self.itm(self.pooler(hidden))
            out["itm"] = itm_loss(logits_by_head["itm"], batch["itm_labels"])
        if "itr" in wanted:
            out["itr"] = self.ranking_loss(batch)
        if "wra" in wanted:
            require(batch, ["itm_labels"], "wra")
            # Tokens after [CLS] against the regions; [CLS] carries the pooled ITM state.
            txt_mask = mask[:, :n_text].clone()
            txt_mask[:, 0] = 0
            dist = optimal_transport_distance(
                hidden[:, :n_text], hidden[:, n_text:], txt_mask, mask[:, n_text:],
                beta=self.cfg.ot_beta, iterations=self.cfg.ot_iterations,
            )  # fmt: skip
            out["wra"] = wra_loss(dist, batch["itm_labels"])
        return out, logits_by_head

    def ranking_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Softmax over [own caption; K others] of each image's ITM scores, own caption first.

        Image→text only: ranking each caption against other images as well (text→image, the
        own pair's score shared) measured no better on the demo (R@1 0.42/0.48 against
        0.45/0.47 with 3 + 3 negatives) at 1.75× the cost."""
        require(batch, ["itr_input_ids", "region_feats"], "itr")
        neg = batch["itr_input_ids"]
        b, k, _ = neg.shape
        width = max(neg.shape[-1], batch["input_ids"].shape[-1])

        def padded(x: torch.Tensor) -> torch.Tensor:
            return F.pad(x, (0, width - x.shape[-1]))

        def grouped(own: str, others: str) -> torch.Tensor:
            first = padded(batch[own])[:, None]
            return torch.cat([first, padded(batch[others])], 1).flatten(0, 1)

        pairs = {
            "input_ids": grouped("input_ids", "itr_input_ids"),
            "attention_mask": grouped("attention_mask", "itr_attention_mask"),
            "token_type_ids": grouped("token_type_ids", "itr_token_type_ids"),
        }
        for key in ("region_feats", "region_geom", "region_mask"):
            if key in batch:  # each image once per candidate caption
                pairs[key] = batch[key].repeat_interleave(k + 1, dim=0)
        hidden, _, _ = self.encode(pairs)
        scores = itm_score(self.itm(self.pooler(hidden))).view(b, k + 1).float()
        target = torch.zeros(b, dtype=torch.long, device=scores.device)
        losses = F.cross_entropy(scores, target, reduction="none")
        if "itm_labels" in batch:  # summed with ITM: a row holding a negative caption has no own
            matched = batch["itm_labels"].to(losses.dtype)
            return (losses * matched).sum() / matched.sum().clamp(min=1.0)
        return losses.mean()
