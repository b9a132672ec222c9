"""`vlforge generate --recipe unimo`: captions for the images of --shards from a trained UNIMO run.

Decoding uses the recipe's seq2seq mask (the regions attend among themselves, each caption token
to the regions and the tokens before it), greedily or by beam search (--n beams). Writes
DIR/captions.jsonl (key, generated caption, reference caption per image) and DIR/summary.json,
and prints a one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from vlforge.errors import UserError
from vlforge.train.generators import register_generator

DEFAULT_MAX_LEN = 20
BATCH = 32


def _words(text: str) -> list[str]:
    return text.lower().split()


def _token_f1(hyp: str, ref: str) -> float:
    """Bag-of-words F1 between a generated and a reference caption (a quick summary figure)."""
    h, r = _words(hyp), _words(ref)
    common = sum(min(h.count(w), r.count(w)) for w in set(h))
    if not h or not r or not common:
        return 0.0
    p, q = common / len(h), common / len(r)
    return 2 * p * q / (p + q)


def _write_atomically(path: Path, text: str) -> None:
    # Nothing half-written is left behind: the file appears whole or not at all.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@register_generator("unimo")
def generate_captions(args: argparse.Namespace) -> int:
    """Caption every image of --shards (at most --limit) with the run at --ckpt."""
    from vlforge.train.collate import Assembler
    from vlforge.train.evaluate import load_samples
    from vlforge.train.trainer import load_for_eval

    if not args.shards:
        raise UserError("unimo captions images: give --shards")
    if args.captions or args.clip_ckpt:
        raise UserError("--captions and --clip-ckpt are for image generators; unimo takes --shards")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, spec = load_for_eval(args.ckpt, str(device))
    if not callable(getattr(model, "generate", None)) or getattr(model, "name", "") != "unimo":
        raise UserError(f"{args.ckpt} is a {getattr(model, 'name', '?')} run, not a unimo run")
    if tok.cls_id is None or tok.sep_id is None:
        raise UserError("the run's tokenizer has no [CLS]/[SEP] tokens to start and end captions")
    torch.manual_seed(args.seed)
    beams = args.n or 1
    max_len = args.max_len or DEFAULT_MAX_LEN
    samples = load_samples(args.shards, spec, args.limit or sys.maxsize)
    if not samples:
        raise UserError(f"no complete samples (image regions and caption) in {args.shards}")
    # Plain batches: no masking, no data mixing (the hook mixes only the training task set).
    plain = Assembler(replace(spec, tasks={}, task_mode="sum"), tok)
    rows = []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start : start + BATCH]
        batch = plain(chunk, np.random.default_rng([args.seed, start]))
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        ids = model.generate(batch, tok.cls_id, tok.sep_id, max_len=max_len, beams=beams)
        for sample, caption in zip(chunk, ids, strict=True):
            rows.append(
                {
                    "key": sample["__key__"],
                    "caption": tok.decode(caption),
                    "reference": sample["txt"],
                }
            )
        sys.stderr.write(f"generate: {len(rows)}/{len(samples)} images\n")
    exact = sum(_words(r["caption"]) == _words(r["reference"]) for r in rows)
    f1 = float(np.mean([_token_f1(r["caption"], r["reference"]) for r in rows]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomically(out / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "images": len(rows),
        "exact_match": exact,
        "token_f1": round(f1, 4),
        "decoding": "greedy" if beams == 1 else f"beam {beams}",
        "max_len": max_len,
    }
    _write_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(
        f"captioned {len(rows)} images ({summary['decoding']}, ≤ {max_len} tokens): "
        f"{exact} exact, token F1 {f1:.3f} → {out / 'captions.jsonl'}"
    )
    return 0
