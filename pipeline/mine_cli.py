"""`vlforge mine` command line: flags → MineConfig, then a run and its summary."""

from __future__ import annotations

import argparse
import sys

from vlforge.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from vlforge.pipeline.mine_config import MineConfig
    from vlforge.pipeline.neighbour_config import NeighbourConfig

    d, n = MineConfig(), NeighbourConfig()
    p = subparsers.add_parser(
        "mine",
        help="add TF-IDF hard negatives, retrieved positives and scene-graph rewrites to shards",
        description="Read WebDataset shards (after featurize: sg.json, tags.json), write the same "
        "shards to --out with mine.json per sample, a manifest and a summary. Any flag this "
        "command does not know is handed to Beam (e.g. --runner DataflowRunner).",
    )
    p.add_argument("--in", dest="source", required=True, help="shard directory, glob or .tar")
    p.add_argument("--out", required=True, help="output directory (local, gs://, s3://)")
    p.add_argument("--k-negatives", type=int, default=d.k_negatives)
    p.add_argument("--k-positives", type=int, default=d.k_positives)
    p.add_argument("--k-image-positives", type=int, default=d.k_image_positives)
    p.add_argument(
        "--candidates", type=int, default=d.candidates, help="faiss neighbours before rerank"
    )
    p.add_argument(
        "--dup-threshold",
        type=float,
        default=d.dup_threshold,
        help="TF-IDF cosine at/above which captions are near-duplicates (positives, never negatives)",
    )
    p.add_argument("--image-threshold", type=float, default=d.image_threshold)
    p.add_argument("--rewrites-per-kind", type=int, default=d.rewrites_per_kind)
    p.add_argument(
        "--rewrite-kinds", default=",".join(d.rewrite_kinds), help="object,attribute,relation"
    )
    p.add_argument("--dim", type=int, default=d.dim, help="dense search dimensions (SVD)")
    p.add_argument("--ivf-threshold", type=int, default=n.ivf_threshold, help="IVF at/above this")
    p.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n))")
    p.add_argument("--nprobe", type=int, default=n.nprobe)
    p.add_argument(
        "--ivf-storage",
        choices=("fp16", "flat"),
        default=n.storage,
        help="vectors in the IVF lists: float16 (half the memory traffic) or float32",
    )
    p.add_argument("--no-gpu", action="store_true", help="keep faiss on the CPU")
    p.add_argument(
        "--drop-misaligned",
        type=float,
        default=d.drop_misaligned,
        metavar="THRESHOLD",
        help="leave out samples whose caption the detector's tags contradict: contradicted share "
        "of the caption's checkable claims at/above THRESHOLD (e.g. 0.5). Default: keep every "
        "sample; mine.json's `alignment` is written either way",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="DirectRunner processes")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, accepts_extra_args=True)


def config_from_args(args: argparse.Namespace):
    from vlforge.pipeline.mine_config import MineConfig
    from vlforge.pipeline.neighbour_config import NeighbourConfig

    for name in ("ivf_threshold", "nprobe", "workers"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if args.nlist is not None and args.nlist < 1:
        raise UserError("--nlist must be at least 1")
    kinds = tuple(k.strip() for k in args.rewrite_kinds.split(",") if k.strip())
    return MineConfig(
        k_negatives=args.k_negatives,
        k_positives=args.k_positives,
        k_image_positives=args.k_image_positives,
        candidates=args.candidates,
        dup_threshold=args.dup_threshold,
        image_threshold=args.image_threshold,
        rewrites_per_kind=args.rewrites_per_kind,
        rewrite_kinds=kinds,
        dim=args.dim,
        neighbours=NeighbourConfig(
            ivf_threshold=args.ivf_threshold,
            nlist=args.nlist,
            nprobe=args.nprobe,
            storage=args.ivf_storage,
            use_gpu=not args.no_gpu,
            seed=1234 + args.seed,
        ),
        seed=args.seed,
        drop_misaligned=args.drop_misaligned,
    )


def run(args: argparse.Namespace) -> int:
    from vlforge.pipeline.mine_stage import format_summary, run_mine

    manifest = run_mine(
        args.source,
        args.out,
        config_from_args(args),
        beam_args=list(getattr(args, "extra_args", [])),
        workers=args.workers,
        show_progress=not args.no_progress,
    )
    print(format_summary(manifest), file=sys.stdout)
    return 0
