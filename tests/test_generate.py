"""`vlforge generate`: the generator registry, the CLI's one-line errors, and UNIMO captioning —
a tiny run trained on four images memorises their captions and greedy/beam decoding with the
seq2seq mask gives them back, one caption per image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from tests.conftest import run_cli
from vlforge.errors import UserError
from vlforge.train import generators
from vlforge.train.generators import list_generators, register_generator, run_generate

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = [
    "a red circle left of a blue square",
    "two green stars above a yellow moon",
    "the small square sits below the big triangle",
    "one blue moon and a red star",
]


def write_shards(root: Path) -> str:
    """One shard of four samples whose region features tell the images apart."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(root / "cap-000000.tar")) as w:
        for i, caption in enumerate(CAPTIONS):
            feats = rng.normal(size=(3, 16)).astype(np.float32) * 0.1
            feats[:, i] += 2.0
            boxes = np.array([[0, 0, 16, 16], [8, 8, 30, 30], [2, 20, 12, 31]], np.float32)
            prob = rng.dirichlet(np.ones(5), size=3).astype(np.float16)
            w.write(
                {
                    "__key__": f"img{i}",
                    "txt": caption,
                    "json": {"width": 32, "height": 32},
                    "boxes.npy": boxes,
                    "feats.npy": feats.astype(np.float16),
                    "cls_prob.npy": prob,
                }
            )
    return str(root / "cap-000000.tar")


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[str, Path]:
    """(shards, run dir) of a seq2seq-only unimo trained 100 steps on the four samples."""
    root = tmp_path_factory.mktemp("gen")
    shards, run = write_shards(root / "data"), root / "run"
    code, _, err = run_cli(
        "train", "--recipe", "unimo", "--shards", shards, "--out", str(run), "--steps", "100",
        "--batch-size", "4", "--workers", "0", "--no-progress", "--shuffle-buffer", "4",
        "--vocab-size", "100", "--lr", "3e-3", "--schedule", "constant", "--log-every", "50",
        "--set", 'tasks={"seq2seq": 1.0}', "--set", "text_only_ratio=0",
        "--set", "image_only_ratio=0",
    )  # fmt: skip
    assert code == 0, err
    return shards, run


def read_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "captions.jsonl").read_text().splitlines()]


def test_greedy_generation_regenerates_the_memorised_captions(memorised, tmp_path):
    shards, run = memorised
    out = tmp_path / "greedy"
    code, stdout, err = run_cli(
        "generate", "--recipe", "unimo", "--ckpt", str(run), "--shards", shards, "--out", str(out)
    )
    assert code == 0, err
    rows = read_rows(out)
    assert [r["key"] for r in rows] == [f"img{i}" for i in range(4)]  # one caption per image
    assert [r["reference"] for r in rows] == CAPTIONS
    assert [r["caption"] for r in rows] == CAPTIONS
    assert json.loads((out / "summary.json").read_text())["exact_match"] == 4
    assert "captioned 4 images" in stdout and "4 exact" in stdout


def test_beam_search_and_limit(memorised, tmp_path):
    shards, run = memorised
    out = tmp_path / "beam"
    code, _, err = run_cli(
        "generate", "--recipe", "unimo", "--ckpt", str(run), "--shards", shards, "--out",
        str(out), "--n", "3", "--limit", "2", "--max-len", "40",
    )  # fmt: skip
    assert code == 0, err
    rows = read_rows(out)
    assert [r["caption"] for r in rows] == CAPTIONS[:2]
    assert json.loads((out / "summary.json").read_text())["decoding"] == "beam 3"


def test_max_len_caps_the_caption(memorised, tmp_path):
    shards, run = memorised
    code, _, err = run_cli(
        "generate", "--recipe", "unimo", "--ckpt", str(run), "--shards", shards,
        "--out", str(tmp_path), "--max-len", "2", "--limit", "1",
    )  # fmt: skip
    assert code == 0, err
    caption = read_rows(tmp_path)[0]["caption"]
    assert caption and CAPTIONS[0].startswith(caption) and len(caption) < len(CAPTIONS[0])


def _one_line_error(code: int, err: str) -> str:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlforge: error:"), err
    assert "Traceback" not in err
    return lines[0]


def test_bad_ckpt_is_one_line_error(tmp_path, memorised):
    shards, _ = memorised
    code, _, err = run_cli(
        "generate", "--recipe", "unimo", "--ckpt", str(tmp_path / "nope"), "--shards", shards,
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert "no checkpoint" in _one_line_error(code, err)
    assert not (tmp_path / "out" / "captions.jsonl").exists()
    code, _, err = run_cli("generate", "--recipe", "nope", "--ckpt", "x", "--out", "y")
    assert "no generator for recipe 'nope'" in _one_line_error(code, err)
    code, _, err = run_cli("generate", "--recipe", "unimo", "--ckpt", "x", "--out", "y")
    assert "--shards" in _one_line_error(code, err)


def test_registry_discovers_and_dispatches(monkeypatch):
    assert "unimo" in list_generators()
    monkeypatch.setattr(generators, "_REGISTRY", dict(generators._REGISTRY))
    seen = []

    @register_generator("toy")
    def toy(args: argparse.Namespace) -> int:
        seen.append(args.out)
        return 0

    with pytest.raises(ValueError, match="registered twice"):
        register_generator("toy")(toy)
    args = argparse.Namespace(recipe="toy", out="o", n=None, limit=None, max_len=None)
    assert run_generate(args) == 0 and seen == ["o"]
    with pytest.raises(UserError, match="--n must be at least 1"):
        run_generate(argparse.Namespace(recipe="toy", out="o", n=0, limit=None, max_len=None))
