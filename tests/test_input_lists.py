"""URL lists in every format, directories and globs, extra columns, and clean errors."""

import json

import pandas as pd
import pytest

from vlforge.errors import UserError
from vlforge.pipeline.input_lists import read_rows
from vlforge.pipeline.urls import normalize_url, sample_key

ROWS = [
    {"url": "http://a.example/1.jpg", "caption": "a red star", "score": 0.5},
    {"url": "http://a.example/2.jpg", "caption": 'two blue, "quoted" squares', "score": 0.7},
]


def _write(df: pd.DataFrame, path):
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    else:
        df.to_json(path, orient="records", lines=True)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_every_format_reads_the_same(tmp_path, suffix):
    path = tmp_path / f"list{suffix}"
    _write(pd.DataFrame(ROWS), path)
    table = read_rows(str(path))
    assert table.column("url").to_pylist() == [r["url"] for r in ROWS]
    assert table.column("caption").to_pylist() == [r["caption"] for r in ROWS]
    assert [json.loads(e)["score"] for e in table.column("extra").to_pylist()] == [0.5, 0.7]


def test_custom_columns_directory_and_glob(tmp_path):
    df = pd.DataFrame(ROWS).rename(columns={"url": "URL", "caption": "TEXT"})
    _write(df.iloc[:1], tmp_path / "a.parquet")
    _write(df.iloc[1:], tmp_path / "b.csv")
    (tmp_path / "notes.txt").write_text("ignored")
    for spec in (str(tmp_path), str(tmp_path / "*")):
        table = read_rows(spec, url_col="URL", caption_col="TEXT")
        assert table.num_rows == 2


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b"PAR1 not really parquet"), "not a readable parquet"),
        (lambda p: pd.DataFrame({"link": ["x"]}).to_parquet(p), "no column 'url'"),
    ],
)
def test_bad_lists_raise_one_line_errors(tmp_path, make, message):
    path = tmp_path / "list.parquet"
    make(path)
    with pytest.raises(UserError, match=message) as info:
        read_rows(str(path))
    assert "\n" not in str(info.value)


def test_unknown_extension(tmp_path):
    path = tmp_path / "list.xlsx"
    path.write_text("x")
    with pytest.raises(UserError, match="no .parquet"):
        read_rows(str(path))


def test_url_normalization():
    assert normalize_url("HTTP://Example.COM:80/a.jpg#frag") == "http://example.com/a.jpg"
    assert normalize_url("https://example.com:8443/a?b=1") == "https://example.com:8443/a?b=1"
    assert sample_key("http://example.com/a.jpg") == sample_key("http://example.com/a.jpg")
    # Repeated URLs are marked by the planning pipeline: tests/test_input_planning.py.


def test_urls_a_browser_treats_as_one_get_one_key():
    same = ["http://Ex.com/a b.jpg", "http://ex.com/a%20b.jpg", "http://ex.com:80/a b.jpg#x"]
    assert len({normalize_url(u) for u in same}) == 1
    assert normalize_url("http://bücher.de/ü.jpg") == "http://xn--bcher-kva.de/%C3%BC.jpg"
    assert normalize_url("http://[foo/x.jpg") == "http://[foo/x.jpg"  # kept; fails at fetch
