"""The suite table: every registered recipe trained with the same step budget, batch and seed on
the demo world, then evaluated on the demo's held-out shard — the project's analogue of the
survey's comparison table (`make bench-recipes`).

Reads what `make demo` left in runs/demo (mined shards, the manifest's train/eval split, the
tokenizer and the detector), so every recipe sees the same data and vocabulary. Per recipe:
parameters, training samples/s, the final value of each pretraining loss (mean of the last
logged steps), retrieval R@1 both ways and ITM accuracy on held-out pairs (zero-shot accuracy for
`clip`; reconstruction error and image-token likelihood for `dvae`/`dalle`). Beside what a recipe
learned the table prints what knowing nothing would give: held-out MLM accuracy against a unigram
model of the training captions (always its most frequent token), codebook use against the K codes
and image-token NLL against a uniform draw (ln K). The table is printed and appended to
bench/results.md under a dated heading.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

from results_table import RESULTS, machine

ROOT = Path(__file__).resolve().parents[1]
SHAPES = "circle,square,triangle,star,hexagon,heart"
COLOURS = "red,green,blue,yellow,orange,purple,white,black"


def recipe_names() -> list[str]:
    sys.path.insert(0, str(ROOT))
    from vlforge.train.recipes import list_recipes

    return list_recipes()


def run(argv: list[str], log: Path) -> None:
    with log.open("a") as handle:
        handle.write(f"$ vlforge {' '.join(argv)}\n")
        handle.flush()
        code = subprocess.call(
            [sys.executable, "-m", "vlforge.cli", *argv], stdout=handle, stderr=handle, cwd=ROOT
        )
    if code:
        raise RuntimeError(f"vlforge {argv[0]} failed (exit {code}); see {log}")


def final_losses(run_dir: Path, last: int) -> dict[str, float]:
    """Mean over the last `last` logged steps of every loss the run logged."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    skip = {"step", "lr", "samples_per_s", "grad_norm"}
    out: dict[str, list[float]] = {}
    for r in rows[-last:]:
        for k, v in r.items():
            if k in skip or k.endswith("_bytes") or not isinstance(v, int | float):
                continue
            if math.isfinite(v):
                out.setdefault(k, []).append(float(v))
    return {k: sum(v) / len(v) for k, v in out.items()}


def samples_per_s(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["samples_per_s"] for r in rows if "samples_per_s" in r][1:]  # first has start-up
    return sorted(speeds)[len(speeds) // 2] if speeds else float("nan")


def load_model(run_dir: Path):  # noqa: ANN201 (a recipe module)
    sys.path.insert(0, str(ROOT))
    from vlforge.train.trainer import load_for_eval

    model, _, _ = load_for_eval(str(run_dir), "cpu")
    return model


def captions(shards: list[str]) -> list[str]:
    out = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    out.append(tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
    return out


def unigram_baseline(tokenizer: Path, train: list[str], held_out: str) -> dict[str, float]:
    """What MLM gets from token frequencies alone: the training captions' most frequent
    non-special token predicted everywhere (accuracy on the held-out captions' tokens, which is
    what MLM's uniformly chosen positions see in expectation) and the unigram cross-entropy
    (nats; the MLM loss of a model that ignores the context)."""
    sys.path.insert(0, str(ROOT))
    from vlforge.train.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer)
    special = set(tok.special_ids)

    def counts(texts: list[str]) -> Counter:
        return Counter(i for t in texts for i in tok.encode(t, 40).ids if i not in special)

    seen, test = counts(captions(train)), counts(captions([held_out]))
    mode = seen.most_common(1)[0][0]
    total_seen, total_test = sum(seen.values()), sum(test.values())
    # Add-one smoothing so a held-out token unseen in training has a finite cost.
    vocab = tok.vocab_size
    ce = -sum(n * math.log((seen[i] + 1) / (total_seen + vocab)) for i, n in test.items()) / max(
        1, total_test
    )
    return {"acc": test[mode] / max(1, total_test), "ce": ce}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "runs" / "demo")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-recipes")
    # What fits `make bench-recipes` in 30 min on the 2-core machine (600 steps took 14-17 min).
    # At 600 steps ITM had not left its ln 2 saddle in 13 of 16 recipes; with paired negatives
    # it leaves it after 200-400 ITM steps when ITM trains alone, later beside MLM.
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--recipes", default="", help="comma-separated subset (default: all)")
    p.add_argument("--no-record", action="store_true", help="do not append to results.md")
    args = p.parse_args()

    manifest_path = args.demo / "manifest.json"
    tokenizer = args.demo / "train" / "tokenizer.json"
    if not manifest_path.is_file() or not tokenizer.is_file():
        print(f"bench-recipes: no demo run in {args.demo}; run `make demo` first", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    train = "::".join(manifest["train_shards"])
    held_out = manifest["eval_shards"][0]
    names = [n for n in args.recipes.split(",") if n] or recipe_names()
    unigram = unigram_baseline(tokenizer, manifest["train_shards"], held_out)
    # dalle's image tokens come from the dvae trained in the same run.
    names.sort(key=lambda n: (n == "dalle", n))
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "bench.log"
    log.write_text("")
    # What some recipes read beyond the shards: the demo's detector, the stage-1 dVAE.
    extra: dict[str, list[str]] = {
        "vl_bert": ["--set", f"detector_weights={args.demo / 'detector' / 'detector.pt'}"],
        "dalle": ["--set", f"dvae_ckpt={args.out / 'dvae'}"],
    }
    rows = []
    started = time.perf_counter()
    for i, name in enumerate(names, 1):
        run_dir = args.out / name
        subprocess.call(["rm", "-rf", str(run_dir)])
        t0 = time.perf_counter()
        print(f"[{i}/{len(names)}] {name}: training {args.steps} steps …", flush=True)
        run(
            ["train", "--recipe", name, "--shards", train, "--out", str(run_dir),
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr",
             str(args.lr), "--warmup", str(max(1, args.steps // 20)), "--seed", str(args.seed),
             "--tokenizer", str(tokenizer), "--log-every", "10", "--no-progress",
             *extra.get(name, [])],
            log,
        )  # fmt: skip
        eval_json = run_dir / "eval.json"
        run(
            ["eval", "--ckpt", str(run_dir), "--shards", held_out, "--candidates", "100",
             "--samples", "200", "--out", str(eval_json),
             "--zeroshot", f"shapes={SHAPES}", "--zeroshot", f"colours={COLOURS}"],
            log,
        )  # fmt: skip
        figures = json.loads(eval_json.read_text())
        model = load_model(run_dir)
        codes = getattr(model.cfg, "codes", None)  # dvae / dalle: the codebook's size K
        if codes:
            figures["dvae_codes"] = codes
        rows.append(
            {
                "recipe": name,
                "params": sum(p.numel() for p in model.parameters()),
                "samples_per_s": samples_per_s(run_dir),
                "losses": final_losses(run_dir, 10),
                "eval": figures,
                "seconds": time.perf_counter() - t0,
            }
        )
        print(f"    {name}: {rows[-1]['seconds']:.0f} s, eval {short(figures)}", flush=True)
    generated = generate_samples(args, names, held_out, log)
    total = time.perf_counter() - started
    table = render(rows, args, total, unigram) + generated
    print(table)
    if not args.no_record:
        with RESULTS.open("a") as handle:
            handle.write("\n" + table)
    (args.out / "suite.json").write_text(json.dumps(rows, indent=2) + "\n")
    where = "not recorded" if args.no_record else f"appended to {RESULTS}"
    print(f"{where}; {len(rows)} recipes in {total / 60:.1f} min")
    return 0


def generate_samples(args: argparse.Namespace, names: list[str], held_out: str, log: Path) -> str:
    """What the generative recipes make of held-out inputs: unimo's captions for 16 images,
    dalle's images for 8 captions (4 candidates each, reranked by the clip run)."""
    lines = []
    if "unimo" in names:
        out = args.out / "generated-unimo"
        run(["generate", "--recipe", "unimo", "--ckpt", str(args.out / "unimo"), "--shards",
             held_out, "--out", str(out), "--limit", "16"], log)  # fmt: skip
        lines.append(f"unimo captions for held-out images: `{out.relative_to(ROOT)}`")
    if "dalle" in names and "clip" in names:
        out = args.out / "generated-dalle"
        run(["generate", "--recipe", "dalle", "--ckpt", str(args.out / "dalle"), "--clip-ckpt",
             str(args.out / "clip"), "--shards", held_out, "--out", str(out), "--n", "4",
             "--limit", "8"], log)  # fmt: skip
        lines.append(
            f"dalle images (PNG grids beside their captions, CLIP-reranked): "
            f"`{out.relative_to(ROOT)}`"
        )
    return "".join(f"\n{line}\n" for line in lines)


def short(figures: dict) -> str:
    keys = ("retrieval_i2t_r1", "retrieval_t2i_r1", "itm_accuracy", "zeroshot_shapes_acc")
    return ", ".join(f"{k} {figures[k]:.3f}" for k in keys if k in figures)


def cell(figures: dict, key: str) -> str:
    v = figures.get(key)
    return f"{v:.3f}" if isinstance(v, int | float) else "–"


def render(rows: list[dict], args: argparse.Namespace, total: float, unigram: dict) -> str:
    lines = [
        f"## Recipe suite, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {machine()}",
        "",
        f"`python bench/bench_recipes.py --steps {args.steps}` (`make bench-recipes`): each recipe "
        f"`small`, {args.steps} steps, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, "
        f"on the demo's training shards; eval on its held-out shard (100 candidates for "
        f"retrieval: chance R@1 0.010; 200 pairs for ITM, half of them matched: chance 0.5). "
        f"Baselines: `unigram` is the held-out MLM accuracy of always predicting the training "
        f"captions' most frequent token (its cross-entropy: {unigram['ce']:.3f} nats, against the "
        f"mlm losses); `uniform` is the image-token NLL of a uniform draw from the K codes (ln K). "
        f"Total {total / 60:.1f} min.",
        "",
        "| recipe | params | samples/s | final losses | i2t R@1 | t2i R@1 | ITM acc | MLM acc "
        "| unigram | codes used / K | image NLL | uniform | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown = ("retrieval_", "itm_", "mlm_accuracy", "dvae_codes", "dalle_image_nll")
    for r in rows:
        ev = r["eval"]
        losses = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["losses"].items()))
        # Everything else the recipe reports (zero-shot, QA, reconstruction, image tokens).
        other = ", ".join(
            f"{k} {ev[k]:.3f}"
            for k in sorted(ev)
            if not k.startswith(shown) and not k.endswith("_n")
        )
        baseline = f"{unigram['acc']:.3f}" if "mlm_accuracy" in ev else "–"
        codes = ev.get("dvae_codes")
        used = (
            f"{ev['dvae_codes_used']:.0f} / {codes}" if codes and "dvae_codes_used" in ev else "–"
        )
        uniform = f"{math.log(codes):.3f}" if codes and "dalle_image_nll" in ev else "–"
        lines.append(
            f"| {r['recipe']} | {r['params'] / 1e6:.2f}M | {r['samples_per_s']:.0f} | {losses} | "
            f"{cell(ev, 'retrieval_i2t_r1')} | {cell(ev, 'retrieval_t2i_r1')} | "
            f"{cell(ev, 'itm_accuracy')} | {cell(ev, 'mlm_accuracy')} | "
            f"{baseline} | {used} | "
            f"{cell(ev, 'dalle_image_nll')} | {uniform} | {other or '–'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
