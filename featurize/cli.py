"""`vlforge featurize`: region features for shards, or `featurize train-detector` for the demo world.

vlforge featurize --in SHARDS --out DIR --weights PATH [--batch-size N] [Beam flags]
vlforge featurize train-detector --out PATH [--n-train N --epochs E --seed S]
"""

from __future__ import annotations

import argparse
import json
import sys

from vlforge.errors import UserError

ACTIONS = ("run", "train-detector")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "featurize",
        help="detector regions, features and object tags for WebDataset shards (Apache Beam)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # A positional action with a default keeps `vlforge featurize --in X --out Y` the main form.
    # Not `choices=`: the value of a Beam flag given as `--runner DaskRunner` lands here (argparse
    # does not know --runner takes one) and `run` hands it back to Beam.
    p.add_argument("action", nargs="?", default="run", help="run (default) or train-detector")
    p.add_argument("--out", help="output directory (run) or weights file (train-detector)")
    g = p.add_argument_group("run")
    g.add_argument("--in", dest="inp", help="shard directory, glob or .tar path")
    g.add_argument(
        "--weights", help="weights written by train-detector, or torchvision:resnet50_fpn"
    )
    g.add_argument("--batch-size", type=int, default=8, help="images per detector forward")
    g.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (scale with --workers)"
    )
    g.add_argument("--workers", type=int, default=1, help="DirectRunner workers")
    g.add_argument(
        "--worker-mode",
        choices=("threads", "processes"),
        default="threads",
        help="DirectRunner workers as threads of this process (default: detection releases the "
        "GIL, and no worker has to start Python and import torch) or as child processes",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where each worker runs the detector: auto (its GPU when torch sees one, else the "
        "CPU; decided on the worker), cpu, or cuda",
    )
    g.add_argument(
        "--no-optimize",
        dest="optimize",
        action="store_false",
        help="run the detector exactly as loaded (default: BN folded, channels-last convs and a "
        "gather RoIAlign, once per worker; same outputs to float16, ~1.5x faster on CPU)",
    )
    t = p.add_argument_group("train-detector")
    t.add_argument("--n-train", type=int, default=1600, help="world images to train on")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--train-batch-size", type=int, default=8)
    t.add_argument(
        "--train-threads",
        type=int,
        default=1,
        help="fixed torch thread count (1: no OpenMP barrier stalls on a shared CPU)",
    )
    t.add_argument("--eval-n", type=int, default=200, help="held-out world images for mAP")
    t.add_argument("--eval-seed", type=int, default=None, help="default: seed + 1000")
    t.add_argument(
        "--no-attributes",
        dest="attributes",
        action="store_false",
        help="train without the colour/size attribute head (class-only features)",
    )
    p.set_defaults(func=run, accepts_extra_args=True)


def _reclaim_flag_value(args: argparse.Namespace) -> None:
    """Give a Beam flag back the value the optional `action` positional took from it.

    `featurize --in X --runner DaskRunner ...`: --runner is unknown to us, so argparse takes
    DaskRunner for the first bare word, the action. It belongs after the first unknown flag
    that has no `=value` of its own.
    """
    if args.action in ACTIONS:
        return
    extra = list(getattr(args, "extra_args", []))
    for i, arg in enumerate(extra):
        if arg.startswith("--") and "=" not in arg:
            extra.insert(i + 1, args.action)
            args.extra_args, args.action = extra, "run"
            return
    raise UserError(f"unknown action {args.action!r} (choose from {', '.join(ACTIONS)})")


def run(args: argparse.Namespace) -> int:
    _reclaim_flag_value(args)
    if args.action == "train-detector":
        return _train(args)
    return _featurize(args)


def _featurize(args: argparse.Namespace) -> int:
    if not args.inp or not args.out:
        raise UserError("featurize needs --in SHARDS and --out DIR")
    if not args.weights:
        raise UserError(
            "featurize needs --weights (train one with `vlforge featurize train-detector`)"
        )
    from vlforge.featurize.beam_stage import featurize_shards, use_worker_threads
    from vlforge.pipeline.beam_options import build_options

    options = build_options(list(getattr(args, "extra_args", [])), args.workers)
    if args.worker_mode == "threads":
        options = use_worker_threads(options)
    manifest = featurize_shards(
        args.inp,
        args.out,
        args.weights,
        batch_size=args.batch_size,
        threads=args.threads,
        options=options,
        optimize=args.optimize,
        device=args.device,
    )
    counts = manifest["counts"]
    sys.stdout.write(
        f"featurized {counts['images']} images in {counts['shards']} shards: {counts['regions']} regions, "
        f"{counts['empty_with_reason']} empty; {manifest['timings_s']['total']:.1f}s → {args.out}\n"
    )
    return 0


def _train(args: argparse.Namespace) -> int:
    if getattr(args, "extra_args", None):
        raise UserError(f"unrecognized arguments: {' '.join(args.extra_args)}")
    if not args.out:
        raise UserError(
            "train-detector needs --out PATH (the weights file; metadata goes to PATH.json)"
        )
    if args.n_train < 1 or args.epochs < 1:
        raise UserError("--n-train and --epochs must be positive")
    from vlforge.featurize.train_detector import train_detector

    def log(line: str) -> None:
        sys.stderr.write(line + "\n")

    _, report = train_detector(
        args.out,
        n_train=args.n_train,
        epochs=args.epochs,
        seed=args.seed,
        batch_size=args.train_batch_size,
        lr=args.lr,
        threads=args.train_threads,
        eval_n=args.eval_n,
        eval_seed=args.eval_seed,
        with_attributes=args.attributes,
        log=log,
    )
    sys.stdout.write(json.dumps({"out": args.out, **report["eval"], "train_s": report["train_s"]}))
    sys.stdout.write("\n")
    return 0
