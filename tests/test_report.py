"""`vlforge report`: the page's numbers agree with manifest.json and metrics.jsonl, and it loads in
headless Chromium without console errors and renders something visible.

The fixture is a tiny pipeline tree like runs/demo: a crawl output (stats.parquet and a manifest
computed as vlforge.pipeline.corpus does), a featurized directory and a mined one whose shards
come from test_train_data.make_shards (every sample field), plus a metrics.jsonl with task
losses, evaluation records and MoE load figures.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from PIL import Image
from test_train_data import make_shards

from vlforge.pipeline.funnel import funnel_counts
from vlforge.report import write_report
from vlforge.report.browser import find_chromium, load_page
from vlforge.report.sources import locate
from vlforge.train.data import iter_shard

SETUP_SCRIPT = Path(__file__).with_name("setup_chromium.sh")
N_SHARDS, PER_SHARD = 3, 20
# (status, reason, host, rows) of the rows that did not make it, on purpose several hosts.
LOST = [
    ("failed", "http_404", "c.example", 5),
    ("failed", "timeout", "a.example", 2),
    ("blocked", "robots_txt", "c.example", 4),
    ("filtered", "caption_too_short", "b.example", 3),
    ("filtered", "min_side", "a.example", 2),
    ("duplicate", "duplicate_url", "b.example", 2),
    ("duplicate", "duplicate_image", "a.example", 1),
]
MOE_EXPERTS = 4


def _stats_table(shard_dir: Path) -> pa.Table:
    rows = []
    for url in sorted(str(p) for p in shard_dir.glob("*.tar")):
        for sample in iter_shard(url):
            rows.append(
                {
                    "status": "ok",
                    "reason": None,
                    "host": "a.example" if len(rows) % 3 else "b.example",
                    "caption": sample["txt"].decode(),
                    "language": "en" if len(rows) % 7 else "de",
                    "original_width": 300 + 7 * len(rows),
                    "original_height": 200 + 3 * len(rows),
                    "shard": Path(url).stem,
                }
            )
    for status, reason, host, n in LOST:
        for _ in range(n):
            rows.append(
                {
                    "status": status,
                    "reason": reason,
                    "host": host,
                    "caption": "lost row",
                    "language": "en",
                    "original_width": None,
                    "original_height": None,
                    "shard": None,
                }
            )
    n = len(rows)
    return pa.table(
        {
            "row_id": list(range(n)),
            "key": [f"{i:016x}" for i in range(n)],
            "url": [f"http://{r['host']}/img/{i}.jpg" for i, r in enumerate(rows)],
            "caption": [r["caption"] for r in rows],
            "status": [r["status"] for r in rows],
            "reason": [r["reason"] for r in rows],
            "language": [r["language"] for r in rows],
            "original_width": pa.array([r["original_width"] for r in rows], pa.int32()),
            "original_height": pa.array([r["original_height"] for r in rows], pa.int32()),
            "width": pa.array([32 if r["status"] == "ok" else None for r in rows], pa.int32()),
            "height": pa.array([32 if r["status"] == "ok" else None for r in rows], pa.int32()),
            "shard": [r["shard"] for r in rows],
        }
    )


def _corpus_manifest(stats: pa.Table, shard_dir: Path) -> dict:
    """The figures vlforge.pipeline.corpus._manifest writes, computed the same way."""
    statuses = stats.column("status").to_pylist()
    reasons = stats.column("reason").to_pylist()
    shards = Counter(s for s in stats.column("shard").to_pylist() if s)
    return {
        "stage": "corpus",
        "config": {"out": "corpus", "prefix": "train"},
        "rows": stats.num_rows,
        "http_requests": stats.num_rows + 7,
        "status_counts": dict(Counter(statuses)),
        "reason_counts": dict(
            Counter(f"{s}:{r or '-'}" for s, r in zip(statuses, reasons, strict=True))
        ),
        "funnel": funnel_counts(stats),
        "shards": [{"shard": k, "samples": v} for k, v in sorted(shards.items())],
        "samples": statuses.count("ok"),
        "timings": {"crawl_s": 1.25, "total_s": 2.5},
    }


def _metrics() -> list[dict]:
    records = []
    for step in range(10, 110, 10):
        record = {
            "step": step,
            "loss": 3.0 / step**0.5,
            "itm": 0.7 - step / 1000,
            "lr": 1e-3 * step / 100,
            "samples_per_s": 250.0 + step,
            "grad_norm": 2.0 + step / 100,
            "moe_dropped": 0.01 * (step % 30),
        }
        if step % 20 == 0:  # a sampled task logs only on its steps
            record["mlm"] = 6.0 - step / 50
        for e in range(MOE_EXPERTS):
            record[f"moe_load_{e}"] = 0.25 + 0.01 * (e - 1.5) * (100 - step) / 100
        records.append(record)
        if step % 50 == 0:
            records.append(
                {"step": step, "eval": {"itm_accuracy": 0.5 + step / 400, "itm_n": 64, "r@1": 0.1}}
            )
    return records


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("report")
    mined = root / "mined"
    make_shards(mined, n_shards=N_SHARDS, per_shard=PER_SHARD, size=48)
    corpus = root / "corpus"
    corpus.mkdir()
    stats = _stats_table(mined)
    pq.write_table(stats, corpus / "stats.parquet")
    manifest = _corpus_manifest(stats, mined)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    featurized = root / "featurized"
    featurized.mkdir()
    n_samples = N_SHARDS * PER_SHARD
    (featurized / "manifest.json").write_text(
        json.dumps(
            {"stage": "featurize", "config": {"in": str(corpus)}, "counts": {"images": n_samples}}
        )
    )
    (mined / "manifest.json").write_text(
        json.dumps(
            {
                "stage": "mine",
                "config": {"in": str(featurized)},
                "samples": n_samples,
                "figures": {"n_hard_negatives": n_samples},
            }
        )
    )
    run = root / "train"
    run.mkdir()
    metrics = _metrics()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    (run / "config.json").write_text(json.dumps({"recipe": "uniter", "steps": 100}))
    page = write_report(corpus, run, root / "report")
    return {
        "root": root,
        "corpus": corpus,
        "mined": mined,
        "run": run,
        "manifest": manifest,
        "stats": stats,
        "metrics": metrics,
        "page": page,
        "html": page.read_text(),
    }


class _Metrics(HTMLParser):
    """data-metric → (data-value, shown text) of every figure on the page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, tuple[str, str]] = {}
        self._open: tuple[str, str] | None = None
        self._text: list[str] = []
        self.images: list[str] = []
        self.samples = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if "data-metric" in a:
            assert a["data-metric"] not in self.found, f"duplicate metric {a['data-metric']}"
            self._open, self._text = (a["data-metric"], a["data-value"]), []
        if tag == "img":
            self.images.append(a.get("src", ""))
        if "sample" in (a.get("class") or "").split():
            self.samples += 1

    def handle_data(self, data: str) -> None:
        if self._open:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if self._open and tag == "span":
            self.found[self._open[0]] = (self._open[1], "".join(self._text))
            self._open = None


def _parse(html: str) -> _Metrics:
    parser = _Metrics()
    parser.feed(html)
    return parser


def test_corpus_numbers_match_manifest(tree):
    found = _parse(tree["html"]).found
    manifest = tree["manifest"]

    def value(metric: str) -> int:
        assert metric in found, f"{metric} not on the page"
        raw, shown = found[metric]
        assert shown == f"{int(raw):,}", f"{metric}: shows {shown!r} for {raw}"
        return int(raw)

    assert value("corpus.rows") == manifest["rows"]
    assert value("corpus.samples") == manifest["samples"] == N_SHARDS * PER_SHARD
    assert value("corpus.shards") == len(manifest["shards"]) == N_SHARDS
    assert value("corpus.http_requests") == manifest["http_requests"]
    for status, n in manifest["status_counts"].items():
        assert value(f"status.{status}") == n
    for name, n in manifest["reason_counts"].items():
        assert value(f"reason.{name}") == n
    for step in manifest["funnel"]:
        assert value(f"funnel.{step['stage']}.remaining") == step["remaining"]
        assert value(f"funnel.{step['stage']}.removed") == step["removed"]
        # The reasons listed under a stage account for exactly the rows it removed.
        prefix = f"funnel.{step['stage']}."
        listed = [
            int(v)
            for k, (v, _) in found.items()
            if k.startswith(prefix) and ":" in k[len(prefix) :]
        ]
        assert sum(listed) == step["removed"], step["stage"]
    assert value(f"funnel.written to {N_SHARDS} shard(s).remaining") == manifest["samples"]
    assert value("stage.featurize.samples") == value("stage.mine.samples") == manifest["samples"]
    # Failures by host, against the stats table itself.
    for status, reason, host, n in LOST:
        assert value(f"host.{host}.{status}:{reason}") == n
    assert value("host.c.example.not_ok") == 9 and value("host.c.example.ok") == 0
    assert value("language.de") == sum(1 for i in range(manifest["samples"]) if i % 7 == 0)
    assert float(found["timing.crawl_s"][0]) == 1.25


def test_shard_figures_and_samples(tree):
    parsed = _parse(tree["html"])
    # Tag frequencies against an independent read of the shards (the training loader's reader).
    tags: Counter = Counter()
    for url in sorted(str(p) for p in tree["mined"].glob("*.tar")):
        for sample in iter_shard(url):
            tags.update(t["name"] for t in json.loads(sample["tags.json"])["tags"])
    for name, n in tags.items():
        assert int(parsed.found[f"tag.{name}"][0]) == n
    # 60 samples: the grid shows 48 in 4 pages, spread over every shard, each with its image
    # (boxes drawn) inline.
    assert parsed.samples == 48
    assert tree["html"].count('class="grid page"') == 4
    assert len(parsed.images) == 48 and all(
        src.startswith("data:image/jpeg;base64,") for src in parsed.images
    )
    shown_keys = re.findall(r'id="sample-([^"]+)"', tree["html"])
    assert {k[:3] for k in shown_keys} == {f"k{s:02d}" for s in range(N_SHARDS)}
    # Mined hard negatives and scene graphs are beside the caption.
    assert "hard negatives" in tree["html"] and "scene graph" in tree["html"]
    # Self-contained: nothing is fetched from anywhere.
    for needle in ('src="http', "src='http", 'href="http', '<link rel="stylesheet', "@import"):
        assert needle not in tree["html"]


def test_run_numbers_match_metrics(tree):
    found = _parse(tree["html"]).found
    train = [r for r in tree["metrics"] if "eval" not in r]
    evals = [r for r in tree["metrics"] if "eval" in r]
    keys = {k for r in train for k in r if k != "step"}
    for key in keys:
        series = [r[key] for r in train if key in r]
        assert float(found[f"run.last.{key}"][0]) == series[-1], key
        assert float(found[f"run.min.{key}"][0]) == min(series), key
    for key in evals[-1]["eval"]:
        assert float(found[f"eval.last.{key}"][0]) == evals[-1]["eval"][key]
        assert float(found[f"eval.max.{key}"][0]) == max(r["eval"][key] for r in evals)
    assert int(found["run.last_step"][0]) == 100
    assert int(found["run.records"][0]) == len(tree["metrics"])
    html = tree["html"]
    for title in ("loss per task", "learning rate", "throughput", "evaluation metrics"):
        assert f">{title}</text>" in html, title
    # One series per expert, and the load at the last step as bars.
    assert ">MoE load per expert</text>" in html
    assert ">MoE load per expert at step 100</text>" in html
    assert all(f">moe_load_{e}</text>" in html for e in range(MOE_EXPERTS))


@pytest.fixture(scope="session")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        done = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True)
        found = find_chromium()
        if found is None:
            pytest.fail(
                "chromium is missing and tests/setup_chromium.sh could not install it: "
                + (done.stderr or done.stdout)[-500:]
            )
    return found


def test_page_loads_in_chromium_without_console_errors(tree, chromium, tmp_path):
    shot = tmp_path / "page.png"
    load = load_page(
        tree["page"],
        shot,
        width=1200,
        height=1400,
        chromium=chromium,
        expressions={
            "metrics": "document.querySelectorAll('[data-metric]').length",
            "visible_pages": "[...document.querySelectorAll('.page')].filter(p => !p.hidden)"
            ".map(p => p.dataset.page)",
            "broken_images": "[...document.images].filter(i => !(i.complete && i.naturalWidth))"
            ".length",
            "svgs": "document.querySelectorAll('.plot svg').length",
            # The pager: a click on page 3 shows it and hides the first.
            "after_click": "document.querySelector('#pager button[data-page=\"2\"]').click(),"
            "[...document.querySelectorAll('.page')].filter(p => !p.hidden).map(p => p.dataset.page)",
        },
    )
    assert load.errors == [], load.errors
    assert load.values["metrics"] == len(_parse(tree["html"]).found)
    assert load.values["visible_pages"] == ["0"]
    assert load.values["after_click"] == ["2"]
    assert load.values["broken_images"] == 0
    assert load.values["svgs"] >= 10
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (1400, 1200)
    assert pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, plots, header colours


def test_browser_check_reports_console_errors(tmp_path, chromium):
    """The check must see errors, or its silence above would prove nothing."""
    page = tmp_path / "broken.html"
    page.write_text(
        '<!doctype html><html><head><link rel="icon" href="data:,"></head><body>'
        '<img src="missing.png"><script>console.error("boom"); notDefined();</script>'
        "</body></html>"
    )
    load = load_page(page, chromium=chromium)
    texts = " | ".join(m.text for m in load.errors)
    assert "boom" in texts and "notDefined" in texts and "ERR_FILE_NOT_FOUND" in texts


def test_cli_explicit_shards_and_summary(tree, tmp_path):
    pattern = str(tree["mined"] / f"train-{{000000..{N_SHARDS - 2:06d}}}.tar")
    code, out, err = run_cli(
        "report", "--corpus", str(tree["corpus"]), "--shards", pattern,
        "--out", str(tmp_path / "r"), "--samples", "6",
    )  # fmt: skip
    assert code == 0, err
    page = tmp_path / "r" / "index.html"
    assert out.strip().splitlines()[-1].startswith(f"vlforge report: wrote {page}")
    assert "scanning 2 shard(s)" in err  # progress on stderr
    parsed = _parse(page.read_text())
    assert parsed.samples == 6
    assert 'id="training"' not in page.read_text()  # no --run, no training section


def test_locate_follows_the_stage_chain(tree):
    # From the crawl output: the latest stage next to it is browsed.
    found = locate(tree["corpus"])
    assert found.stage_dirs["mine"].resolve() == tree["mined"].resolve()
    assert [p.name for p in found.shards] == [f"train-{s:06d}.tar" for s in range(N_SHARDS)]
    # From the mined directory: its manifest leads back to the crawl output.
    back = locate(tree["mined"])
    assert back.corpus.resolve() == tree["corpus"].resolve()
    assert back.manifest["rows"] == tree["manifest"]["rows"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--corpus", "{root}/nowhere"], "no such directory"),
        (["--corpus", "{root}/train"], "not a corpus directory"),
        (["--corpus", "{root}/corpus", "--run", "{root}/corpus"], "no metrics.jsonl"),
        (["--corpus", "{root}/corpus", "--shards", "{root}/none-*.tar"], "no .tar shards"),
    ],
)
def test_bad_input_is_one_line(tree, args, message, tmp_path):
    argv = [a.format(root=tree["root"]) for a in args]
    code, out, err = run_cli("report", *argv, "--out", str(tmp_path / "r"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vlforge: error:") and message in err, err
    assert not (tmp_path / "r" / "index.html").exists()
