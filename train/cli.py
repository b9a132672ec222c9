"""`vlforge train`, `vlforge eval`, `vlforge generate` and `vlforge tokenizer train` command lines."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from vlforge.errors import UserError
from vlforge.train.masking import MLM_MODES, MaskingConfig

_TRAIN_PARSER: argparse.ArgumentParser | None = None


def _override(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE parsed as JSON when it parses (numbers, booleans, lists)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    key, value = text.split("=", 1)
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _labels(text: str) -> tuple[str, list[str]]:
    """NAME=a,b,c: a label set whose truth is the sample json's NAME field."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=label,label,…, not {text!r}")
    name, labels = text.split("=", 1)
    return name.strip(), [x.strip() for x in labels.split(",") if x.strip()]


def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--tokenizer", default=None, help="a tokenizer.json (default: train one)")
    g.add_argument("--vocab-size", type=int, default=8000, help="of a tokenizer trained here")
    g.add_argument("--max-text-len", type=int, default=40)
    g.add_argument("--max-regions", type=int, default=100)
    g.add_argument("--image-size", type=int, default=None, help="pixels (default: the recipe's)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    global _TRAIN_PARSER
    p = subparsers.add_parser(
        "train",
        help="pretrain a recipe on WebDataset shards (single process, torchrun or --nproc)",
        description="Pretrain a recipe on WebDataset shards. Runs in one process, under torchrun, "
        "or as --nproc local ranks.",
    )
    _TRAIN_PARSER = p
    p.add_argument("--recipe", required=True, help="uniter, vilbert, clip, …")
    p.add_argument("--size", default="small", help="model size from the recipe's config")
    p.add_argument("--shards", required=True, help="shard pattern/URLs (braces, pipe:, s3://, …)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE", help="recipe config override (repeatable)")  # fmt: skip
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument(
        "--total-steps", type=int, default=None, help="schedule length (default --steps)"
    )
    o.add_argument("--batch-size", type=int, default=32, help="global, over ranks and accumulation")
    o.add_argument("--grad-accum", type=int, default=1)
    o.add_argument("--lr", type=float, default=1e-4)
    o.add_argument("--weight-decay", type=float, default=0.01)
    o.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    o.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    o.add_argument("--min-lr-ratio", type=float, default=0.0)
    o.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm (0: off)")
    o.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _data_flags(p)
    d = p.add_argument_group("loader")
    d.add_argument("--workers", type=int, default=2, help="loader processes per rank")
    d.add_argument("--shard-order", default="epochs", choices=["epochs", "resampled"])
    d.add_argument("--shuffle-buffer", type=int, default=1000)
    d.add_argument("--units-per-chunk", type=int, default=4, help="shards read interleaved")
    d.add_argument(
        "--data-streams",
        type=int,
        default=0,
        help="canonical streams a global batch is drawn from (0: its largest divisor ≤ 32); "
        "the data order depends on it, never on --nproc or --workers",
    )
    m = p.add_argument_group("masking and pairs")
    m.add_argument("--mlm-prob", type=float, default=0.15)
    m.add_argument("--mlm-mode", default="token", choices=list(MLM_MODES))
    m.add_argument("--region-prob", type=float, default=0.15)
    m.add_argument("--overlap-iou", type=float, default=0.3)
    m.add_argument("--itm-neg-ratio", type=float, default=0.5)
    m.add_argument("--hard-neg-ratio", type=float, default=0.0, help="of negatives, from mine.json")
    m.add_argument(
        "--itr-negatives", type=int, default=3, help="other captions per image in a ranking group"
    )
    r = p.add_argument_group("run")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--save-every", type=int, default=0, help="steps (0: at the end)")
    r.add_argument("--keep-checkpoints", type=int, default=2)
    r.add_argument("--eval-shards", default=None, help="held-out shards evaluated during training")
    r.add_argument("--eval-every", type=int, default=0)
    r.add_argument("--eval-candidates", type=int, default=100)
    r.add_argument("--resume", action="store_true", help="continue from DIR's latest checkpoint")
    r.add_argument("--nproc", type=int, default=1, help="launch this many local ranks")
    r.add_argument("--no-progress", action="store_true")
    s = p.add_argument_group("scaling (train/parallel/)")
    s.add_argument("--zero", type=int, default=0, help="ZeRO stage 0-3 (0: DDP)")
    s.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (attention, FFN)")
    s.add_argument("--moe", default=None, help="FFNs → MoE layers: topk, gshard or switch")
    s.add_argument("--experts", type=int, default=8, help="experts per MoE layer")
    s.add_argument("--top-k", type=int, default=None, help="experts per token (--moe topk)")
    s.add_argument("--capacity-factor", type=float, default=None, help="expert capacity factor")
    s.add_argument("--moe-every", type=int, default=1, help="every n-th FFN becomes MoE")
    s.add_argument("--ep", type=int, default=1, help="expert-parallel ranks")
    p.set_defaults(func=run_train)

    e = subparsers.add_parser("eval", help="retrieval, ITM, MLM and zero-shot metrics of a run")
    e.add_argument("--ckpt", required=True, help="run directory (its latest) or a checkpoint")
    e.add_argument("--shards", required=True, help="held-out shards")
    e.add_argument("--candidates", type=int, default=100, help="N for retrieval R@k")
    e.add_argument(
        "--folds", type=int, default=1, help="disjoint pools of N for retrieval, recalls averaged"
    )
    e.add_argument("--samples", type=int, default=500, help="for ITM and MLM accuracy")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--zeroshot", type=_labels, action="append", default=[], metavar="NAME=a,b,…",
                   help="zero-shot label set; truth from the sample json's NAME")  # fmt: skip
    e.add_argument("--out", default=None, help="write the metrics here as JSON")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=run_eval)

    t = subparsers.add_parser("tokenizer", help="train a WordPiece tokenizer on shard captions")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train on the captions of --shards")
    tt.add_argument("--shards", required=True)
    tt.add_argument("--out", required=True, help="tokenizer.json to write")
    tt.add_argument("--vocab-size", type=int, default=8000)
    tt.add_argument("--limit", type=int, default=None, help="at most this many captions")
    tt.set_defaults(func=run_tokenizer_train)

    g = subparsers.add_parser("generate", help="captions or images from a trained run")
    g.add_argument("--recipe", required=True, help="a recipe with a generator (unimo, dalle, …)")
    g.add_argument("--ckpt", required=True, help="run directory (its latest) or a checkpoint")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--shards", default=None, help="input shards (images to caption)")
    g.add_argument("--captions", default=None, help="input captions, one a line")
    g.add_argument("--n", type=int, default=None, help="candidates/beams (default: generator's)")
    g.add_argument("--clip-ckpt", default=None, help="a clip run to rerank candidates")
    g.add_argument("--max-len", type=int, default=None, help="tokens to generate at most")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--limit", type=int, default=None, help="at most this many inputs")
    g.set_defaults(func=run_generate)


# ---------------------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace):
    from vlforge.train.trainer import TrainConfig

    masking = MaskingConfig(
        mlm_prob=args.mlm_prob,
        mlm_mode=args.mlm_mode,
        region_prob=args.region_prob,
        overlap_iou=args.overlap_iou,
        itm_neg_ratio=args.itm_neg_ratio,
        hard_neg_ratio=args.hard_neg_ratio,
        itr_negatives=args.itr_negatives,
    )
    if args.itr_negatives < 1:
        raise UserError("--itr-negatives must be at least 1")
    for name in ("mlm_prob", "region_prob", "itm_neg_ratio", "hard_neg_ratio", "overlap_iou"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} must be between 0 and 1")
    names = {f.name for f in fields(TrainConfig)} - {"masking", "progress", "overrides"}
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return TrainConfig(
        **kwargs,
        overrides=dict(args.overrides),
        masking=masking,
        progress=not args.no_progress,
    )


def _argv_without_nproc(args: argparse.Namespace) -> list[str]:
    """The `train` command line that produced `args`, less --nproc (each rank runs this)."""
    assert _TRAIN_PARSER is not None
    argv = ["train"]
    for action in _TRAIN_PARSER._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if value else []
        elif action.dest == "overrides":
            for key, v in value:
                argv += [flag, f"{key}={json.dumps(v)}"]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def run_train(args: argparse.Namespace) -> int:
    cfg = _train_config(args)  # validate before launching anything
    if args.nproc > 1:
        import os

        if "WORLD_SIZE" in os.environ:
            raise UserError("--nproc launches ranks itself; do not combine it with torchrun")
        from vlforge.train.distributed import launch_local
        from vlforge.train.parallel import ParallelConfig

        ParallelConfig.of(cfg).check_world(args.nproc)  # e.g. --tp 3 on 2 ranks: one line

        code = launch_local(args.nproc, _argv_without_nproc(args))
        if code:
            raise UserError(f"{args.nproc} ranks were launched and one failed (exit {code})")
        return 0
    from vlforge.train.trainer import run

    summary = run(cfg)
    if summary.get("rank", 0) == 0:
        print(
            f"trained {summary['trained_steps']} steps to step {summary['steps']} in "
            f"{summary['seconds']:.1f} s ({summary['samples_per_s']:.1f} samples/s); "
            f"loss {summary['loss']:.4f}; checkpoint {summary['checkpoint']}"
        )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from vlforge.train.evaluate import evaluate
    from vlforge.train.trainer import load_for_eval

    if args.candidates < 2 or args.folds < 1:
        raise UserError("--candidates must be at least 2 and --folds at least 1")
    model, tok, spec = load_for_eval(args.ckpt, args.device)
    metrics = evaluate(
        model,
        tok,
        spec,
        args.shards,
        n_candidates=args.candidates,
        n_samples=args.samples,
        n_folds=args.folds,
        zeroshot=dict(args.zeroshot),
        batch_size=args.batch_size,
        progress=lambda what: sys.stderr.write(f"eval: {what}\n"),
    )
    text = json.dumps(metrics, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from vlforge.train.generators import run_generate as dispatch

    return dispatch(args)


def run_tokenizer_train(args: argparse.Namespace) -> int:
    from vlforge.train.data import expand_shards
    from vlforge.train.tokenizer import corpus_captions, train_wordpiece

    captions = list(corpus_captions(expand_shards(args.shards), args.limit))
    if not captions:
        raise UserError(f"no captions in {args.shards}")
    tok = train_wordpiece(captions, args.vocab_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    print(f"tokenizer of {tok.vocab_size} tokens from {len(captions)} captions → {args.out}")
    return 0
