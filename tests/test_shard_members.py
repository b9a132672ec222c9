"""Corpus shard members: what webdataset reads back, in plain ustar (no pax header per member)."""

from __future__ import annotations

import json
import tarfile

import webdataset as wds

from vlforge.pipeline.mine_tar import BLOCK, end_of_archive
from vlforge.pipeline.shard_writer import sample_members


def _padded(n: int) -> int:
    return n + (-n % BLOCK)


def test_members_read_back_by_webdataset_and_tarfile(tmp_path):
    samples = [
        ("00aa", b"\xff\xd8jpeg-bytes\xff\xd9", "a red square", {"row_id": 0}),
        (
            "00bb",
            b"\xff\xd8other\xff\xd9" * 300,
            "ein blaues Quadrat über dem Kreis",
            {"row_id": 7},
        ),
    ]
    body = b"".join(sample_members(*s) for s in samples)
    path = tmp_path / "s.tar"
    path.write_bytes(body + end_of_archive(len(body)))
    got = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [(g["__key__"], g["jpg"], g["txt"].decode(), json.loads(g["json"])) for g in got] == [
        (k, jpg, txt, meta) for k, jpg, txt, meta in samples
    ]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        f"{k}.{ext}" for k, *_ in samples for ext in ("jpg", "json", "txt")
    ]
    assert {(m.mode, m.uname, m.mtime) for m in members} == {(0o444, "bigdata", 1_700_000_000)}
    # One 512-byte header per member and nothing else: a float mtime would add a pax header each.
    payload = sum(BLOCK + _padded(m.size) for m in members)
    assert len(body) == payload
