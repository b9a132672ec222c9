"""Benchmark the mining stage; appends a row to bench/results.md.

1. Mining time end to end (`run_mine`: read shards, TF-IDF, faiss, rewrites, write shards) for
   --n demo-world captions (default 100,000; the issue's target is 1,000,000 under 15 minutes).
   Shards carry a placeholder jpg: rendering images is the world's cost, not mining's. sg.json
   comes from featurize's parser, run once per distinct caption (parsing is featurize's cost,
   ~5 min per 100k captions here): graphs are cached per caption under --work/sg-cache, and the
   input shards under --work are reused by the next run with the same --n, --seed and
   --shard-size (--inputs-only builds them and stops). Below 1,000,000 the 1M time is
   extrapolated linearly and marked as such; the IVF search grows faster than linearly (each
   query scans ~sqrt(n) vectors), so a linear extrapolation is a lower bound.
2. faiss IVF vs exact flat vs scikit-learn brute-force neighbours on the same --vectors (100,000)
   caption vectors: queries/s and recall@10 against the exact answer.

Captions come from the demo world (vlforge.world) when it is importable, otherwise from a
template stand-in with the world's kinds of slots; the row says which.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "hexagon",
    "cross",
    "diamond",
    "ring",
    "moon",
    "arrow",
    "oval",
]
COLOURS = [
    "red",
    "blue",
    "green",
    "yellow",
    "orange",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "gray",
    "cyan",
]
SIZES = ["small", "big", "large", "tiny"]
RELATIONS = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
}
TEMPLATES = [
    "a {s1} {c1} {o1} {r} a {c2} {o2}",
    "A {c1} {o1} {r} a {s2} {c2} {o2}.",
    "there is a {c1} {o1} {r} a {c2} {o2}",
    "a photo of a {s1} {c1} {o1} {r} a {s2} {c2} {o2}",
    "{n} {c1} {o1}s {r} a {c2} {o2}",
]


def world_captions(n: int, seed: int) -> tuple[list[str], list[list[str]], list, str]:
    """(captions, shapes per image, world truth per image or None, source)."""
    try:
        from vlforge.world.captions import caption_scene
        from vlforge.world.scene import image_graph, sample_scene, scene_rng
    except ImportError:  # the world package is not there: the template stand-in below
        pass
    else:
        captions, shapes, truths = [], [], []
        for i in range(n):
            scene = sample_scene(seed, i)
            text, _graph = caption_scene(scene, scene_rng(seed, i, "caption"))
            captions.append(text)
            shapes.append([o.shape for o in scene.objects])
            truths.append({"scene_graph": image_graph(scene)})
        return captions, shapes, truths, "demo world"
    rng = np.random.default_rng(seed)
    captions, shapes = [], []
    for _ in range(n):
        o1, o2 = rng.choice(SHAPES, 2, replace=False).tolist()
        c1, c2 = rng.choice(COLOURS, 2).tolist()
        s1, s2 = rng.choice(SIZES, 2).tolist()
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        words = {"o1": o1, "o2": o2, "c1": c1, "c2": c2, "s1": s1, "s2": s2}
        words["r"] = RELATIONS[str(rng.choice(list(RELATIONS)))]
        words["n"] = str(rng.choice(["two", "three", "four"]))
        captions.append(template.format(**words))
        shapes.append([o1, o2])
    return captions, shapes, [None] * n, "template stand-in"


INPUT_FORMAT = 2  # 2: tags.json lists each name once with a `count`, as featurize writes it


class ParseCache:
    """sg.json text per caption, kept under WORK/sg-cache/ as parquet parts.

    Parsing is featurize's cost (~5 min per 100,000 captions here); a caption's graph does not
    depend on --n, --seed or --shard-size, so each caption is parsed once across runs, and an
    interrupted build resumes from the last part written.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.graphs: dict[str, str] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for part in sorted(directory.glob("part-*.parquet")):
            table = pq.read_table(part)
            self.graphs.update(
                zip(
                    table.column("caption").to_pylist(), table.column("sg").to_pylist(), strict=True
                )
            )

    def harvest(self, shard_dirs: list[Path]) -> None:
        """Seed an empty cache with the txt/sg.json pairs of input shards built before it."""
        from vlforge.pipeline.mine_shards import read_samples

        found = {}
        for directory in shard_dirs:
            for tar in sorted(directory.glob("*.tar")):
                for sample in read_samples(str(tar)):
                    if "txt" in sample and "sg.json" in sample:
                        found[sample["txt"].decode()] = sample["sg.json"].decode()
        self._save({c: g for c, g in found.items() if c not in self.graphs})

    def parse_missing(self, captions: list[str], chunk: int = 20_000) -> tuple[float, int]:
        """Parse the captions not cached yet; (seconds spent parsing, how many)."""
        from vlforge.featurize.scene_graph import SceneGraphParser

        missing = sorted(set(captions) - self.graphs.keys())
        started = time.time()
        parser = SceneGraphParser() if missing else None
        for lo in range(0, len(missing), chunk):
            batch = missing[lo : lo + chunk]
            graphs = parser.parse_many(batch)
            self._save({c: json.dumps(g) for c, g in zip(batch, graphs, strict=True)})
            print(f"parsed {min(lo + chunk, len(missing)):,} of {len(missing):,}", flush=True)
        return time.time() - started, len(missing)

    def _save(self, graphs: dict[str, str]) -> None:
        if not graphs:
            return
        part = self.directory / f"part-{len(list(self.directory.glob('part-*.parquet'))):05d}"
        table = pa.table({"caption": list(graphs), "sg": list(graphs.values())})
        pq.write_table(table, f"{part}.tmp")
        os.replace(f"{part}.tmp", f"{part}.parquet")  # a part is whole or absent
        self.graphs.update(graphs)


def write_shards(directory: Path, captions, shapes, truths, shard_size: int, graphs) -> None:
    """Input shards as featurize writes them: sg.json from the parser, tags.json one entry per
    detected name with its count (the world's shapes stand in for detections)."""
    for start in range(0, len(captions), shard_size):
        with open(directory / f"bench-{start // shard_size:06d}.tar", "wb") as handle:
            writer = wds.TarWriter(handle, encoder=False)
            for i in range(start, min(start + shard_size, len(captions))):
                counts = Counter(shapes[i])
                tags = {
                    "tags": [
                        {"name": name, "score": 0.9, "count": count, "attributes": []}
                        for name, count in sorted(counts.items())
                    ]
                }
                writer.write(
                    {
                        "__key__": f"{i:09d}",
                        "jpg": b"\xff\xd8\xff\xd9",
                        "txt": captions[i].encode(),
                        "json": json.dumps(
                            {"world": json.dumps(truths[i])} if truths[i] else {}
                        ).encode(),
                        "sg.json": graphs[captions[i]].encode(),
                        "tags.json": json.dumps(tags).encode(),
                    }
                )
            writer.close()


def build_input(work: Path, source_dir: Path, n: int, seed: int, shard_size: int) -> dict:
    """The input shards for --n/--seed/--shard-size under source_dir, built unless there."""
    marker = source_dir / "input.json"
    if marker.exists():  # the same captions, parsed and written by an earlier run
        built = json.loads(marker.read_text())
        if built.get("format") == INPUT_FORMAT:
            return built
    captions, shapes, truths, source = world_captions(max(n, 1), seed)
    cache = ParseCache(work / "sg-cache")
    if not cache.graphs:
        cache.harvest([d for d in work.glob(f"in-*-s{seed}-*") if d.is_dir()])
    parse_s, parsed = cache.parse_missing(captions)
    shutil.rmtree(source_dir, ignore_errors=True)
    source_dir.mkdir(parents=True)
    started = time.time()
    write_shards(source_dir, captions, shapes, truths, shard_size, cache.graphs)
    built = {
        "format": INPUT_FORMAT,
        "source": source,
        "parse_s": round(parse_s, 1),
        "parsed": parsed,
        "cached": len(set(captions)) - parsed,
        "write_s": round(time.time() - started, 1),
    }
    marker.write_text(json.dumps(built))
    return built


def bench_search(captions: list[str], n_vectors: int, seed: int) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from vlforge.pipeline.neighbours import NeighbourConfig, NeighbourIndex, recall_at_k
    from vlforge.pipeline.tfidf import doc_frequencies, fit_reducer, idf_from_df, tfidf

    texts = sorted(set(captions))
    source = "caption TF-IDF/SVD vectors"
    idf = idf_from_df(doc_frequencies(texts), len(texts))
    rows = tfidf(texts, idf)
    vectors = fit_reducer(rows[:20000], dim=128, seed=seed).transform(rows)
    if len(vectors) < n_vectors:  # too few distinct captions: jitter copies of real ones
        rng = np.random.default_rng(seed)
        extra = vectors[rng.integers(len(vectors), size=n_vectors - len(vectors))]
        extra = extra + 0.05 * rng.normal(size=extra.shape).astype(np.float32)
        vectors = np.vstack([vectors, extra / np.linalg.norm(extra, axis=1, keepdims=True)])
        source += f" ({len(texts)} distinct, padded with jittered copies)"
    vectors = np.ascontiguousarray(vectors[:n_vectors], dtype=np.float32)
    queries = vectors[np.random.default_rng(seed + 1).choice(len(vectors), 2000, replace=False)]
    out = {"vectors": len(vectors), "vector_source": source}

    def timed(fn):
        started = time.time()
        result = fn()
        return result, time.time() - started

    flat = NeighbourIndex(vectors, NeighbourConfig(ivf_threshold=len(vectors) + 1, use_gpu=False))
    (_, exact), t = timed(lambda: flat.search(queries, 10))
    out["flat_qps"] = round(len(queries) / t)
    # The default settings, with the IVF forced when --vectors is below the default threshold.
    ivf_config = NeighbourConfig(
        ivf_threshold=min(NeighbourConfig().ivf_threshold, len(vectors)), use_gpu=False
    )
    (ivf, build) = timed(lambda: NeighbourIndex(vectors, ivf_config))
    (_, approx), t = timed(lambda: ivf.search(queries, 10))
    out.update(
        ivf_qps=round(len(queries) / t),
        ivf_build_s=round(build, 2),
        ivf_recall10=round(recall_at_k(approx, exact), 4),
        nlist=ivf.nlist,
        nprobe=ivf.index.nprobe,
    )
    nn = NearestNeighbors(n_neighbors=10, algorithm="brute", metric="cosine").fit(vectors)
    (_, brute), t = timed(lambda: nn.kneighbors(queries))
    out["sklearn_qps"] = round(len(queries) / t)
    out["sklearn_recall10"] = round(recall_at_k(brute, exact), 4)
    return out


def main() -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=100_000, help="captions to mine")
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT / "bench" / "work" / "mine"))
    parser.add_argument(
        "--inputs-only", action="store_true", help="build (or find) the input shards and stop"
    )
    args = parser.parse_args()

    from vlforge.pipeline.mine_eval import mine_quality
    from vlforge.pipeline.mine_stage import MineConfig, run_mine

    work = Path(args.work)
    source_dir = work / f"in-{args.n}-s{args.seed}-{args.shard_size}"
    built = build_input(work, source_dir, args.n, args.seed, args.shard_size)
    print(json.dumps({"input": str(source_dir), **built}), flush=True)
    if args.inputs_only:
        return 0
    # Captions again for the distinct count and the search bench (cheap next to parsing); the
    # world truths are dropped at once: at 1M they hold gigabytes the mining run could use.
    captions, _, truths, source = world_captions(max(args.n, 1), args.seed)
    del truths
    parse_s = built["parse_s"]
    shutil.rmtree(work / "out", ignore_errors=True)
    started, cpu_started = time.time(), time.process_time()
    manifest = run_mine(str(source_dir), str(work / "out"), MineConfig(seed=args.seed))
    mine_s = time.time() - started
    # The in-memory runner works in this process: CPU time shows the cost when others share it.
    mine_cpu_s = time.process_time() - cpu_started
    load = os.getloadavg()[0]
    per_million = mine_s * 1_000_000 / args.n
    figures = mine_quality(str(work / "out")) if source == "demo world" else {}
    search = bench_search(captions, args.vectors, args.seed)
    result = {
        "n": args.n,
        "caption_source": source,
        "distinct_captions": len(set(captions)),
        "parse_s": round(parse_s, 1),
        "mine_s": round(mine_s, 1),
        "mine_cpu_s": round(mine_cpu_s, 1),
        "load_avg_1m": round(load, 2),
        "captions_per_s": round(args.n / mine_s),
        "mine_1M_s": round(per_million),
        "mine_1M_measured": args.n >= 1_000_000,
        "samples_out": manifest["samples"],
        **{k: v for k, v in figures.items() if k.startswith("neg_")},
        # The mined corpus's own recall (mine_eval); the search bench below has its own.
        "corpus_ivf_recall10": figures.get("ivf_recall10"),
        **search,
    }
    print(json.dumps(result, indent=2))
    _append(result)
    return 0


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def _append(r: dict) -> None:
    """One row in the shared table: date | machine | bench | setup | ours | peer | ratio."""
    path = ROOT / "bench" / "results.md"
    if not path.exists():
        path.write_text(
            "# Benchmarks\n\n| date | machine | bench | setup | ours | peer | ratio |\n"
            "|---|---|---|---|---|---|---|\n"
        )
    machine = f"{_cpu_model()}, {os.cpu_count()} CPUs, load {r['load_avg_1m']} (shared)"
    how = "measured" if r["mine_1M_measured"] else f"extrapolated from {r['n']:,}"
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = [
        (
            "mine (end to end)",
            f"{r['n']:,} {r['caption_source']} captions ({r['distinct_captions']:,} distinct), "
            "placeholder jpg, sg.json + tags.json",
            f"{r['mine_s']} s wall, {r['mine_cpu_s']} CPU s = {r['captions_per_s']:,} captions/s; "
            f"1M: {r['mine_1M_s'] / 60:.1f} min ({how}); neg_false_rate "
            f"{r.get('neg_false_rate')}, ivf_recall10 {r.get('corpus_ivf_recall10')}",
            "target: 1M in 15 min",
            f"{r['mine_1M_s'] / 900:.2f}x the target",
        ),
        (
            "mine: faiss IVF vs exact",
            f"{r['vectors']:,} vectors, 2,000 queries, k=10; {r['vector_source']}",
            f"IVF nlist={r['nlist']} nprobe={r['nprobe']}: {r['ivf_qps']:,} q/s, "
            f"recall@10 {r['ivf_recall10']}",
            f"flat: {r['flat_qps']:,} q/s; sklearn brute: {r['sklearn_qps']:,} q/s, "
            f"recall@10 {r['sklearn_recall10']}",
            f"IVF/flat {r['ivf_qps'] / r['flat_qps']:.1f}x, "
            f"flat/sklearn {r['flat_qps'] / r['sklearn_qps']:.1f}x",
        ),
    ]
    with path.open("a") as handle:
        for bench, setup, ours, peer, ratio in rows:
            handle.write(
                f"| {date} | {machine} | {bench} | {setup} | {ours} | {peer} | {ratio} |\n"
            )


if __name__ == "__main__":
    raise SystemExit(main())
