"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing lost."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest


def _vlforge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlforge.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    base = tmp_path_factory.mktemp("lists")
    pd.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a red star"]}).to_parquet(
        base / "good.parquet"
    )
    pd.DataFrame({"link": ["x"]}).to_parquet(base / "nocol.parquet")
    (base / "broken.parquet").write_bytes(b"PAR1garbage")
    (base / "empty.csv").write_text("url,caption\n")
    return base


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["corpus", "--urls", "{b}/missing.parquet", "--out", "{b}/o"], "no such file"),
        (["corpus", "--urls", "{b}/nocol.parquet", "--out", "{b}/o"], "no column 'url'"),
        (["corpus", "--urls", "{b}/broken.parquet", "--out", "{b}/o"], "not a readable parquet"),
        (["corpus", "--urls", "{b}/empty.csv", "--out", "{b}/o"], "has no rows"),
        (["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--bogus"], "unrecognized"),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--threads", "0"],
            "at least 1",
        ),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--image-threads", "0"],
            "--image-threads must be at least 1",
        ),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--preset", "x"],
            "unknown filter preset",
        ),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--allow-private", "zz"],
            "not a network",
        ),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--resize-mode", "x"],
            "resize-mode",
        ),
        (["corpus", "--out", "{b}/o"], "required"),
        (
            ["corpus", "--urls", "{b}/good.parquet", "--out", "{b}/o", "--shard-size", "x"],
            "invalid int",
        ),
    ],
)
def test_bad_input_is_one_line(lists, args, message):
    result = _vlforge(*[a.format(b=lists) for a in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_bad_flag_on_an_existing_run_keeps_its_files(lists, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    result = _vlforge("corpus", "--urls", str(lists / "nocol.parquet"), "--out", str(out))
    assert result.returncode == 2
    assert (out / "manifest.json").read_text() == "{}"
