"""Training throughput of the `uniter` recipe against HF `VisualBertForPreTraining` of the same
size, on the same random batches, in one run; appends a row to bench/results.md.

Both models do the same work per step: MLM on 15% of the tokens + image-text matching on every
batch (VisualBERT's pretraining objective), AdamW, dropout 0.1. UNITER is configured to sum the
two tasks and skip WRA for this comparison; its own paper mix (one task sampled per batch, with
WRA on ITM batches) is measured too and reported on the same row. Steps of the models are
interleaved so a shared machine's load falls on both alike.

    .venv/bin/python bench/bench_train_step.py                 # hidden 256, 4 layers
    .venv/bin/python bench/bench_train_step.py --size base     # the paper's BERT-base size
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from vlforge.train.recipes import build_recipe

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "bench": dict(hidden=256, layers=4, heads=4, mlp=1024),
    "base": dict(hidden=768, layers=12, heads=12, mlp=3072),
}


def make_batches(n: int, b: int, L: int, R: int, D: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, vocab, (b, L), generator=g)
        labels = torch.full((b, L), -100)
        pick = torch.rand(b, L, generator=g) < 0.15
        pick[:, 1] = True
        labels[pick] = ids[pick]
        ids[pick] = 3  # [MASK]
        boxes = torch.rand(b, R, 4, generator=g)
        boxes = torch.cat(
            [boxes[..., :2].minimum(boxes[..., 2:]), boxes[..., :2].maximum(boxes[..., 2:])], -1
        )
        w, h = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        out.append(
            {
                "input_ids": ids,
                "attention_mask": torch.ones(b, L, dtype=torch.long),
                "token_type_ids": torch.zeros(b, L, dtype=torch.long),
                "mlm_labels": labels,
                "region_feats": torch.rand(b, R, D, generator=g),
                "region_feats_target": torch.rand(b, R, D, generator=g),
                "region_boxes": boxes,
                "region_geom": torch.cat(
                    [boxes, w[..., None], h[..., None], (w * h)[..., None]], -1
                ),
                "region_mask": torch.ones(b, R, dtype=torch.long),
                "region_cls_prob": torch.softmax(torch.randn(b, R, 1601, generator=g), -1),
                "mrm_mask": torch.rand(b, R, generator=g) < 0.15,
                "itm_labels": (torch.rand(b, generator=g) < 0.5).long(),
            }
        )
    return out


def visualbert_inputs(batch: dict) -> dict:
    b, L = batch["input_ids"].shape
    R = batch["region_feats"].shape[1]
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "token_type_ids": batch["token_type_ids"],
        "visual_embeds": batch["region_feats"],
        "visual_attention_mask": batch["region_mask"],
        "visual_token_type_ids": torch.ones(b, R, dtype=torch.long),
        # VisualBERT predicts over [text; image]: the image part is never a target.
        "labels": torch.cat([batch["mlm_labels"], torch.full((b, R), -100)], 1),
        "sentence_image_labels": batch["itm_labels"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="bench")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--text-len", type=int, default=24)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--region-dim", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    # One thread by default: on a shared 2-core machine OpenMP threads that spin while another
    # job holds a core make step times erratic; both models always get the same count.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import VisualBertConfig, VisualBertForPreTraining

    dims = SIZES[args.size]
    torch.manual_seed(0)
    shared = dict(region_dim=args.region_dim, num_region_classes=1601, **dims)
    uniter = build_recipe(
        "uniter", "base", args.vocab, tasks={"mlm": 1.0, "itm": 1.0}, task_mode="sum",
        ot_weight=0.0, **shared,
    )  # fmt: skip
    paper = build_recipe("uniter", "base", args.vocab, **shared)
    hf = VisualBertForPreTraining(
        VisualBertConfig(
            vocab_size=args.vocab,
            hidden_size=dims["hidden"],
            num_hidden_layers=dims["layers"],
            num_attention_heads=dims["heads"],
            intermediate_size=dims["mlp"],
            visual_embedding_dim=args.region_dim,
        )  # fmt: skip
    )
    batches = make_batches(
        4, args.batch, args.text_len, args.regions, args.region_dim, args.vocab, 0
    )
    tasks = sorted(paper.tasks)

    def step_ours(model, batch):
        return model(batch)["loss"]

    def step_hf(model, batch):
        return model(**visualbert_inputs(batch)).loss

    runs = {
        "uniter": (uniter, step_ours, lambda i: batches[i % 4]),
        "uniter_paper_mix": (
            paper,
            step_ours,
            lambda i: batches[i % 4] | {"task": tasks[i % len(tasks)]},
        ),
        "visualbert": (hf, step_hf, lambda i: batches[i % 4]),
    }
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, (m, _, _) in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.warmup + args.steps):
        for name, (model, step, batch_of) in runs.items():
            model.train()
            t0 = time.perf_counter()
            opts[name].zero_grad(set_to_none=True)
            step(model, batch_of(i)).backward()
            opts[name].step()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    # Median step time: robust to other jobs' bursts on a shared machine.
    rate = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = rate["uniter"] / rate["visualbert"]
    setup = (
        f"{args.size}: hidden {dims['hidden']}, {dims['layers']} layers; batch {args.batch}, "
        f"{args.text_len} tokens + {args.regions} regions × {args.region_dim}-d, vocab {args.vocab}; "
        f"MLM+ITM every step, AdamW; {args.threads} thread(s); median of {args.steps} steps"
    )
    for k, v in rate.items():
        print(f"{k:18s} {v:8.1f} samples/s")
    print(f"ratio uniter / visualbert = {ratio:.2f}x")
    load = os.getloadavg()[0]
    machine = (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load {load:.1f}"
    )
    line = (
        f"| {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC | {machine} | train step: uniter vs "
        f"VisualBertForPreTraining | {setup} | uniter {rate['uniter']:.1f} samples/s (paper task "
        f"mix {rate['uniter_paper_mix']:.1f}) | VisualBERT {rate['visualbert']:.1f} samples/s | "
        f"{ratio:.2f}x |"
    )
    if not args.no_write:
        results = ROOT / "bench" / "results.md"
        if not results.exists():
            results.write_text(
                "# Benchmarks\n\n| date | machine | bench | setup | ours | peer | ratio |\n"
                "|---|---|---|---|---|---|---|\n"
            )
        with results.open("a") as handle:
            handle.write(line + "\n")
    print(json.dumps({"samples_per_s": rate, "ratio": ratio}))


if __name__ == "__main__":
    main()
