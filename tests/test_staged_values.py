"""Staged values: what one mining phase writes and the next reads, without pickle."""

from __future__ import annotations

import importlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.sparse as sp

from tests.test_mine_stage import world_rows, write_shards
from vlforge.pipeline import mine_phases, staged_values
from vlforge.pipeline.mine_scan import scan_shard
from vlforge.pipeline.staged_values import Staged, WithStaged


@staged_values.register
@dataclass
class Inner:
    graph: tuple | None
    names: set


@staged_values.register
@dataclass
class Outer:
    counts: sp.csr_matrix
    ids: np.ndarray
    texts: list[str]
    inner: list[Inner]
    table: dict
    by_pair: dict


@dataclass
class NotRegistered:
    x: int


def _outer() -> Outer:
    return Outer(
        counts=sp.random(5, 2**20, density=1e-5, format="csr", random_state=0, dtype=np.float32),
        ids=np.arange(7, dtype=np.uint64) * 3,
        texts=["a red circle", "$a", ""],
        inner=[Inner(((("square", 2),), (("square", "red"),), ()), {"x", "y"}), Inner(None, set())],
        table={"object": {"circle": {"one": {"circle": 3}}}, "$odd": 1},
        by_pair={("captions", 3): 4},
    )


def test_a_value_comes_back_with_its_types():
    value = _outer()
    back = staged_values.decode(staged_values.encode(value))
    assert isinstance(back, Outer) and isinstance(back.inner[0], Inner)
    assert (back.counts != value.counts).nnz == 0 and back.counts.shape == value.counts.shape
    np.testing.assert_array_equal(back.ids, value.ids)
    assert back.ids.dtype == np.uint64
    assert back.texts == value.texts
    assert back.inner == value.inner  # tuples stay tuples, sets stay sets (hashable graphs)
    assert {back.inner[0].graph} == {value.inner[0].graph}
    assert back.table == value.table and back.by_pair == value.by_pair


def test_a_shard_scan_round_trips(tmp_path):
    """The biggest staged value: every field equal after write and read (mine_phases registers
    the types it stages)."""
    assert mine_phases.WORK_DIR
    parser = importlib.import_module("vlforge.featurize.scene_graph").SceneGraphParser()
    write_shards(tmp_path, world_rows(30), parser)
    scan = scan_shard(str(next(tmp_path.glob("*.tar"))))
    path = staged_values.write(str(tmp_path / "scan.npz"), scan)
    back = staged_values.read(path)
    assert back.keys == scan.keys and back.captions == scan.captions
    assert back.graphs == scan.graphs and back.index.fields == scan.index.fields
    assert back.vocabulary == scan.vocabulary and back.tag_names == scan.tag_names
    np.testing.assert_array_equal(back.index.start, scan.index.start)
    assert (back.caption_counts != scan.caption_counts).nnz == 0


def test_only_registered_types_are_written_or_read():
    with pytest.raises(TypeError, match="not registered"):
        staged_values.encode([NotRegistered(1)])
    with pytest.raises(TypeError, match="object arrays"):
        staged_values.encode(np.array([object()], dtype=object))
    forged = {"$c": "os.system", "f": {"command": "true"}}
    buffer = io.BytesIO()
    np.savez(buffer, __value__=np.frombuffer(json.dumps(forged).encode(), np.uint8))
    with pytest.raises(ValueError, match="unknown type 'os.system'"):
        staged_values.decode(buffer.getvalue())


def test_a_pickled_array_in_a_staged_file_is_refused():
    buffer = io.BytesIO()
    meta = np.frombuffer(json.dumps({"$a": 0}).encode(), np.uint8)
    np.savez(buffer, __value__=meta, a0=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        staged_values.decode(buffer.getvalue())


def test_a_handle_reads_once_per_run(tmp_path, monkeypatch):
    path = staged_values.write(str(tmp_path / "v.npz"), {"n": 1})
    reads = []
    real = staged_values.read
    monkeypatch.setattr(staged_values, "read", lambda p: reads.append(p) or real(p))
    first = Staged(path, "run-1")
    add = WithStaged(lambda element, value, k: element + value["n"] + k, first, args=(10,))
    assert [add(i) for i in range(3)] == [11, 12, 13]
    assert len(reads) == 1  # the value is kept by the worker process
    staged_values.write(path, {"n": 5})  # a later run writes the same path
    assert WithStaged(lambda e, v: e + v["n"], Staged(path, "run-2"))(0) == 5
    assert len(reads) == 2
