"""`vlforge demo`: the whole flow on the demo world, outputs under runs/demo, figures in metrics.json.

world → corpus → featurize (training the demo detector first if its weights are missing) →
mine → tokenizer + train (UNITER small) → eval. Each stage runs through the same CLI a user
types, and each stage's figures are merged into `OUT/metrics.json` as soon as it finishes, so a
failing later stage never loses the earlier figures. `--until STAGE` stops early.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vlforge.errors import UserError

STAGES = ("corpus", "featurize", "mine", "train")

# The crawl settings the demo world's expectations (vlforge.world.mess.KINDS) are written for.
DEMO_CORPUS_FLAGS = [
    "--preset", "datacomp-basic", "--respect-robots", "--allow-private", "127.0.0.0/8",
    "--timeout", "1.5", "--deadline", "3", "--retries", "2", "--backoff", "0.1",
    "--max-bytes", str(8 * 1024 * 1024),
]  # fmt: skip
EVAL_SHARD_SAMPLES = 100  # retrieval over at least 100 held-out candidates per query
# Disjoint pools of EVAL_SHARD_SAMPLES whose recalls are averaged (as COCO's 5-fold "1K test"):
# one pool's R@1 has a standard error of ±0.05; three of them about ±0.03.
EVAL_FOLDS = 3
# Mining leaves out pairs whose caption the detector's tags contradict this much (alignment.py):
# on the demo world precision 0.90 / recall 0.86 against its mismatched pairs.
DROP_MISALIGNED = 0.5


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole flow on the demo world")
    p.add_argument("--out", default="runs/demo")
    # 6000 rows → ~3800 samples after mining's misalignment filter. Retrieval grows with distinct
    # pairs: UNITER-small (itr with 7 negatives, 3000 steps) R@1 0.52/0.50 from 4000 rows, 0.61/0.60
    # from 6000. The crawl runs beside the detector training, which is the longer of the two.
    p.add_argument("--n", type=int, default=6000, help="pairs in the demo world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="crawl and mining processes")
    p.add_argument("--until", default=STAGES[-1], choices=STAGES, help="last stage to run")
    # Measured on this demo's shards (R@1 i2t/t2i over 100 held-out candidates, each ±0.05 at
    # N = 100): ITM 8 : MLM 1 at lr 1e-3 gave 0.07/0.06 in 3000 steps and 0.16/0.18 in 6000 (ITM
    # sits on its ln 2 saddle for ~1000 steps); with UNITER's ranking task "itr" (8 : ITM 2 :
    # MLM 1) 0.41/0.36, and at lr 2e-3 0.49/0.47 (3000 steps) and 0.48/0.49 (4000); itr 16 : ITM 2
    # : MLM 1 at lr 2e-3 0.52/0.51 (batch 64 instead: 0.40/0.41). Then on the filtered 6000-row
    # corpus, mean of 3 pools: 3 negatives per image 0.45/0.44, 7 negatives 0.61/0.60 (2000 steps
    # 0.51/0.53, 2500 0.55/0.50).
    p.add_argument("--train-steps", type=int, default=3000)
    p.set_defaults(func=run)


def demo_corpus_args(urls: str, out: str, workers: int = 1) -> list[str]:
    return ["corpus", "--urls", urls, "--out", out, "--workers", str(workers), *DEMO_CORPUS_FLAGS]


def _vlforge(*argv: str, child: bool = False) -> None:
    """Run one `vlforge` subcommand as a user would type it: in this process, or with `child`
    in a fresh one. Training runs in a child: in this process, after the crawl, featurize and
    mining pipelines, the same 3000 steps took 367 s instead of 327 s (bit-identical curves)."""
    from vlforge.cli import main

    print(f"\n$ vlforge {' '.join(argv)}", flush=True)
    if child:
        command = [sys.executable, "-c", "from vlforge.cli import entry; entry()", *argv]
        code = subprocess.run(command, check=False).returncode
    else:
        code = main(list(argv))
    if code != 0:
        raise UserError(f"demo stage `vlforge {argv[0]}` failed (exit {code})")


class _Metrics:
    def __init__(self, path: Path, seed: int, n: int):
        self.path = path
        self.data: dict = {"seed": seed, "n": n, "stages": {}}

    def add(self, stage: str, figures: dict, seconds: float) -> None:
        # Named figures (detector_map50, neg_false_rate, ...) also go to the top level; generic
        # counts stay in their stage so one stage's `samples` never overwrites another's.
        generic = {"n", "seed", "samples", "queries", "seconds"}
        self.data.update(
            {
                k: v
                for k, v in figures.items()
                if k not in generic and not isinstance(v, dict | list)
            }
        )
        self.data["stages"][stage] = {"seconds": round(seconds, 1), **figures}
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def run(args: argparse.Namespace) -> int:
    if args.n < 100:
        raise UserError("--n must be at least 100 so every kind of mess appears")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _Metrics(out / "metrics.json", args.seed, args.n)
    last = STAGES.index(args.until)
    started = time.time()
    # The detector trains on rendered world images, not on the corpus, so it can train while the
    # crawl (mostly waiting on the faulty server) runs: one CPU-bound job beside an I/O-bound one.
    args.detector_job = _start_detector_training(out, args) if last >= 1 else None
    try:
        _run_stages(out, args, metrics, last)
    finally:  # a failed stage must not leave the detector training behind
        if args.detector_job is not None and args.detector_job.poll() is None:
            args.detector_job.terminate()
    metrics.data["seconds"] = round(time.time() - started, 1)
    metrics.path.write_text(json.dumps(metrics.data, indent=2, default=str) + "\n")
    report = _report(out, last)
    print(f"\ndemo: done in {metrics.data['seconds']:.0f} s; figures in {metrics.path}")
    print(f"demo: report {report} (open it in a browser; no server needed)")
    return 0


def _report(out: Path, last: int) -> Path:
    """The corpus (and the training run, when the demo got that far) as one static page."""
    from vlforge.report import write_report

    run_dir = out / "train" if last >= STAGES.index("train") else None
    return write_report(out / "corpus", run_dir, out / "report")


def _run_stages(out: Path, args: argparse.Namespace, metrics: _Metrics, last: int) -> None:
    from vlforge.world.server import WorldServer
    from vlforge.world.url_list import make_url_list

    with WorldServer(hold_seconds=30.0, slow_body_seconds=20.0) as server:
        urls = make_url_list(args.n, args.seed, server.base_url, out / "urls.parquet")
        print(f"world: {args.n} pairs at {server.base_url} -> {urls}")
        t = time.time()
        _vlforge(
            *demo_corpus_args(str(urls), str(out / "corpus"), args.workers),
            "--shard-size", str(EVAL_SHARD_SAMPLES), "--overwrite",
        )  # fmt: skip
    metrics.add("corpus", _corpus_figures(out), time.time() - t)
    stages = {"featurize": _featurize, "mine": _mine, "train": _train}
    for stage in STAGES[1 : last + 1]:
        t = time.time()
        metrics.add(stage, stages[stage](out, args), time.time() - t)


def _corpus_figures(out: Path) -> dict:
    manifest = json.loads((out / "corpus" / "manifest.json").read_text())
    agree = truth_agreement(out / "corpus", out / "urls.parquet")
    return {
        "corpus_rows": manifest["rows"],
        "corpus_samples": manifest["samples"],
        "corpus_status_agreement": round(agree["matching"] / agree["rows"], 4),
        "status_counts": manifest["status_counts"],
        "funnel": manifest["funnel"],
        "truth_mismatches": agree["mismatches"],
        "http_requests": manifest["http_requests"],
    }


def truth_agreement(corpus_dir: Path, urls_path: Path) -> dict:
    """Compare each row's status/reason with what the world says it should be."""
    import pyarrow.parquet as pq

    from vlforge.pipeline.filters import caption_key
    from vlforge.pipeline.stats_dataset import read_stats
    from vlforge.world.mess import KINDS

    stats = read_stats(corpus_dir / "stats.parquet").to_pylist()
    urls = pq.read_table(urls_path).to_pylist()
    matching, mismatches = 0, {}
    kept_captions: set[str] = set()
    for row, stat in zip(urls, stats, strict=True):
        kind = KINDS[json.loads(row["world"])["kind"]]
        expected = (kind.expect_status, kind.expect_reason)
        got = (stat["status"], stat["reason"] or "")
        # Templated captions can repeat by chance; a repeat is then rightly a caption duplicate.
        if expected == ("ok", "") and got == ("duplicate", "duplicate_caption"):
            expected = got if caption_key(stat["caption"]) in kept_captions else expected
        if got == ("ok", ""):
            kept_captions.add(caption_key(stat["caption"]))
        if got == expected:
            matching += 1
        else:
            label = f"{kind.name}: expected {expected[0]}:{expected[1]} got {got[0]}:{got[1]}"
            mismatches[label] = mismatches.get(label, 0) + 1
    return {"rows": len(stats), "matching": matching, "mismatches": mismatches}


def _detector_paths(out: Path) -> tuple[Path, Path]:
    weights = out / "detector" / "detector.pt"
    return weights, Path(str(weights) + ".json")


def _start_detector_training(out: Path, args: argparse.Namespace) -> subprocess.Popen | None:
    """`vlforge featurize train-detector` in a child process, unless usable weights exist."""
    weights, sidecar = _detector_paths(out)
    # Weights from before the attribute head describe class-only features: train afresh.
    if (
        weights.exists()
        and sidecar.exists()
        and "attribute_names" in json.loads(sidecar.read_text())
    ):
        return None
    weights.parent.mkdir(parents=True, exist_ok=True)
    argv = ["featurize", "train-detector", "--out", str(weights), "--seed", str(args.seed)]
    print(f"\n$ vlforge {' '.join(argv)}   (in the background, log: {weights.parent}/train.log)")
    log = (weights.parent / "train.log").open("w")
    command = [sys.executable, "-c", "from vlforge.cli import entry; entry()", *argv]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def _featurize(out: Path, args: argparse.Namespace) -> dict:
    from vlforge.featurize.tag_eval import tag_quality

    weights, sidecar = _detector_paths(out)
    job = getattr(args, "detector_job", None)
    if job is not None:
        print("waiting for the detector training to finish ...", flush=True)
        if job.wait() != 0:
            raise UserError(
                f"detector training failed (exit {job.returncode}); see {weights.parent}/train.log"
            )
    elif not weights.exists():
        _vlforge("featurize", "train-detector", "--out", str(weights), "--seed", str(args.seed))
    _vlforge(
        "featurize", "--in", str(out / "corpus"), "--out", str(out / "featurized"),
        "--weights", str(weights), "--workers", str(_featurize_workers(args.workers)),
    )  # fmt: skip
    training = json.loads(sidecar.read_text()).get("training", {})
    held_out = training.get("eval", {})
    figures = {
        "detector_map50": held_out.get("map50"),
        "detector_colour_accuracy": held_out.get("colour_accuracy"),
        "detector_size_accuracy": held_out.get("size_accuracy"),
        "detector_eval_images": held_out.get("n"),
        "detector_eval_seed": held_out.get("seed"),
        "detector_train_s": training.get("train_s"),
    }
    figures.update(tag_quality(str(out / "featurized")))
    figures.update(_parser_figures(out))
    return figures


def _featurize_workers(requested: int) -> int:
    """Featurize is CPU-bound and nothing else runs beside it: one worker per core (capped:
    each holds a detector). 4093 images here: 65 s with 2 workers, 105 s with 1."""
    return max(requested, min(os.cpu_count() or 1, 8))


def _parser_figures(out: Path) -> dict:
    """Scene-graph parser F1 on the world's own captions (clean rows) and on hand-labelled web
    captions when the checkout has them."""
    import pyarrow.parquet as pq

    from vlforge.featurize.scene_graph import SceneGraphParser
    from vlforge.featurize.scene_graph_eval import f1_scores

    rows = pq.read_table(out / "urls.parquet").to_pylist()
    clean = [json.loads(r["world"]) | {"caption": r["caption"]} for r in rows]
    clean = [w for w in clean if w["kind"] == "clean"]
    parser = SceneGraphParser()
    world = f1_scores(
        parser.parse_many([w["caption"] for w in clean]), [w["scene_graph"] for w in clean]
    )
    figures = {f"sg_f1_{k}": round(v, 4) for k, v in world.items()}
    web_path = Path(__file__).resolve().parent.parent / "tests" / "data" / "sg_web_captions.jsonl"
    if web_path.exists():
        web = [json.loads(line) for line in web_path.read_text().splitlines() if line.strip()]
        scores = f1_scores(parser.parse_many([w["caption"] for w in web]), web)
        figures.update({f"sg_web_f1_{k}": round(v, 4) for k, v in scores.items()})
    return figures


def _mine(out: Path, args: argparse.Namespace) -> dict:
    from vlforge.pipeline.mine_eval import mine_quality

    _vlforge(
        "mine", "--in", str(out / "featurized"), "--out", str(out / "mined"),
        "--seed", str(args.seed), "--workers", str(args.workers),
        "--drop-misaligned", str(DROP_MISALIGNED),
    )  # fmt: skip
    quality = mine_quality(str(out / "mined"), seed=args.seed)
    return {k: v for k, v in quality.items() if not isinstance(v, dict | list)}


def _train(out: Path, args: argparse.Namespace) -> dict:
    shards = sorted((out / "mined").glob("corpus-*.tar"))
    # The last shards are held out (the pipeline keeps keys apart: no training shard shares
    # them) until they hold EVAL_FOLDS pools of EVAL_SHARD_SAMPLES.
    wanted = EVAL_FOLDS * EVAL_SHARD_SAMPLES
    held_out: list[Path] = []
    held = 0
    while len(shards) > 1 and held < wanted:
        held_out.insert(0, shards.pop())
        held += _count(held_out[0])
    if held < wanted:
        raise UserError("the demo corpus is too small to hold out the eval pools; raise --n")
    train_shards = shards
    train_pattern = "::".join(str(s) for s in train_shards)
    run_dir = out / "train"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo's own run: each demo trains afresh
    _vlforge(
        "train", "--recipe", "uniter", "--shards", train_pattern, "--out", str(run_dir),
        "--steps", str(args.train_steps), "--batch-size", "32", "--lr", "2e-3", "--warmup", "100",
        # Retrieval is what the demo measures: UNITER's ranking objective ("itr") takes most
        # batches (figures at --train-steps); ITM keeps its threshold, MLM its language.
        "--set", 'tasks={"itr": 16, "itm": 2, "mlm": 1}', "--itr-negatives", "7",
        "--seed", str(args.seed), "--no-progress", child=True,
    )  # fmt: skip
    eval_out = out / "eval.json"
    _vlforge(
        "eval", "--ckpt", str(run_dir), "--shards", "::".join(str(s) for s in held_out),
        "--candidates", str(EVAL_SHARD_SAMPLES), "--folds", str(EVAL_FOLDS),
        "--out", str(eval_out), child=True,
    )  # fmt: skip
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest.update(
        {"train_shards": [str(s) for s in train_shards], "eval_shards": [str(s) for s in held_out]}
    )
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    figures = json.loads(eval_out.read_text())
    return {k: v for k, v in figures.items() if isinstance(v, int | float | list)}


def _count(shard: Path) -> int:
    import tarfile

    with tarfile.open(shard) as tar:
        return sum(1 for m in tar.getmembers() if m.name.endswith(".txt"))
