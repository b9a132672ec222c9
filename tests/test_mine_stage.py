"""The mining stage end to end on small shards: round trip, near-duplicates, errors, the CLI."""

from __future__ import annotations

import argparse
import importlib
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from vlforge.errors import UserError
from vlforge.pipeline.mine_cli import add_parser
from vlforge.pipeline.mine_eval import mine_quality, true_of
from vlforge.pipeline.mine_shards import read_samples
from vlforge.pipeline.mine_stage import MineConfig, certainly_false, run_mine

SHAPES = ["circle", "square", "triangle", "star", "heart"]
COLOURS = ["red", "blue", "green", "yellow", "orange"]
RELATIONS = {"left of": "to the left of", "right of": "to the right of", "above": "above"}


def world_rows(n: int, seed: int = 0) -> list[dict]:
    """A tiny stand-in for the demo world: two shapes, colours, one relation, the truth."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(SHAPES, 2, replace=False).tolist()
        ca, cb = rng.choice(COLOURS, 2).tolist()
        rel = str(rng.choice(list(RELATIONS)))
        caption = f"a {ca} {a} {RELATIONS[rel]} a {cb} {b}"
        truth = {
            "objects": [{"id": 0, "name": a, "count": 1}, {"id": 1, "name": b, "count": 1}],
            "attributes": [{"object": 0, "name": ca}, {"object": 1, "name": cb}],
            "relations": [{"subject": 0, "name": rel, "object": 1}],
        }
        rows.append({"key": f"s{i:05d}", "caption": caption, "truth": truth, "shapes": [a, b]})
    # Near-duplicates: the same words, different punctuation and case, and a verbatim repeat.
    rows.append({**rows[0], "key": "dup-punct", "caption": rows[0]["caption"].capitalize() + "."})
    rows.append({**rows[0], "key": "dup-exact"})
    return rows


@pytest.fixture(scope="module")
def parser():
    return importlib.import_module("vlforge.featurize.scene_graph").SceneGraphParser()


def write_shards(directory, rows, parser, shard_size=40) -> list[dict]:
    graphs = parser.parse_many([r["caption"] for r in rows])
    written = []
    for start in range(0, len(rows), shard_size):
        name = directory / f"corpus-{start // shard_size:06d}"
        chunk = list(
            zip(rows[start : start + shard_size], graphs[start : start + shard_size], strict=True)
        )
        with open(f"{name}.tar", "wb") as handle:
            writer = wds.TarWriter(handle, encoder=False)
            for row, sg in chunk:
                sample = {
                    "__key__": row["key"],
                    "jpg": b"\xff\xd8" + row["key"].encode(),
                    "txt": row["caption"].encode(),
                    "json": json.dumps({"key": row["key"], "world": json.dumps({"scene_graph": row["truth"]})}).encode(),
                    "sg.json": json.dumps(sg).encode(),
                    "tags.json": json.dumps({"tags": [{"name": s, "score": 0.9, "attributes": []} for s in row["shapes"]]}).encode(),
                    "boxes.npy": np.arange(8, dtype=np.float32).tobytes(),
                }  # fmt: skip
                writer.write(sample)
                written.append(sample)
            writer.close()
        pq.write_table(pa.table({"key": [r["key"] for r, _ in chunk]}), f"{name}.parquet")
    return written


@pytest.fixture(scope="module")
def mined(tmp_path_factory, parser):
    src = tmp_path_factory.mktemp("in")
    out = tmp_path_factory.mktemp("out")
    samples = write_shards(src, world_rows(150), parser)
    manifest = run_mine(str(src), str(out), MineConfig(), show_progress=False)
    return src, out, samples, manifest


def _all(directory) -> dict[str, dict]:
    return {s["__key__"]: s for p in sorted(directory.glob("*.tar")) for s in read_samples(str(p))}


def test_round_trip_keeps_every_earlier_field_and_adds_mine(mined):
    src, out, samples, manifest = mined
    after = _all(out)
    assert set(after) == {s["__key__"] for s in samples}
    for sample in samples:
        got = after[sample["__key__"]]
        assert set(got) == set(sample) | {"mine.json"}
        for field, value in sample.items():
            assert got[field] == value, field
    assert manifest["samples"] == len(samples)
    assert json.loads((out / "manifest.json").read_text())["config"]["k_negatives"] == 5
    stats = pq.read_table(out / "corpus-000000.parquet")
    assert {"key", "n_hard_negatives", "n_rewrites"} <= set(stats.column_names)
    with tarfile.open(out / "corpus-000000.tar") as tar:  # plain tar readers see it too
        assert any(m.name.endswith(".mine.json") for m in tar.getmembers())


def test_every_sample_gets_negatives_positives_and_rewrites(mined):
    _, out, _, _ = mined
    mines = [json.loads(s["mine.json"]) for s in _all(out).values()]
    assert all(len(m["hard_negatives"]) == 5 for m in mines)
    assert all(
        {r["kind"] for r in m["rewrites"]} == {"object", "attribute", "relation"} for m in mines
    )
    assert sum(bool(m["image_positives"]) for m in mines) > len(mines) / 2


def test_near_duplicates_are_positives_never_negatives(mined):
    _, out, _, _ = mined
    after = _all(out)
    group = {"s00000", "dup-punct", "dup-exact"}
    for key in group:
        mine = json.loads(after[key]["mine.json"])
        positives = {p["key"] for p in mine["positives"]}
        assert group - {key} <= positives, key
        assert not group & {n["key"] for n in mine["hard_negatives"]}
    for sample in after.values():
        mine = json.loads(sample["mine.json"])
        caption = sample["txt"].decode().lower().strip(". ")
        for neg in mine["hard_negatives"]:
            assert neg["caption"].lower().strip(". ") != caption
            assert neg["score"] < 0.9


def test_same_input_same_output(mined, tmp_path):
    src, out, _, _ = mined
    run_mine(str(src), str(tmp_path), MineConfig(), show_progress=False)
    for path in sorted(out.glob("*.tar")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()


def test_quality_figures_on_the_toy_world(mined):
    _, out, _, _ = mined
    figures = mine_quality(str(out))
    assert figures["neg_false_rate"] <= 0.01
    assert figures["neg_hardness"] > figures["neg_hardness_random"]
    assert figures["ivf_recall10"] >= 0.95


def test_certainly_false_uses_the_tags():
    def sg(*objects, attrs=(), rels=()):
        return {
            "objects": [{"id": i, "name": n, "count": 1} for i, n in enumerate(objects)],
            "attributes": [{"object": o, "name": a} for o, a in attrs],
            "relations": [{"subject": s, "name": r, "object": o} for s, r, o in rels],
        }

    own = sg("circle", "square", attrs=[(0, "red")], rels=[(0, "left of", 1)])
    tags = {"tags": [{"name": "circle"}, {"name": "square"}]}
    assert certainly_false(sg("star"), own, tags)  # the image has no star
    assert certainly_false(sg("circle", attrs=[(0, "blue")]), own, tags)  # its one circle is red
    assert certainly_false(sg("circle", "square", rels=[(0, "right of", 1)]), own, tags)
    assert not certainly_false(sg("circle"), own, tags)  # true: a circle is there
    assert not certainly_false(sg("circle", attrs=[(0, "big")]), own, tags)  # size unknown
    truth = {"scene_graph": own}
    assert true_of(sg("square", "circle", rels=[(0, "right of", 1)]), truth)
    assert not true_of(sg("circle", attrs=[(0, "blue")]), truth)


def test_bad_input_is_one_user_error(tmp_path):
    with pytest.raises(UserError, match="no .tar shards"):
        run_mine(str(tmp_path / "missing"), str(tmp_path / "out"), show_progress=False)
    (tmp_path / "bad-000000.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(UserError, match="not a readable WebDataset shard"):
        run_mine(str(tmp_path), str(tmp_path / "out"), show_progress=False)
    with pytest.raises(UserError, match="thresholds"):
        run_mine(str(tmp_path), str(tmp_path / "o"), MineConfig(dup_threshold=2.0))


def test_cli_parses_into_a_config():
    from vlforge.pipeline.mine_cli import config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["mine", "--in", "x", "--out", "y", "--k-negatives", "3", "--ivf-threshold", "10"]
    )
    config = config_from_args(args)
    assert config.k_negatives == 3 and config.neighbours.ivf_threshold == 10
    assert callable(args.func)
    args = parser.parse_args(["mine", "--in", "x", "--out", "y", "--nprobe", "0"])
    with pytest.raises(UserError):
        config_from_args(args)


def test_undetectable_objects_prove_nothing():
    candidate = {"objects": [{"id": 0, "name": "background", "count": 1}]}
    tags = {"tags": [{"name": "circle"}]}
    assert certainly_false(candidate, None, tags)  # no detector vocabulary: taken as absent
    assert not certainly_false(candidate, None, tags, detectable={"circle", "square"})
