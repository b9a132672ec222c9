"""Evaluation of a trained recipe on held-out shards.

- Retrieval, image→text and text→image R@1/5/10 over the first N held-out pairs (N recorded):
  dual encoders score by cosine of `encode_image`/`encode_text`; single-stream recipes by
  `itm_score` on all N×N pairs. Ties rank the true item last (a constant model scores 0, not 1),
  and a candidate whose caption is the very same text as the truth's counts as correct (template
  captions repeat; no model can tell identical strings apart).
- ITM accuracy (`itm_score` > 0 ⇔ matched) on 50% random-pair negatives.
- MLM accuracy (argmax of `mlm_logits` on the masked positions).
- Zero-shot classification (dual encoders): prompts "a photo of a {label}"; the truth is the
  sample json's field of the label set's name (a label, or a list whose labels all agree), else
  the one label its caption names; samples with no single truth are left out (n recorded).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from vlforge.train.collate import Assembler, BatchSpec
from vlforge.train.data import SlotStream, StreamConfig, expand_shards
from vlforge.train.decode import decode_sample
from vlforge.train.masking import IGNORE, MaskingConfig
from vlforge.train.tokenizer import TextTokenizer

PROMPT = "a photo of a {label}"


def load_samples(shards: str, spec: BatchSpec, limit: int) -> list[dict[str, Any]]:
    """The first `limit` complete samples of the shards, in shard order."""
    fields, required = spec.fields()
    cfg = StreamConfig(
        tuple(expand_shards(shards)),
        order="once",
        shuffle_shards=False,
        shuffle_buffer=1,
        units_per_chunk=1,
    )
    out: list[dict[str, Any]] = []
    for raw, _ in SlotStream(cfg, 0, 1).iterate():
        if all(f in raw for f in required):
            try:
                out.append(decode_sample(raw, fields))
            except Exception:  # a corrupt held-out sample is skipped, as in training
                continue
        if len(out) >= limit:
            break
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _has(model: nn.Module, name: str) -> bool:
    return callable(getattr(model, name, None))


def recall_at(scores: np.ndarray, positive: np.ndarray, ks=(1, 5, 10)) -> dict[int, float]:
    """scores Q×N, positive Q×N bool → R@k: share of queries with a positive in the top k.
    Ties are broken against the positives (pessimistic)."""
    best_pos = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    # Rank of the best positive = negatives scoring at least as high.
    rank = ((scores >= best_pos) & ~positive).sum(axis=1)
    return {k: float((rank < k).mean()) for k in ks}


class Evaluator:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        spec: BatchSpec,
        device: torch.device | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ):
        self.model, self.tok, self.bs, self.seed = model, tokenizer, batch_size, seed
        self.device = device or next(model.parameters()).device
        # Evaluation batches: no masking and no negatives unless a metric asks for them.
        self.spec = replace(spec, tasks={}, task_mode="sum")
        self.plain = Assembler(self.spec, tokenizer)

    def _batch(self, samples: list[dict], assembler: Assembler | None = None, i: int = 0) -> dict:
        rng = np.random.default_rng([self.seed, i])
        return _to((assembler or self.plain)(samples, rng), self.device)

    # -- retrieval ---------------------------------------------------------------------------

    def similarity(self, samples: list[dict]) -> np.ndarray:
        """N×N scores, rows images, columns captions."""
        m = self.model
        if _has(m, "encode_image") and _has(m, "encode_text"):
            try:
                img, txt = [], []
                for i, chunk in enumerate(_chunks(samples, self.bs)):
                    b = self._batch(chunk, i=i)
                    img.append(torch.nn.functional.normalize(m.encode_image(b).float(), dim=-1))
                    txt.append(torch.nn.functional.normalize(m.encode_text(b).float(), dim=-1))
                return (torch.cat(img) @ torch.cat(txt).T).cpu().numpy()
            except NotImplementedError:
                pass
        if not _has(m, "itm_score"):
            raise ValueError("the recipe has neither encode_image/encode_text nor itm_score")
        n = len(samples)
        pairs = [(i, j) for i in range(n) for j in range(n)]
        scores = np.zeros((n, n), dtype=np.float64)
        for c, chunk in enumerate(_chunks(pairs, self.bs)):
            rows = [{**samples[i], "txt": samples[j]["txt"]} for i, j in chunk]
            s = m.itm_score(self._batch(rows, i=c)).float().cpu().numpy()
            for (i, j), v in zip(chunk, s, strict=True):
                scores[i, j] = v
        return scores

    def retrieval(self, samples: list[dict]) -> dict[str, float]:
        scores = self.similarity(samples)
        norm = [" ".join(s["txt"].lower().split()) for s in samples]
        same = np.array([[a == b for b in norm] for a in norm])
        i2t = recall_at(scores, same)
        t2i = recall_at(scores.T, same)
        out: dict[str, float] = {"retrieval_n": len(samples)}
        for k in (1, 5, 10):
            out[f"retrieval_i2t_r{k}"] = i2t[k]
            out[f"retrieval_t2i_r{k}"] = t2i[k]
        out["retrieval_duplicate_captions"] = int(len(norm) - len(set(norm)))
        return out

    def retrieval_folds(self, samples: list[dict], n: int, folds: int) -> dict[str, Any]:
        """retrieval() on each full pool of n samples (at most `folds`), recalls averaged."""
        pools = [samples[i : i + n] for i in range(0, n * folds, n)]
        pools = [p for p in pools if len(p) == n] or [samples[:n]]
        each = [self.retrieval(p) for p in pools]
        out: dict[str, Any] = {k: float(np.mean([e[k] for e in each])) for k in each[0]}
        out["retrieval_n"] = len(pools[0])
        out["retrieval_folds"] = len(pools)
        out["retrieval_duplicate_captions"] = sum(e["retrieval_duplicate_captions"] for e in each)
        for direction in ("i2t", "t2i"):  # the spread behind the mean R@1
            out[f"retrieval_{direction}_r1_folds"] = [e[f"retrieval_{direction}_r1"] for e in each]
        return out

    # -- ITM and MLM -------------------------------------------------------------------------

    def itm_accuracy(self, samples: list[dict]) -> dict[str, float]:
        masking = MaskingConfig(itm_neg_ratio=0.5, hard_neg_ratio=0.0)
        asm = Assembler(replace(self.spec, tasks={"itm": 1.0}, masking=masking), self.tok)
        right = total = 0
        for i, chunk in enumerate(_chunks(samples, self.bs)):
            if len(chunk) < 2:
                continue
            b = self._batch(chunk, asm, i)
            pred = (self.model.itm_score(b) > 0).long()
            right += int((pred == b["itm_labels"]).sum())
            total += len(chunk)
        return {"itm_accuracy": right / max(1, total), "itm_n": total}

    def mlm_accuracy(self, samples: list[dict]) -> dict[str, float]:
        asm = Assembler(replace(self.spec, tasks={"mlm": 1.0}), self.tok)
        right = total = 0
        for i, chunk in enumerate(_chunks(samples, self.bs)):
            b = self._batch(chunk, asm, i)
            logits = self.model.mlm_logits(b)
            at = b["mlm_labels"] != IGNORE
            right += int((logits.argmax(-1)[at] == b["mlm_labels"][at]).sum())
            total += int(at.sum())
        return {"mlm_accuracy": right / max(1, total), "mlm_n": total}

    # -- zero-shot ---------------------------------------------------------------------------

    def zeroshot(self, samples: list[dict], name: str, labels: list[str]) -> dict[str, float]:
        truth = [_label_of(s, name, labels) for s in samples]
        keep = [(s, t) for s, t in zip(samples, truth, strict=True) if t is not None]
        if not keep:
            return {f"zeroshot_{name}_n": 0}
        prompts = [{"txt": PROMPT.format(label=lab)} for lab in labels]
        text = _to(
            self.plain.text(
                [p["txt"] for p in prompts],
                np.zeros(len(prompts), dtype=bool),
                np.random.default_rng(0),
            ),
            self.device,
        )
        t = torch.nn.functional.normalize(self.model.encode_text(text).float(), dim=-1)
        right = 0
        for i, chunk in enumerate(_chunks(keep, self.bs)):
            b = self._batch([s for s, _ in chunk], i=i)
            v = torch.nn.functional.normalize(self.model.encode_image(b).float(), dim=-1)
            pred = (v @ t.T).argmax(-1).cpu().tolist()
            right += sum(labels[p] == lab for p, (_, lab) in zip(pred, chunk, strict=True))
        return {f"zeroshot_{name}_acc": right / len(keep), f"zeroshot_{name}_n": len(keep)}


def _label_of(sample: dict, name: str, labels: list[str]) -> str | None:
    meta = sample.get("json") or {}
    value = meta.get(name)
    if isinstance(value, str) and value in labels:
        return value
    if isinstance(value, list):  # e.g. the world's "shapes": one label when all objects agree
        named = {v for v in value if v in labels}
        return named.pop() if len(named) == 1 else None
    words = set(re.findall(r"[a-z]+", sample["txt"].lower()))
    named = [lab for lab in labels if lab.lower() in words]
    return named[0] if len(named) == 1 else None


def evaluate(
    model: nn.Module,
    tokenizer: TextTokenizer,
    spec: BatchSpec,
    shards: str,
    n_candidates: int = 100,
    n_samples: int = 500,
    n_folds: int = 1,
    zeroshot: dict[str, list[str]] | None = None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every metric the recipe supports: a flat dict of numbers (and the per-fold R@1 lists).

    Retrieval ranks among `n_candidates` per query; with `n_folds` > 1 the held-out samples are
    cut into that many disjoint pools of n_candidates and the recalls averaged (as COCO's "1K
    test" averages 5 folds), which narrows the figure's noise without making the task harder.
    """
    samples = load_samples(shards, spec, max(n_candidates * n_folds, n_samples))
    if not samples:
        raise ValueError(f"no complete samples in {shards}")
    ev = Evaluator(model, tokenizer, spec, batch_size=batch_size)
    was_training = model.training
    model.eval()
    out: dict[str, Any] = {}
    # Evaluation must not move the training RNG: a resumed run would diverge otherwise.
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        steps: list[tuple[str, Callable[[], dict]]] = []
        # Retrieval needs a pair score; a pixels-only or generative recipe (dvae, dalle) has none.
        if _has(model, "itm_score") or (_has(model, "encode_image") and _has(model, "encode_text")):
            steps.append(("retrieval", lambda: ev.retrieval_folds(samples, n_candidates, n_folds)))
        if _has(model, "itm_score"):
            steps.append(("itm", lambda: ev.itm_accuracy(samples)))
        if _has(model, "mlm_logits") and "text" in spec.inputs:
            steps.append(("mlm", lambda: ev.mlm_accuracy(samples)))
        if _has(model, "extra_metrics"):
            # A recipe's own figures (QA accuracy, reconstruction error, …): it gets the
            # evaluator (its batches, tokenizer, device) and the held-out samples.
            steps.append(("recipe metrics", lambda: model.extra_metrics(ev, samples)))
        if zeroshot and _has(model, "encode_image") and _has(model, "encode_text"):
            for name, labels in zeroshot.items():
                steps.append(
                    (f"zeroshot {name}", lambda n=name, lab=labels: ev.zeroshot(samples, n, lab))
                )
        for what, run in steps:
            if progress:
                progress(what)
            try:
                out.update(run())
            except NotImplementedError:
                continue
    model.train(was_training)
    return out
