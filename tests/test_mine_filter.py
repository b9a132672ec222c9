"""The batched mining pieces agree with the per-sample rules: filters, rings, the tar copy,
and the stage's plumbing (tar index checks, the batch coder, the paused collector)."""

from __future__ import annotations

import gc
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
import webdataset as wds

from vlforge.pipeline.mine_filter import (
    Relations,
    as_sg,
    certainly_false_pairs,
    compact_graph,
    encode_claims,
    sample_facts,
)
from vlforge.pipeline.mine_groups import group_texts, ring_others
from vlforge.pipeline.mine_scan import MineInput, PickledBatch, gc_paused
from vlforge.pipeline.mine_shards import write_mined_tar
from vlforge.pipeline.mine_stage import ASYMMETRIC, OPPOSITE, certainly_false
from vlforge.pipeline.mine_tar import TarFormatError, index_samples, member_bytes
from vlforge.pipeline.tfidf import stable_hash

NAMES = ["circle", "square", "star", "background", "photo"]
DETECTABLE = ["circle", "square", "star"]
ATTRS = ["red", "blue", "big", "small", "striped", "shiny"]
RELS = ["left of", "right of", "above", "below", "on", "next to", "behind"]


def random_sg(rng: np.random.Generator) -> dict:
    n = int(rng.integers(0, 4))
    objects = [
        {"id": i, "name": str(rng.choice(NAMES)), "count": int(rng.choice([1, 1, 2]))}
        for i in range(n)
    ]
    attributes = [
        {"object": int(rng.integers(n)), "name": str(rng.choice(ATTRS))}
        for _ in range(int(rng.integers(0, 3)) if n else 0)
    ]
    relations = [
        {"subject": int(rng.integers(n)), "name": str(rng.choice(RELS)), "object": int(rng.integers(n))}
        for _ in range(int(rng.integers(0, 3)) if n else 0)
    ]  # fmt: skip
    return {"objects": objects, "attributes": attributes, "relations": relations}


def random_tags(rng: np.random.Generator) -> dict:
    """Old shards (one entry per region, no count), featurize's (one per name with a count) and
    an attribute head's scored attributes, mixed."""
    tags = []
    for _ in range(int(rng.integers(0, 4))):
        tag = {"name": str(rng.choice(DETECTABLE))}
        if rng.random() < 0.5:
            tag["count"] = int(rng.choice([1, 1, 2, 3]))
        attrs = rng.choice(ATTRS, int(rng.integers(0, 3)), replace=False).tolist()
        scored = rng.random() < 0.5
        tag["attributes"] = [{"name": a, "score": 0.5} if scored else a for a in attrs]
        tags.append(tag)
    return {"tags": tags}


def test_vectorised_filter_equals_certainly_false():
    rng = np.random.default_rng(0)
    owns = [random_sg(rng) for _ in range(300)]
    tags = [random_tags(rng) for _ in range(300)]
    candidates = [random_sg(rng) for _ in range(200)]
    relations = Relations(OPPOSITE, ASYMMETRIC)
    name_id = {n: i for i, n in enumerate(DETECTABLE)}
    claims = encode_claims([compact_graph(c) for c in candidates], name_id, relations)
    facts = sample_facts(
        [compact_graph(o) for o in owns], [t["tags"] for t in tags], name_id, relations
    )
    samples = np.repeat(np.arange(300), 200)
    rows = np.tile(np.arange(200), 300)
    got = certainly_false_pairs(samples, rows, facts, claims, relations)
    detectable = set(DETECTABLE)
    want = np.array(
        [
            certainly_false(as_sg(compact_graph(candidates[r])), owns[s], tags[s], detectable)
            for s, r in zip(samples.tolist(), rows.tolist(), strict=True)
        ]
    )
    assert want.any() and not want.all()
    np.testing.assert_array_equal(got, want)


def both_paths(candidate: dict, own: dict | None, tags: dict) -> bool:
    """certainly_false and certainly_false_pairs on one pair; they must agree."""
    relations = Relations(OPPOSITE, ASYMMETRIC)
    name_id = {n: i for i, n in enumerate(DETECTABLE)}
    claims = encode_claims([compact_graph(candidate)], name_id, relations)
    facts = sample_facts([compact_graph(own)], [tags["tags"]], name_id, relations)
    pairs = certainly_false_pairs(np.array([0]), np.array([0]), facts, claims, relations)
    python = certainly_false(candidate, own, tags, set(DETECTABLE))
    assert bool(pairs[0]) == python
    return python


def graph(*objects, attrs=(), rels=()) -> dict:
    """("square", 2) or "square" per object; attrs (object, name); rels (subject, name, object)."""
    objects = [o if isinstance(o, tuple) else (o, 1) for o in objects]
    return {
        "objects": [{"id": i, "name": n, "count": c} for i, (n, c) in enumerate(objects)],
        "attributes": [{"object": o, "name": a} for o, a in attrs],
        "relations": [{"subject": s, "name": r, "object": o} for s, r, o in rels],
    }


def test_tag_count_is_how_many_the_image_has():
    two = {"tags": [{"name": "square", "count": 2}, {"name": "circle", "count": 1}]}
    # "two squares" is true of an image where the detector found two.
    assert not both_paths(graph(("square", 2)), None, two)
    # Between the two squares one may be red, the other blue, and either may be right of the
    # circle: nothing about "the square" contradicts the own caption.
    own = graph("square", "circle", attrs=[(0, "red")], rels=[(0, "left of", 1)])
    assert not both_paths(graph("square", attrs=[(0, "blue")]), own, two)
    assert not both_paths(graph("square", "circle", rels=[(0, "right of", 1)]), own, two)
    # With one square the same claims are certainly false.
    one = {"tags": [{"name": "square", "count": 1}, {"name": "circle", "count": 1}]}
    assert both_paths(graph(("square", 2)), None, one)
    assert both_paths(graph("square", attrs=[(0, "blue")]), own, one)
    assert both_paths(graph("square", "circle", rels=[(0, "right of", 1)]), own, one)
    # Shards from before `count`: one entry per name counts once.
    assert both_paths(graph(("square", 2)), None, {"tags": [{"name": "square"}]})


def test_the_own_caption_counts_as_evidence():
    tags = {"tags": [{"name": "circle", "count": 1}]}  # the detector missed the star(s)
    own = graph(("star", 2), "circle")
    assert not both_paths(graph("star"), own, tags)
    assert not both_paths(graph(("star", 2)), own, tags)
    # Two stars by the own caption: "the star" may be either, whatever colour it has.
    own_colours = graph(("star", 2), attrs=[(0, "blue")])
    assert not both_paths(graph("star", attrs=[(0, "red")]), own_colours, tags)
    assert both_paths(graph("square"), own, tags)  # nothing says there is a square


def test_scored_attributes_of_an_attribute_head():
    tags = {
        "tags": [
            {
                "name": "circle",
                "count": 1,
                "attributes": [{"name": "red", "score": 0.6}, {"name": "orange", "score": 0.3}],
            }
        ]
    }
    # A colour the detector gives the circle is no contradiction, even beside another one.
    assert not both_paths(graph("circle", attrs=[(0, "orange")]), None, tags)
    assert not both_paths(graph("circle", attrs=[(0, "red"), (0, "small")]), None, tags)
    assert both_paths(graph("circle", attrs=[(0, "blue")]), None, tags)


def ordered_others(ring: list[dict], member: dict, limit: int) -> list[dict]:
    """The per-sample walk the stage used before: next ones round the ring, other images."""
    at = next(i for i, m in enumerate(ring) if m["key"] == member["key"])
    out = []
    for step in range(1, len(ring)):
        if len(out) >= limit:
            break
        other = ring[(at + step) % len(ring)]
        if other["image"] != member["image"]:
            out.append(other)
    return out


def test_ring_partners_match_the_per_sample_walk():
    rng = np.random.default_rng(1)
    texts = [str(rng.choice(["a", "b", "c", "d"])) for _ in range(200)] + [None]
    keys = [f"k{i:04d}" for i in range(201)]
    images = rng.integers(0, 40, size=201)
    groups = group_texts(texts, keys, seed=3)
    got = ring_others(groups, np.arange(201), images, limit=5)
    for i, text in enumerate(texts):
        if text is None:
            assert got[i] == []
            continue
        members = [
            {"key": keys[j], "image": int(images[j])} for j in range(200) if texts[j] == text
        ]
        ring = sorted(members, key=lambda m: (stable_hash(m["key"], 3), m["key"]))
        want = ordered_others(ring, {"key": keys[i], "image": int(images[i])}, 5)
        assert [keys[j] for j in got[i]] == [m["key"] for m in want]


@pytest.mark.parametrize("long_names", [False, True])
def test_tar_copy_keeps_members_and_adds_one(tmp_path, long_names):
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False)
    prefix = "d" * 120 + "/" if long_names else ""  # past ustar's 100 characters: pax headers
    samples = [
        {"__key__": f"{prefix}s{i}", "txt": f"caption {i}".encode(), "jpg": bytes(700 * i)}
        for i in range(4)
    ]
    samples[2]["mine.json"] = b'{"old": true}'  # mined before: replaced, never duplicated
    for sample in samples:
        writer.write(sample)
    writer.close()
    data = buffer.getvalue()
    index = index_samples(data)
    assert index.keys == [s["__key__"] for s in samples]
    target = tmp_path / "out.tar"
    payloads = {i: json.dumps({"i": i}).encode() for i in (0, 2, 3)}
    write_mined_tar(str(target), data, index, payloads, "mine.json")
    with tarfile.open(target) as tar:
        names = tar.getnames()
    assert len(names) == len(set(names))
    got = {
        s["__key__"]: s
        for s in wds.tariterators.group_by_keys(
            {**m, "__url__": "x"}
            for m in wds.tariterators.tar_file_iterator(io.BytesIO(target.read_bytes()))
        )
    }
    for i, sample in enumerate(samples):
        out = got[sample["__key__"]]
        for field in ("txt", "jpg"):
            assert out[field] == sample[field]
        if i in payloads:
            assert json.loads(out["mine.json"]) == {"i": i}
        else:
            assert "mine.json" not in out


@pytest.mark.parametrize("name", ["000000123.mine.json", "x" * 120 + ".mine.json"])
def test_member_header_is_what_tarfile_writes(name):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = (
        5,
        1_700_000_000,
        0o444,
        "bigdata",
        "bigdata",
    )
    format_ = tarfile.USTAR_FORMAT if len(name) <= 100 else tarfile.PAX_FORMAT
    want = info.tobuf(format_, "utf-8", "surrogateescape") + b"hello" + bytes(507)
    assert member_bytes(name, b"hello", 1_700_000_000.0) == want


def test_a_corrupt_header_is_refused():
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False)
    for i in range(3):
        writer.write({"__key__": f"s{i}", "txt": b"caption", "jpg": bytes(600)})
    writer.close()
    data = bytearray(buffer.getvalue())
    assert index_samples(bytes(data)).keys == ["s0", "s1", "s2"]
    last = max(i for i in range(0, len(data), 512) if data[i + 257 : i + 262] == b"ustar")
    data[last + 10] ^= 0x01  # a name byte of the last header: its checksum no longer adds up
    with pytest.raises(TarFormatError, match="checksum"):
        index_samples(bytes(data))


def test_batch_coder_round_trips_and_estimates_without_pickling(monkeypatch):
    scan = MineInput("s.tar", index_samples(_small_tar()), np.arange(2), ["a", "b"], ["x", "y"])
    coder = PickledBatch()
    back = coder.decode(coder.encode(scan))
    assert back.keys == scan.keys and back.index.keys == scan.index.keys
    monkeypatch.setattr(pickle, "dumps", lambda *a, **k: pytest.fail("estimate pickled"))
    assert coder.estimate_size(scan) > 0
    assert coder.estimate_size([scan, scan]) == 2 * coder.estimate_size(scan)


def _small_tar() -> bytes:
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer, encoder=False)
    for key in ("a", "b"):
        writer.write({"__key__": key, "txt": b"caption"})
    writer.close()
    return buffer.getvalue()


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
