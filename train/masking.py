"""Masking rules of the survey's pretraining tasks, on numpy arrays with an explicit RNG.

- MLM (BERT): select 15% of the non-special tokens; of those 80% → [MASK], 10% → a random token,
  10% kept. Selection per token, per whole word (all pieces of a word together, as ViLT/BERT-wwm),
  or by spans (SpanBERT/InterBERT: geometric lengths over whole words, same 15% budget).
- Regions: select 15%; of those 90% get zeroed features, 10% keep them (ViLBERT/ImageBERT).
  Recipes declare their paper's split in `masking_defaults`: UNITER zeroes all of them (a kept
  region would let feature regression copy its input), LXMERT zeroes 80%, replaces 10% by a
  random region feature of the batch (its `random_feat`) and keeps 10%.
  Overlap-aware (UNIMO/InterBERT): a region whose IoU with a selected one is ≥ 0.3 is masked too,
  so the model cannot copy the answer from a near-duplicate box.
- Conditional masking (UNITER): one modality per sample, the other left whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100
MLM_MODES = ("token", "word", "span")


@dataclass(frozen=True)
class MaskingConfig:
    mlm_prob: float = 0.15
    mlm_mode: str = "token"  # token | word | span
    mask_frac: float = 0.8  # of selected tokens → [MASK]
    random_frac: float = 0.1  # of selected tokens → random token (the rest are kept)
    span_p: float = 0.2  # geometric parameter of span lengths (SpanBERT)
    span_max: int = 10
    region_prob: float = 0.15
    region_zero_frac: float = 0.9  # of selected regions → zeroed features
    region_random_frac: float = 0.0  # of selected regions → another region's features (LXMERT)
    overlap_iou: float = 0.3
    itm_neg_ratio: float = 0.5  # fraction of ITM pairs that are negatives
    hard_neg_ratio: float = 0.0  # of negatives, taken from mine.json when the sample has them
    itr_negatives: int = 3  # other captions ranked against each image in a ranking ("itr") group
    itm_image_swap: float = 0.5  # of random negatives, the image is replaced instead of the text
    # Random negatives donated by a matched row of the same batch: a caption swap shows a row's
    # own image under a matched row's caption, an image swap its own caption over a matched row's
    # image, so whatever ITM reads off one modality alone cancels between the two rows and only
    # the interaction is rewarded; each matched row donates to one negative, so the share of
    # negatives is exactly `itm_neg_ratio`. Measured on the demo world (UNITER-small, ITM alone
    # on every batch of 32, lr 1e-3, cosine): with independent negatives the ITM loss sat at
    # ln 2 through step 300 for 3 of 3 seeds and through 600 for 1 of 3; paired, it left ln 2
    # by step 300-400, and held-out ITM accuracy / R@1 after 2000 steps was 0.83 / 0.15.
    # On by default: it keeps each recipe's kind of negative (VisualBERT's caption swaps,
    # ImageBERT's both), only the donor is chosen; off gives independent random donors.
    itm_paired: bool = True
    masked_only_matched: bool = True  # masked losses only on matched pairs (UNITER, ImageBERT)


def _select_tokens(
    word_ids: list[int | None], n: int, rng: np.random.Generator, cfg: MaskingConfig
) -> np.ndarray:
    """Boolean mask over positions: the tokens chosen for prediction."""
    words = np.array([-1 if w is None else w for w in word_ids[:n]], dtype=np.int64)
    candidate = words >= 0
    if cfg.mlm_mode == "token":
        return candidate & (rng.random(n) < cfg.mlm_prob)
    uniq = np.unique(words[candidate])
    if cfg.mlm_mode == "word":
        chosen = uniq[rng.random(len(uniq)) < cfg.mlm_prob]
        return np.isin(words, chosen) & candidate
    if cfg.mlm_mode != "span":
        raise ValueError(f"mlm mode must be one of {MLM_MODES}, not {cfg.mlm_mode!r}")
    # Span masking: a budget of tokens ~ Binomial(n, p) (so the rate is p in expectation), filled
    # with spans of whole words whose lengths (in words) are geometric, clipped at span_max.
    budget = int(rng.binomial(int(candidate.sum()), cfg.mlm_prob))
    pieces = {int(w): int((words == w).sum()) for w in uniq}
    chosen: set[int] = set()
    taken, tries = 0, 0
    while taken < budget and len(chosen) < len(uniq) and tries < 8 * len(uniq):
        tries += 1
        span = min(int(rng.geometric(cfg.span_p)), cfg.span_max)
        start = int(rng.integers(len(uniq)))
        for w in (int(x) for x in uniq[start : start + span]):
            if taken >= budget:
                break
            if w in chosen:
                continue
            left = budget - taken
            # A word longer than what is left of the budget joins with probability left/pieces,
            # so the expected number of masked tokens is the budget, not above it.
            if pieces[w] > left and rng.random() >= left / pieces[w]:
                taken = budget
                break
            chosen.add(w)
            taken += pieces[w]
    selected = np.isin(words, np.array(sorted(chosen), dtype=np.int64))
    return selected & candidate


def mask_tokens(
    ids: np.ndarray,
    word_ids: list[int | None],
    rng: np.random.Generator,
    cfg: MaskingConfig,
    mask_id: int,
    random_ids: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One sequence → (input ids after masking, labels with IGNORE where nothing is predicted).

    `word_ids` is None on special tokens (never masked); `random_ids` are the ids a 10% random
    replacement draws from (the vocabulary less its special tokens)."""
    n = len(ids)
    selected = _select_tokens(word_ids, n, rng, cfg)
    labels = np.where(selected, ids, IGNORE).astype(np.int64)
    out = ids.copy()
    u = rng.random(n)
    to_mask = selected & (u < cfg.mask_frac)
    to_random = selected & (u >= cfg.mask_frac) & (u < cfg.mask_frac + cfg.random_frac)
    out[to_mask] = mask_id
    out[to_random] = random_ids[rng.integers(len(random_ids), size=int(to_random.sum()))]
    return out, labels


def box_iou(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes (N×4) → N×N."""
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    iw = np.clip(np.minimum(x2[:, None], x2[None]) - np.maximum(x1[:, None], x1[None]), 0, None)
    ih = np.clip(np.minimum(y2[:, None], y2[None]) - np.maximum(y1[:, None], y1[None]), 0, None)
    inter = iw * ih
    union = area[:, None] + area[None] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def select_regions(
    boxes: np.ndarray, rng: np.random.Generator, cfg: MaskingConfig, overlap: bool
) -> np.ndarray:
    """Boolean over regions: those masked. With `overlap`, boxes overlapping a selected one by
    IoU ≥ cfg.overlap_iou join it."""
    n = len(boxes)
    selected = rng.random(n) < cfg.region_prob
    if overlap and selected.any():
        selected = selected | (box_iou(boxes)[selected] >= cfg.overlap_iou).any(axis=0)
    return selected


def mask_regions(
    feats: np.ndarray,
    selected: np.ndarray,
    rng: np.random.Generator,
    cfg: MaskingConfig,
    pool: np.ndarray | None = None,
) -> np.ndarray:
    """Features with `region_zero_frac` of the selected regions zeroed, `region_random_frac`
    replaced by a row drawn from `pool` (the batch's region features; default `feats`), the rest
    kept as they were. No draw is made for replacements when their share is 0, so recipes
    without them see the same random stream as before they existed."""
    u = rng.random(len(selected))
    zero = selected & (u < cfg.region_zero_frac)
    out = feats.copy()
    out[zero] = 0
    if cfg.region_random_frac > 0:
        swap = selected & ~zero & (u < cfg.region_zero_frac + cfg.region_random_frac)
        pool = feats if pool is None or len(pool) == 0 else pool
        out[swap] = pool[rng.integers(len(pool), size=int(swap.sum()))]
    return out


def conditional_choice(rng: np.random.Generator, n: int) -> np.ndarray:
    """Per sample, which modality conditional masking masks: True = text, False = regions."""
    return rng.random(n) < 0.5
