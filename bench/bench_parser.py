"""Captions/s of the scene-graph parser: batched `parse_many` (nlp.pipe) vs one `parse` per caption.

Both run in this process on the same captions (demo-world captions when the world module is
importable, else the hand-labelled web captions repeated), after one warm-up batch so neither
pays for first-call allocation. Prints both rates and the ratio, and appends a line to
bench/results.md with the date and the machine.

    python bench/bench_parser.py [--n 2000] [--batch-size 256]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from results_table import record  # noqa: E402

WEB_CAPTIONS = ROOT / "tests" / "data" / "sg_web_captions.jsonl"


def load_captions(n: int) -> tuple[list[str], str]:
    """n captions and where they came from."""
    try:
        from vlforge.world.captions import caption_scene
        from vlforge.world.scene import sample_scene
    except ImportError:
        rows = [json.loads(line) for line in WEB_CAPTIONS.read_text().splitlines() if line.strip()]
        base = [row["caption"] for row in rows]
        return [base[i % len(base)] for i in range(n)], "web captions (repeated)"
    rng = random.Random(0)
    captions = [caption_scene(sample_scene(0, i), rng)[0] for i in range(n)]
    return captions, "demo-world captions"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()

    from vlforge.featurize.scene_graph import SceneGraphParser

    captions, source = load_captions(args.n)
    sg = SceneGraphParser(batch_size=args.batch_size)
    sg.parse_many(captions[:64])  # warm-up

    start = time.perf_counter()
    batched = sg.parse_many(captions)
    batched_s = time.perf_counter() - start

    start = time.perf_counter()
    single = [sg.parse(caption) for caption in captions]
    single_s = time.perf_counter() - start

    # Same pipeline, same captions: the graphs must agree, or the comparison means nothing.
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    batched_rate, single_rate = len(captions) / batched_s, len(captions) / single_s
    ratio = batched_rate / single_rate
    print(f"captions: {len(captions)} {source}; identical graphs: {same}/{len(captions)}")
    print(
        f"parse_many (batch {args.batch_size}): {batched_s:.1f} s = {batched_rate:.0f} captions/s"
    )
    print(f"parse one by one       : {single_s:.1f} s = {single_rate:.0f} captions/s")
    print(f"ratio parse_many / parse = {ratio:.2f}x")

    record(
        "scene-graph parser",
        f"{len(captions)} {source}, en_core_web_sm, batch {args.batch_size}",
        f"parse_many {batched_rate:.0f} captions/s",
        f"parse {single_rate:.0f} captions/s",
        f"{ratio:.2f}x",
    )


if __name__ == "__main__":
    main()
