"""UNIMO (Li et al. 2021): one transformer for text-only, image-only and image-text data.

Sequence: [IMG] + regions (5-d geometry) + [CLS] caption [SEP]. [IMG] is a learned token that is
always present, so a text-only row (its regions dropped) still has a visual query that can attend
somewhere. Tasks, summed on every batch as in the paper (L = L_CMCL + L_Context + L_V, with
L_Context = bidirectional MLM + seq2seq LM and L_V = masked region feature regression + class
prediction):

- cmcl: cross-modal contrastive learning. Image and text are encoded separately ([IMG] and [CLS]
  states, projected); positives are the row's own pair, its TF-IDF-retrieved captions and any
  batch row mine.json names as a text or image positive; hard negatives are its scene-graph
  rewrites plus the other rows (losses/cmcl.py). In-batch negatives are this rank's batch.
- mlm: bidirectional masked LM over the joint sequence. One modality is masked at a time, as
  in the paper: a pair row has its text or its regions masked (half each), the other whole
  (`one_modality`); the region losses come from the same pass.
- mrfr / mrc: masked region feature regression and detector-class prediction; regions overlapping
  a masked one by IoU ≥ --overlap-iou (0.3) are masked with it (`region_mask_overlap`).
- seq2seq: teacher-forced captioning with the seq2seq mask (blocks/seq2seq_mask.py) on the
  unmasked inputs: the visual part attends within itself, caption token t to the visual part and
  tokens ≤ t, and predicts token t + 1.

Data mixing is decided in the loader (`UnimoBatchHook`, from the batch RNG): a row becomes
text-only with probability `text_only_ratio` (region_mask zeroed, no region targets) and
image-only with `image_only_ratio` (caption emptied to [CLS] [SEP], no text targets). CMCL uses
the paired rows only; seq2seq skips image-only rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn

from vlforge.train.blocks import (
    RegionEmbeddings,
    TextEmbeddings,
    TransformerEncoder,
    attention_mask,
    seq2seq_attention_mask,
)
from vlforge.train.collate import BatchContext
from vlforge.train.losses import (
    IGNORE,
    MLMHead,
    RegionClassifier,
    RegionFeatureRegressor,
    cmcl_loss,
    masked_select,
    mlm_loss,
    mrc_loss,
    mrfr_loss,
)
from vlforge.train.recipes.base import (
    SMALL_INIT_STD,
    Recipe,
    RegionTextConfig,
    require,
    resolve_config,
)
from vlforge.train.recipes.registry import register_recipe

PAIR, TEXT_ONLY, IMAGE_ONLY = 0, 1, 2


@dataclass
class UnimoConfig(RegionTextConfig):
    tasks: dict[str, float] = field(
        default_factory=lambda: {"cmcl": 1.0, "mlm": 1.0, "seq2seq": 1.0, "mrfr": 1.0, "mrc": 1.0}
    )
    task_mode: str = "sum"
    geometry: int = 5
    embed_dim: int = 256  # contrastive projection width
    init_temperature: float = 0.07
    text_only_ratio: float = 0.1  # rows that keep only their caption
    image_only_ratio: float = 0.1  # rows that keep only their regions
    cmcl_positives: int = 2  # retrieved captions per row used as extra positives
    cmcl_rewrites: int = 4  # scene-graph rewrites per row used as extra hard negatives


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class UnimoBatchHook:
    """Loader-side: per-row data mixing and the CMCL extras (see the module docstring).

    Mixing applies only to batches of the training task set; evaluation batches (other task
    sets) keep every row paired. Adds `modality` (B long: 0 pair, 1 text-only, 2 image-only),
    `cmcl_positive` (B×B bool) and `cmcl_extra_{ids,mask,row,positive}`.
    """

    text_only_ratio: float
    image_only_ratio: float
    max_positives: int
    max_rewrites: int
    train_tasks: frozenset[str]

    def kinds(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Each row's kind from one uniform draw per row."""
        u = rng.random(n)
        kind = np.full(n, PAIR, dtype=np.int64)
        kind[u < self.text_only_ratio] = TEXT_ONLY
        kind[(u >= self.text_only_ratio) & (u < self.text_only_ratio + self.image_only_ratio)] = (
            IMAGE_ONLY
        )
        return kind

    def __call__(self, batch: dict[str, Any], ctx: BatchContext) -> None:
        n = len(ctx.captions)
        training = bool(self.train_tasks) and set(ctx.spec.tasks) == self.train_tasks
        kind = self.kinds(ctx.rng, n) if training else np.zeros(n, dtype=np.int64)
        batch["modality"] = torch.as_tensor(kind)
        one_modality(batch, ctx, kind)
        for r in np.flatnonzero(kind == TEXT_ONLY):
            if "region_mask" in batch:
                batch["region_mask"][r] = 0
            if "mrm_mask" in batch:
                batch["mrm_mask"][r] = False
        empty = ctx.tokenizer.encode("", ctx.spec.max_text_len).ids if ctx.tokenizer else []
        for r in np.flatnonzero(kind == IMAGE_ONLY):
            if "input_ids" in batch:
                batch["input_ids"][r] = ctx.tokenizer.pad_id if ctx.tokenizer else 0
                batch["input_ids"][r, : len(empty)] = torch.as_tensor(empty, dtype=torch.long)
                batch["attention_mask"][r] = 0
                batch["attention_mask"][r, : len(empty)] = 1
                batch["token_type_ids"][r] = 0
                batch["mlm_labels"][r] = IGNORE
        if "cmcl" in ctx.spec.tasks and ctx.tokenizer is not None:
            batch.update(self.cmcl_extras(ctx, kind))

    def cmcl_extras(self, ctx: BatchContext, kind: np.ndarray) -> dict[str, torch.Tensor]:
        n = len(ctx.captions)
        # Rows by the key of their caption's sample and of their image's sample.
        row_of = {s.get("__key__"): j for j, s in enumerate(ctx.samples)}
        image_row_of = {s.get("__key__"): j for j, s in enumerate(ctx.visual_samples)}
        caps = [_norm(c) for c in ctx.captions]
        # positive[i, j]: caption j fits image i. Same caption, a text positive of i that is in
        # the batch, or i's caption being an image positive of j's image, all count.
        _, same = np.unique(np.array(caps, dtype=object), return_inverse=True)
        pos = (same[:, None] == same[None, :]) | np.eye(n, dtype=bool)
        extras: list[tuple[str, int, bool]] = []  # (caption, anchor row, is a positive)
        for i, sample in enumerate(ctx.samples):
            mine = sample.get("mine.json") or {}
            for p in mine.get("image_positives") or []:
                if p.get("key") in image_row_of:
                    pos[image_row_of[p["key"]], i] = True
            if kind[i] != PAIR:
                continue
            extra_pos = 0
            for p in mine.get("positives") or []:
                if p.get("key") in row_of:
                    pos[i, row_of[p["key"]]] = True
                    continue
                c = p.get("caption") or ""
                if c and _norm(c) not in caps and extra_pos < self.max_positives:
                    extras.append((c, i, True))
                    extra_pos += 1
            rewrites = [w.get("caption") or "" for w in mine.get("rewrites") or []]
            for c in [c for c in rewrites if c and _norm(c) != caps[i]][: self.max_rewrites]:
                extras.append((c, i, False))
        assert ctx.tokenizer is not None
        texts = [c for c, _, _ in extras]
        rows = [i for _, i, _ in extras]
        flags = [f for _, _, f in extras]
        encoded = [ctx.tokenizer.encode(c, ctx.spec.max_text_len).ids for c in texts]
        width = max((len(e) for e in encoded), default=1)
        ids = np.full((len(encoded), width), ctx.tokenizer.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), width), dtype=np.int64)
        for k, e in enumerate(encoded):
            ids[k, : len(e)], mask[k, : len(e)] = e, 1
        return {
            "cmcl_positive": torch.as_tensor(pos),
            "cmcl_extra_ids": torch.as_tensor(ids),
            "cmcl_extra_mask": torch.as_tensor(mask),
            "cmcl_extra_row": torch.as_tensor(np.array(rows, dtype=np.int64)),
            "cmcl_extra_positive": torch.as_tensor(np.array(flags, dtype=bool)),
        }


def one_modality(batch: dict[str, Any], ctx: BatchContext, kind: np.ndarray) -> None:
    """UNIMO's masking of one modality at a time: of a row whose text and regions were both
    masked, a pair keeps one (half each, from the batch RNG), a text-only row its text, an
    image-only row its regions; the other modality is restored whole. Done here rather than by
    the collate's `conditional_masking`, which chooses before the rows' kinds are known and
    would leave a text-only row with only its (dropped) regions masked."""
    both = np.asarray(ctx.text_rows & ctx.region_rows, dtype=bool)
    if not both.any() or "mlm_labels" not in batch or "mrm_mask" not in batch:
        return
    on_text = ctx.rng.random(len(both)) < 0.5
    on_text[kind == TEXT_ONLY], on_text[kind == IMAGE_ONLY] = True, False
    text_whole = torch.as_tensor(both & ~on_text)
    regions_whole = torch.as_tensor(both & on_text)
    labels = batch["mlm_labels"]
    original = torch.where(labels != IGNORE, labels, batch["input_ids"])
    batch["input_ids"][text_whole] = original[text_whole]
    labels[text_whole] = IGNORE
    batch["region_feats"][regions_whole] = batch["region_feats_target"][regions_whole]
    batch["mrm_mask"][regions_whole] = False


# The trainer reads `batch_hook` off the recipe's class, and the mixing ratios are config fields
# (`--set text_only_ratio=…`): each distinct hook gets its own subclass carrying it.
_HOOKED: dict[UnimoBatchHook, type] = {}


@register_recipe("unimo")
class Unimo(Recipe):
    name = "unimo"
    inputs = frozenset({"text", "regions"})
    supported_tasks = frozenset({"cmcl", "mlm", "seq2seq", "mrfr", "mrc"})
    sizes: ClassVar[dict[str, UnimoConfig]] = {  # type: ignore[assignment]
        "small": UnimoConfig(
            hidden=64,
            layers=2,
            heads=4,
            mlp=128,
            max_len=128,
            region_dim=64,
            num_region_classes=32,
            embed_dim=32,
            dropout=0.0,
            attn_dropout=0.0,
            init_std=SMALL_INIT_STD,
        ),  # fmt: skip
        "base": UnimoConfig(),
    }
    region_mask_overlap = True
    extra_fields = ("mine.json",)
    # The default config's hook, for a Unimo made without `build` (build attaches its own).
    batch_hook = UnimoBatchHook(
        UnimoConfig.text_only_ratio, UnimoConfig.image_only_ratio, UnimoConfig.cmcl_positives,
        UnimoConfig.cmcl_rewrites, frozenset(UnimoConfig().tasks),
    )  # fmt: skip

    @classmethod
    def build(cls, size: str = "small", vocab_size: int = 30522, **overrides: Any) -> Self:
        cfg = resolve_config(cls.sizes, size, vocab_size, overrides)
        for name in ("text_only_ratio", "image_only_ratio"):
            if not 0.0 <= getattr(cfg, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if cfg.text_only_ratio + cfg.image_only_ratio > 1.0:
            raise ValueError("text_only_ratio + image_only_ratio must not exceed 1")
        hook = UnimoBatchHook(
            cfg.text_only_ratio, cfg.image_only_ratio, cfg.cmcl_positives, cfg.cmcl_rewrites,
            frozenset(cfg.tasks),
        )  # fmt: skip
        kind = _HOOKED.setdefault(
            hook, type(cls.__name__, (cls,), {"batch_hook": hook, "__module__": __name__})
        )
        model = kind(cfg)
        model.reset_parameters()
        return model

    def __init__(self, cfg: UnimoConfig):
        super().__init__(cfg)
        self.cfg: UnimoConfig = cfg
        self.geometry = cfg.geometry
        h, eps = cfg.hidden, cfg.eps
        self.text = TextEmbeddings(
            cfg.vocab_size, h, cfg.max_len, cfg.type_vocab, eps=eps, dropout=cfg.dropout,
            pad_id=cfg.pad_id,
        )  # fmt: skip
        self.regions = RegionEmbeddings(
            cfg.region_dim, cfg.geometry, h, part_norm=True, eps=eps, dropout=cfg.dropout,
            mask_embedding=True,
        )  # fmt: skip
        self.img_token = nn.Embedding(1, h)  # [IMG]
        self.encoder = TransformerEncoder(
            cfg.layers, h, cfg.heads, cfg.mlp, act=cfg.act, eps=eps, dropout=cfg.dropout,
            attn_dropout=cfg.attn_dropout,
        )  # fmt: skip
        # One vocabulary head for both LMs (UNIMO/UNILM share it), tied to the word embeddings.
        self.lm = MLMHead(h, cfg.vocab_size, cfg.act, eps, tie_to=self.text.word)
        self.mrfr = RegionFeatureRegressor(h, cfg.region_dim, cfg.act, eps)
        self.mrc = RegionClassifier(h, cfg.num_region_classes, cfg.act, eps)
        self.image_proj = nn.Linear(h, cfg.embed_dim)
        self.text_proj = nn.Linear(h, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.init_temperature)))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / self.cfg.init_temperature))

    # -- embeddings and the encoder ----------------------------------------------------------

    def _visual(
        self, batch: dict[str, Any], feats: torch.Tensor | None, masked: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([IMG] + regions B×(1+R)×H, key mask B×(1+R)); [IMG] alone when `feats` is None."""
        ref = feats if feats is not None else batch["input_ids"]
        b = ref.shape[0]
        img = self.img_token.weight[None].expand(b, 1, -1)
        ones = torch.ones(b, 1, dtype=torch.long, device=ref.device)
        if feats is None:
            return img, ones
        geom = batch.get("region_geom")
        x = self.regions(feats, geom, None, masked)
        rmask = batch.get("region_mask", torch.ones(feats.shape[:2], device=feats.device))
        return torch.cat([img, x], 1), torch.cat([ones, rmask.to(torch.long)], 1)

    def _text(
        self, ids: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Segment 0 = text throughout; the visual part is told apart by its own embeddings.
        return self.text(ids), (mask if mask is not None else torch.ones_like(ids)).to(torch.long)

    def joint(
        self,
        batch: dict[str, Any],
        ids: torch.Tensor,
        text_mask: torch.Tensor | None,
        feats: torch.Tensor | None,
        masked: torch.Tensor | None = None,
        seq2seq: bool = False,
    ) -> tuple[torch.Tensor, int]:
        """Hidden states of [IMG, regions; text] (bidirectional, or the seq2seq mask) and the
        length of the visual part."""
        v, vm = self._visual(batch, feats, masked)
        t, tm = self._text(ids, text_mask)
        key_mask = torch.cat([vm, tm], 1)
        n_vis = v.shape[1]
        mask = seq2seq_attention_mask(key_mask, n_vis) if seq2seq else attention_mask(key_mask)
        return self.encoder(torch.cat([v, t], 1), mask), n_vis

    # -- inference entry points (eval, generation) -------------------------------------------

    def encode_image(self, batch: dict[str, Any]) -> torch.Tensor:
        v, vm = self._visual(batch, batch.get("region_feats_target", batch["region_feats"]))
        return self.image_proj(self.encoder(v, attention_mask(vm))[:, 0])

    def encode_text(self, batch: dict[str, Any]) -> torch.Tensor:
        t, tm = self._text(_original_ids(batch), batch.get("attention_mask"))
        return self.text_proj(self.encoder(t, attention_mask(tm))[:, 0])

    def mlm_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        hidden, n_vis = self.joint(
            batch, batch["input_ids"], batch.get("attention_mask"), batch.get("region_feats"),
            batch.get("mrm_mask"),
        )  # fmt: skip
        return self.lm(hidden[:, n_vis:])

    def next_token_logits(self, batch: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits B×V for the token after `ids` (B×T, no padding) given the batch's
        regions, under the seq2seq mask."""
        feats = batch.get("region_feats_target", batch.get("region_feats"))
        hidden, _ = self.joint(batch, ids, None, feats, seq2seq=True)
        return self.lm(hidden[:, -1])

    # -- losses ------------------------------------------------------------------------------

    def compute_losses(self, batch: dict[str, Any], tasks: list[str]) -> dict[str, torch.Tensor]:
        wanted = set(tasks)
        out: dict[str, torch.Tensor] = {}
        require(batch, ["input_ids", "region_feats"], "unimo")
        modality = batch.get("modality", torch.zeros_like(batch["input_ids"][:, 0]))
        if wanted & {"mlm", "mrfr", "mrc"}:
            hidden, n_vis = self.joint(
                batch, batch["input_ids"], batch.get("attention_mask"), batch["region_feats"],
                batch.get("mrm_mask"),
            )  # fmt: skip
            if "mlm" in wanted:
                require(batch, ["mlm_labels"], "mlm")
                h, labels = masked_select(hidden[:, n_vis:], batch["mlm_labels"])
                out["mlm"] = mlm_loss(self.lm(h), labels)
            if wanted & {"mrfr", "mrc"}:
                require(batch, ["mrm_mask", "region_feats_target"], "masked region modeling")
                sel = batch["mrm_mask"].bool()
                h = hidden[:, 1:n_vis][sel]
                if "mrfr" in wanted:
                    out["mrfr"] = mrfr_loss(self.mrfr(h), batch["region_feats_target"][sel])
                if "mrc" in wanted:
                    require(batch, ["region_cls_prob"], "mrc")
                    out["mrc"] = mrc_loss(self.mrc(h), batch["region_cls_prob"][sel])
        if "seq2seq" in wanted:
            out["seq2seq"] = self.seq2seq_loss(batch, modality)
        if "cmcl" in wanted:
            out["cmcl"] = self.cmcl_loss(batch, modality)
        return out

    def seq2seq_loss(self, batch: dict[str, Any], modality: torch.Tensor) -> torch.Tensor:
        """Teacher-forced caption LM: position t predicts token t + 1 of the unmasked caption."""
        ids = _original_ids(batch)
        tmask = batch.get("attention_mask", torch.ones_like(ids))
        feats = batch.get("region_feats_target", batch["region_feats"])
        hidden, n_vis = self.joint(batch, ids, tmask, feats, seq2seq=True)
        labels = ids[:, 1:].masked_fill(tmask[:, 1:] == 0, IGNORE)
        labels = labels.masked_fill((modality == IMAGE_ONLY)[:, None], IGNORE)
        h, labels = masked_select(hidden[:, n_vis:-1], labels)
        return mlm_loss(self.lm(h), labels)

    def cmcl_loss(self, batch: dict[str, Any], modality: torch.Tensor) -> torch.Tensor:
        img = self.encode_image(batch)
        txt = self.encode_text(batch)
        scale = self.logit_scale.clamp(0.0, math.log(100.0)).exp()
        paired = modality == PAIR
        n = int(paired.sum())
        if n == 0:  # nothing to contrast: 0, still connected to the graph
            return (img.sum() + txt.sum()) * 0.0 * scale
        positive = batch.get("cmcl_positive")
        if positive is None:
            positive = torch.eye(len(img), dtype=torch.bool, device=img.device)
        positive = positive[paired][:, paired]
        extra = extra_row = extra_pos = None
        if "cmcl_extra_ids" in batch and batch["cmcl_extra_ids"].shape[0]:
            new_row = torch.cumsum(paired.long(), 0) - 1  # old row → row among the paired
            keep = paired[batch["cmcl_extra_row"]]
            e_ids, e_mask = batch["cmcl_extra_ids"][keep], batch["cmcl_extra_mask"][keep]
            if e_ids.shape[0]:
                t, tm = self._text(e_ids, e_mask)
                extra = self.text_proj(self.encoder(t, attention_mask(tm))[:, 0])
                extra_row = new_row[batch["cmcl_extra_row"][keep]]
                extra_pos = batch["cmcl_extra_positive"][keep]
        return cmcl_loss(img[paired], txt[paired], positive, scale, extra, extra_row, extra_pos)

    # -- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, batch: dict[str, Any], bos_id: int, eos_id: int, max_len: int = 20, beams: int = 1
    ) -> list[list[int]]:
        """Caption ids (without [CLS]/[SEP]) for each row's regions: greedy when `beams` is 1,
        else beam search with length-normalized log-probabilities."""
        b = batch["region_feats"].shape[0]
        if beams <= 1:
            ids = torch.full((b, 1), bos_id, dtype=torch.long, device=batch["region_feats"].device)
            done = torch.zeros(b, dtype=torch.bool, device=ids.device)
            for _ in range(max_len):
                nxt = self.next_token_logits(batch, ids).argmax(-1)
                nxt = nxt.masked_fill(done, eos_id)
                ids = torch.cat([ids, nxt[:, None]], 1)
                done |= nxt == eos_id
                if bool(done.all()):
                    break
            return [_strip(row.tolist(), eos_id) for row in ids[:, 1:]]
        return [self._beam(_row(batch, i), bos_id, eos_id, max_len, beams) for i in range(b)]

    def _beam(
        self, one: dict[str, Any], bos_id: int, eos_id: int, max_len: int, beams: int
    ) -> list[int]:
        device = one["region_feats"].device
        alive = [([bos_id], 0.0)]
        finished: list[tuple[list[int], float]] = []
        for _ in range(max_len):
            ids = torch.tensor([s for s, _ in alive], dtype=torch.long, device=device)
            rep = {k: _repeat(v, len(alive)) for k, v in one.items()}
            logp = torch.log_softmax(self.next_token_logits(rep, ids).float(), -1)
            cand = []
            for k, (seq, score) in enumerate(alive):
                top = torch.topk(logp[k], beams)
                cand += [
                    (seq + [int(t)], score + float(v))
                    for v, t in zip(top.values, top.indices, strict=True)
                ]
            cand.sort(key=lambda c: c[1], reverse=True)
            alive = []
            for rank, (seq, score) in enumerate(cand):
                if seq[-1] != eos_id:
                    alive.append((seq, score))
                elif rank < beams:  # a hypothesis ends only when it ranks among the beams
                    finished.append((seq, score))
                if len(alive) == beams:
                    break
            if not alive:
                break
            # Stop once `beams` captions have ended and none still growing scores better.
            if len(finished) >= beams and max(map(_per_token, finished)) >= max(
                map(_per_token, alive)
            ):
                break
        best = max(finished + alive, key=_per_token)
        return _strip(best[0][1:], eos_id)


def _original_ids(batch: dict[str, Any]) -> torch.Tensor:
    """The caption ids before MLM masking: masked positions carry the original in mlm_labels."""
    ids = batch["input_ids"]
    labels = batch.get("mlm_labels")
    return ids if labels is None else torch.where(labels != IGNORE, labels, ids)


def _per_token(hypothesis: tuple[list[int], float]) -> float:
    """Length-normalized log-probability (the start token is not predicted)."""
    seq, score = hypothesis
    return score / max(1, len(seq) - 1)


def _strip(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def _row(batch: dict[str, Any], i: int) -> dict[str, Any]:
    return {
        k: v[i : i + 1]
        for k, v in batch.items()
        if isinstance(v, torch.Tensor) and k.startswith("region_")
    }


def _repeat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.expand(n, *t.shape[1:])
