"""Planning from metadata: the launcher reads footers/headers only, the workers read the rows.

Pieces read back in any cut equal the whole list; repeated URLs are marked across pieces and
files by a keyed step (the lowest row id wins); row ids and chunks follow the lists' order.
"""

from __future__ import annotations

import json

import apache_beam as beam
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.io.filesystems import FileSystems

from vlforge.errors import UserError
from vlforge.pipeline import input_lists
from vlforge.pipeline.input_lists import count_piece, inspect_list, iter_piece, read_rows
from vlforge.pipeline.input_splits import number_pieces, plan_pieces
from vlforge.pipeline.work_plan import InputSpec, prepare


def _run(build, _items: int) -> None:
    with beam.Pipeline() as pipeline:
        build(pipeline)


def _plan(out, paths: list[str], chunk_size: int, dedup_urls: bool = True):
    files = [inspect_list(p) for p in paths]
    spec = InputSpec("lists", files, dedup_urls=dedup_urls)
    return prepare(str(out), spec, chunk_size, {"s": 1}, False, _run)


def _chunks(plan) -> list[dict]:
    rows = []
    for chunk in range(plan.n_chunks):
        rows.extend(pq.read_table(plan.input_path(chunk)).to_pylist())
    return rows


def _parquet(path, n: int, row_group: int, start: int = 0) -> str:
    urls = [f"http://h{(start + i) % 97}.example/{start + i}.jpg" for i in range(n)]
    table = pa.table({"url": urls, "caption": [f"cap {start + i}" for i in range(n)]})
    pq.write_table(table, path, row_group_size=row_group)
    return str(path)


class _CountingOpen:
    """FileSystems.open that counts the bytes read through it."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        original = FileSystems.open
        counter = self

        class Handle:
            def __init__(self, inner):
                self.inner = inner

            def read(self, *args):
                data = self.inner.read(*args)
                counter.bytes += len(data)
                return data

            def readline(self, *args):
                data = self.inner.readline(*args)
                counter.bytes += len(data)
                return data

            def __iter__(self):
                for line in self.inner:
                    counter.bytes += len(line)
                    yield line

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.inner.close()

        monkeypatch.setattr(
            input_lists.FileSystems, "open", lambda *a, **k: Handle(original(*a, **k))
        )


def test_the_launcher_plans_a_large_list_from_its_footer(tmp_path, monkeypatch):
    small = _parquet(tmp_path / "small.parquet", 2_000, 500)
    large = _parquet(tmp_path / "large.parquet", 200_000, 5_000)
    counting = _CountingOpen(monkeypatch)
    files = [inspect_list(small), inspect_list(large)]
    pieces, n_rows, n_chunks = number_pieces(plan_pieces(files, 1_000), 1_000)
    # Two 64 KiB digest reads and a footer per file, however many rows the file holds.
    assert counting.bytes < 4 * 64 * 1024 + 2 * 64 * 1024
    assert (tmp_path / "large.parquet").stat().st_size > 10 * counting.bytes
    assert n_rows == 202_000 and n_chunks == 202
    assert [p.row_groups for p in pieces[:2]] == [(0, 2), (2, 4)]  # row groups run to a chunk
    assert pieces[2].first_row == 2_000 and pieces[2].row_groups == (0, 1)
    assert pieces[-1].first_row + pieces[-1].n_rows == n_rows


@pytest.mark.parametrize("piece_bytes", [1, 37, 200, 10_000])
def test_jsonl_byte_ranges_cut_anywhere_read_back_every_row_once(tmp_path, piece_bytes):
    path = tmp_path / "l.jsonl"
    lines = [
        json.dumps({"url": f"http://x/{i}", "caption": "ü\\n" * (i % 5), "k": [i, {"a": i}]})
        for i in range(40)
    ]
    lines.insert(7, "")
    lines.insert(20, "   ")
    path.write_text("\n".join(lines) + "\n")
    pieces = plan_pieces([inspect_list(str(path))], 1, jsonl_bytes=piece_bytes)
    rows = []
    for piece in pieces:
        piece = count_piece(piece, "url")
        got = [r for batch in iter_piece(piece, "url", "caption") for r in batch]
        assert len(got) == piece.n_rows
        rows.extend(got)
    assert [r[0] for r in rows] == [f"http://x/{i}" for i in range(40)]
    assert [json.loads(r[2])["k"][1]["a"] for r in rows] == list(range(40))


def test_csv_with_newlines_in_quoted_fields_equals_pandas(tmp_path):
    df = pd.DataFrame(
        {
            "url": [f"http://x/{i}" for i in range(30)],
            "caption": [f'line one, "{i}"\nline two' if i % 3 else f"plain {i}" for i in range(30)],
            "score": [i / 4 for i in range(30)],
            "tag": ["007" if i % 2 else "a" for i in range(30)],
        }
    )
    df.to_csv(tmp_path / "l.csv", index=False)
    table = read_rows(str(tmp_path / "l.csv"))
    assert table.column("caption").to_pylist() == df["caption"].tolist()
    extras = [json.loads(e) for e in table.column("extra").to_pylist()]
    assert [e["score"] for e in extras] == df["score"].tolist()
    assert extras[1]["tag"] == 7 and extras[0]["tag"] == "a"  # per value, not per column


def test_repeated_urls_across_pieces_and_files_keep_the_first(tmp_path):
    a = tmp_path / "a.parquet"
    urls_a = ["http://x.org/a.jpg", "http://X.org:80/a.jpg", "http://x.org/b.jpg"] * 3
    pq.write_table(pa.table({"url": urls_a, "caption": ["c"] * 9}), a, row_group_size=2)
    b = tmp_path / "b.jsonl"
    b.write_text(
        "\n".join(json.dumps({"url": u, "caption": "d"}) for u in ["http://x.org/b.jpg#f", "n"])
    )
    plan = _plan(tmp_path / "out", [str(a), str(b)], chunk_size=2)
    rows = _chunks(plan)
    assert [r["row_id"] for r in rows] == list(range(11))
    assert [r["dup_of"] for r in rows] == [-1, 0, -1, 0, 0, 2, 0, 0, 2, 2, -1]
    assert rows[9]["source"] == str(b) and rows[0]["source"] == str(a)
    assert len({r["key"] for r in rows}) == 3  # a, b and "n"
    assert plan.n_chunks == 6  # row groups 2+2+2+2+1 rows, then the jsonl file's 2 rows
    unmarked = _chunks(_plan(tmp_path / "out2", [str(a), str(b)], 2, dedup_urls=False))
    assert {r["dup_of"] for r in unmarked} == {-1}


def test_a_rerun_reads_no_row_and_a_changed_list_is_refused(tmp_path, monkeypatch):
    path = _parquet(tmp_path / "l.parquet", 50, 10)
    plan = _plan(tmp_path / "out", [path], chunk_size=20)
    assert (plan.n_rows, plan.n_chunks) == (50, 3)  # pieces of 20, 20 and 10 rows

    def no_rows(*_args, **_kwargs):
        raise AssertionError("a rerun read the rows")

    monkeypatch.setattr(input_lists, "iter_piece", no_rows)
    assert _plan(tmp_path / "out", [path], chunk_size=20) == plan
    monkeypatch.undo()
    _parquet(tmp_path / "l.parquet", 50, 10, start=1)
    with pytest.raises(UserError, match="different list"):
        _plan(tmp_path / "out", [path], chunk_size=20)


def test_a_malformed_row_deep_in_a_list_is_one_error_line(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text("".join(f'{{"url": "u{i}", "caption": "c"}}\n' for i in range(20)) + "{oops\n")
    with pytest.raises(UserError, match="not a readable jsonl list") as info:
        _plan(tmp_path / "out", [str(path)], chunk_size=5)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out" / "_work" / "plan.json").exists()
