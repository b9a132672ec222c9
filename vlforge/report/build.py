"""`write_report`: collect the figures, draw the plots and samples, write OUT/index.html.

The page is one file with everything inline (plots as SVG, images as data URIs), so it can be
mailed, attached to a ticket or opened from a laptop's disk without a server or a network.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlforge import __version__
from vlforge.errors import UserError
from vlforge.report import plots
from vlforge.report.corpus_data import CorpusFigures, corpus_figures, host_of
from vlforge.report.drawing import DISPLAY_SIDE, boxes_to_draw, draw_boxes, label_boxes
from vlforge.report.page import render_page, svg
from vlforge.report.run_data import RunFigures, Series, read_run
from vlforge.report.samples import ShardFigures, scan_shards
from vlforge.report.sources import Sources, locate

GRID_SAMPLES = 48
PAGE_SIZE = 12
TOP_TAGS = 40
TOP_LANGUAGES = 20
RUN_CONFIG_KEYS = ("recipe", "size", "steps", "batch_size", "lr", "schedule", "precision")
# More expert series than this make the lines plot unreadable; the bar chart still shows all.
MAX_EXPERT_LINES = 32


def print_progress(message: str) -> None:
    sys.stderr.write(f"report: {message}\n")
    sys.stderr.flush()


def _stage_rows(sources: Sources) -> list[dict[str, Any]]:
    """Featurize and mine figures from their manifests, in pipeline order."""
    rows = []
    for name, manifest in sources.stages.items():
        figures: list[tuple[str, Any]] = []
        if name == "featurize":
            counts = manifest.get("counts") or {}
            figures = [(k, v) for k, v in counts.items() if isinstance(v, int | float)]
            samples = counts.get("images")
        else:
            inner = manifest.get("figures") or {}
            figures = [(k, v) for k, v in inner.items() if isinstance(v, int | float)]
            samples = manifest.get("samples", inner.get("samples"))
        if samples is None:
            continue
        rows.append(
            {
                "name": name,
                "dir": str(sources.stage_dirs[name]),
                "samples": int(samples),
                "figures": figures,
            }
        )
    return rows


def _class_names(sources: Sources) -> tuple[list[str] | None, int | None]:
    """The detector's class names from the featurize manifest, when a sample's json lacks them."""
    detector = (sources.stages.get("featurize") or {}).get("detector") or {}
    return detector.get("class_names"), detector.get("cls_prob_background_column")


def _scene_graph(sg: dict | None) -> dict[str, list[str]] | None:
    if not isinstance(sg, dict):
        return None
    names = {o.get("id"): str(o.get("name")) for o in sg.get("objects") or []}
    attributes: dict[Any, list[str]] = {}
    for a in sg.get("attributes") or []:
        attributes.setdefault(a.get("object"), []).append(str(a.get("name")))
    objects = [
        f"{name} ({', '.join(attributes[i])})" if attributes.get(i) else name
        for i, name in names.items()
    ]
    relations = [
        f"{names.get(r.get('subject'), '?')} — {r.get('name')} → {names.get(r.get('object'), '?')}"
        for r in sg.get("relations") or []
    ]
    return {"objects": objects, "relations": relations}


def _card(raw: dict[str, Any], fallback_names: tuple[list[str] | None, int | None]) -> dict:
    meta = raw["meta"] if isinstance(raw["meta"], dict) else {}
    regions = meta.get("regions") if isinstance(meta.get("regions"), dict) else {}
    names = regions.get("class_names") or fallback_names[0]
    background = regions.get("cls_prob_background_column", fallback_names[1])
    boxes = label_boxes(raw["boxes"], raw["cls_prob"], names, background)
    drawn = boxes_to_draw(boxes)
    image = None
    display_w = display_h = 0
    if raw["image"]:
        try:
            image, width, height = draw_boxes(raw["image"], drawn)
            scale = DISPLAY_SIDE / max(width, height)
            display_w, display_h = round(width * scale), round(height * scale)
        except (OSError, ValueError):  # an undecodable image still gets its card
            image = None
    size = ""
    if meta.get("original_width") and meta.get("width"):
        size = (
            f"{meta['original_width']}×{meta.get('original_height')} → "
            f"{meta['width']}×{meta.get('height')}"
        )
    mine = raw["mine"] if isinstance(raw["mine"], dict) else {}
    tags = [t for t in raw["tags"] if isinstance(t, dict)] if isinstance(raw["tags"], list) else []
    return {
        "key": raw["key"],
        "image": image,
        "display_w": display_w,
        "display_h": display_h,
        "caption": raw["caption"],
        "size": size,
        "host": host_of(meta.get("url")) if meta.get("url") else "",
        "boxes": drawn,
        "n_boxes": len(boxes),
        "tags": [
            {
                "name": t.get("name"),
                "score": f"{float(t.get('score', 0)):.2f}",
                "attributes": [str(a.get("name")) for a in t.get("attributes") or []],
            }
            for t in tags
        ],
        "sg": _scene_graph(raw["sg"]),
        "negatives": [
            {"caption": n.get("caption"), "score": f"{float(n.get('score', 0)):.3f}"}
            for n in mine.get("hard_negatives") or []
        ],
        "rewrites": [
            {
                "caption": r.get("caption"),
                "kind": r.get("kind"),
                "change": f"{r.get('from')} → {r.get('to')}",
            }
            for r in mine.get("rewrites") or []
        ],
        "positives": [
            {"caption": p.get("caption"), "score": f"{float(p.get('score', 0)):.3f}"}
            for p in mine.get("positives") or []
        ],
    }


def _distribution_plots(corpus: CorpusFigures, shard: ShardFigures) -> list:
    kept = corpus.kept
    out = [
        plots.scatter(
            kept["original_width"],
            kept["original_height"],
            "original image sizes",
            "width (px)",
            "height (px)",
        ),
        plots.histogram(kept["aspect"], "aspect ratio (width / height)", "aspect ratio"),
        plots.histogram(kept["caption_words"], "caption length (words)", "words"),
        plots.histogram(kept["caption_chars"], "caption length (characters)", "characters"),
    ]
    if corpus.languages:
        top = list(corpus.languages.items())[:TOP_LANGUAGES]
        out.append(plots.bars([k for k, _ in top], [v for _, v in top], "languages", "samples"))
    if shard.tags:
        top = shard.tags.most_common(TOP_TAGS)
        out.append(plots.bars([k for k, _ in top], [v for _, v in top], "tag frequencies", "tags"))
    if shard.boxes_per_image:
        out.append(plots.histogram(shard.boxes_per_image, "boxes per image", "boxes"))
    if shard.sg_objects:
        out.append(plots.histogram(shard.sg_objects, "scene graph: objects", "objects"))
        out.append(plots.histogram(shard.sg_attributes, "scene graph: attributes", "attributes"))
        out.append(plots.histogram(shard.sg_relations, "scene graph: relations", "relations"))
    if shard.hard_negatives:
        out.append(plots.histogram(shard.hard_negatives, "hard negatives per sample", "negatives"))
        out.append(plots.histogram(shard.rewrites, "rewrites per sample", "rewrites"))
    return [svg(s) for s in out]


def _run_context(run: RunFigures) -> dict[str, Any]:
    charts: list[str] = []
    losses = {k: run.train[k] for k in ("loss", *run.task_keys) if k in run.train}
    if losses:
        charts.append(plots.lines(losses, "loss per task", "loss"))
    for key, title, log_y in (
        ("lr", "learning rate", False),
        ("samples_per_s", "throughput", False),
        ("grad_norm", "gradient norm", True),
    ):
        if key in run.train:
            charts.append(plots.lines({key: run.train[key]}, title, key, log_y=log_y))
    metrics = {k: s for k, s in run.eval.items() if not k.endswith("_n")}
    if metrics:
        charts.append(plots.lines(metrics, "evaluation metrics", "value"))
    load_keys = run.moe_load_keys
    if load_keys:
        if len(load_keys) <= MAX_EXPERT_LINES:
            charts.append(
                plots.lines({k: run.train[k] for k in load_keys}, "MoE load per expert", "load")
            )
        charts.append(
            plots.expert_load(
                load_keys,
                [run.train[k].values[-1] for k in load_keys],
                f"MoE load per expert at step {max(run.train[k].steps[-1] for k in load_keys)}",
            )
        )
    if run.moe_other_keys:
        charts.append(
            plots.lines({k: run.train[k] for k in run.moe_other_keys}, "MoE routing", "value")
        )

    def table(series: dict[str, Series]) -> list[dict[str, Any]]:
        return [
            {
                "key": k,
                "step": s.steps[-1],
                "last": s.values[-1],
                "min": min(s.values),
                "max": max(s.values),
            }
            for k, s in sorted(series.items())
            if s.values
        ]

    return {
        "path": str(run.path),
        "records": run.records,
        "last_step": run.last_step,
        "config": [(k, run.config[k]) for k in RUN_CONFIG_KEYS if k in run.config],
        "plots": [svg(c) for c in charts],
        "train_table": table(run.train),
        "eval_table": table(run.eval),
    }


def write_report(
    corpus: Path,
    run: Path | None = None,
    out: Path = Path("report"),
    shards: str | None = None,
    grid_samples: int = GRID_SAMPLES,
    max_scan: int = 20_000,
    progress: Callable[[str], None] | None = print_progress,
) -> Path:
    """Write OUT/index.html for the corpus (and the training run, when given); returns its path.

    `shards` chooses the samples to browse (a directory, glob, brace pattern or `::` list);
    without it the latest stage next to the corpus (mined, featurized, else the corpus) is used.
    Bad input raises UserError with a one-line message.
    """
    say = progress or (lambda _message: None)
    started = time.time()
    sources = locate(Path(corpus), Path(run) if run is not None else None, shards)
    say(f"corpus {sources.corpus}: reading manifest.json and stats.parquet")
    if not (sources.corpus / "stats.parquet").exists():  # a dataset directory (or older file)
        raise UserError(f"--corpus {sources.corpus}: stats.parquet is missing")
    figures = corpus_figures(sources.corpus, sources.manifest)
    say(f"scanning {len(sources.shards)} shard(s) from the {sources.shard_origin}")
    step = max(1, math.ceil(len(sources.shards) / 5))  # about five progress lines
    shard = scan_shards(
        sources.shards,
        grid_size=grid_samples,
        max_scan=max_scan,
        progress=lambda i, n: say(f"  shard {i}/{n}") if i % step == 0 or i == n else None,
    )
    say(f"drawing {len(shard.grid)} samples and the plots")
    fallback = _class_names(sources)
    cards = [_card(raw, fallback) for raw in shard.grid]
    run_context = None
    if sources.run is not None:
        say(f"training run {sources.run}: reading metrics.jsonl")
        run_context = _run_context(read_run(sources.run))
    funnel_svg = plots.funnel(
        [s.stage for s in figures.funnel], [s.remaining for s in figures.funnel], "filter funnel"
    )
    reasons = sorted(
        ((k, v) for k, v in figures.reason_counts.items() if not k.startswith("ok:")),
        key=lambda kv: (-kv[1], kv[0]),
    )
    reasons_svg = plots.bars(
        [k for k, _ in reasons], [v for _, v in reasons], "rows removed, by status:reason"
    )
    context = {
        "title": f"vlforge report: {sources.corpus.name}",
        "corpus_dir": str(sources.corpus),
        "shard_origin": sources.shard_origin,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "version": __version__,
        "corpus": figures,
        "stages": _stage_rows(sources),
        "plots": {"funnel": svg(funnel_svg), "reasons": svg(reasons_svg)},
        "distribution_plots": _distribution_plots(figures, shard),
        "top_tags": shard.tags.most_common(TOP_TAGS),
        "languages": list(figures.languages.items())[:TOP_LANGUAGES],
        "shard": shard,
        "samples": cards,
        "pages": [cards[i : i + PAGE_SIZE] for i in range(0, len(cards), PAGE_SIZE)],
        "run": run_context,
    }
    html = render_page(context)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)  # a reader never sees half a page
    say(f"wrote {path} ({len(html) / 1e6:.1f} MB) in {time.time() - started:.1f} s")
    return path
