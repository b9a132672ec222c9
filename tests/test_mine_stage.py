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
from vlforge.pipeline.alignment import alignment, misaligned
from vlforge.pipeline.mine_cli import add_parser
from vlforge.pipeline.mine_eval import mine_quality, true_of
from vlforge.pipeline.mine_shards import read_samples
from vlforge.pipeline.mine_stage import MineConfig, certainly_false, format_summary, run_mine

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
                    "json": json.dumps({"key": row["key"], "world": json.dumps({"scene_graph": row["truth"], "kind": row.get("kind", "clean")})}).encode(),
                    "sg.json": json.dumps(sg).encode(),
                    "tags.json": json.dumps({"tags": [{"name": s, "score": 0.9, "attributes": []} for s in row.get("tagged", row["shapes"])]}).encode(),
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


# ---- misaligned pairs: annotated always, dropped with drop_misaligned ------------------------


def mismatched_rows(n: int = 60) -> list[dict]:
    """world_rows where every 10th image is another one: its tags name none of the caption's shapes."""
    rows = world_rows(n, seed=1)
    for row in rows[:n:10]:
        row["kind"] = "mismatched"
        row["tagged"] = [s for s in SHAPES if s not in row["shapes"]][:2]
    return rows


@pytest.fixture(scope="module")
def misaligned_in(tmp_path_factory, parser):
    src = tmp_path_factory.mktemp("misaligned-in")
    samples = write_shards(src, mismatched_rows(), parser, shard_size=25)
    detectable = {t["name"] for s in samples for t in json.loads(s["tags.json"])["tags"]}
    flagged = {
        s["__key__"]
        for s in samples
        if misaligned(
            alignment(json.loads(s["sg.json"]), json.loads(s["tags.json"]), detectable), 0.5
        )
    }
    return src, samples, flagged


def test_every_sample_is_annotated_and_kept_without_the_flag(mined):
    _, out, samples, manifest = mined
    mines = [json.loads(s["mine.json"]) for s in _all(out).values()]
    assert len(mines) == len(samples) and manifest["dropped_misaligned"] == 0
    assert all(set(m["alignment"]) == {"claims", "contradicted", "score"} for m in mines)
    assert all(m["alignment"]["score"] == 1.0 for m in mines)  # tags name the caption's shapes
    assert "misaligned" not in format_summary(manifest)


def test_drop_misaligned_leaves_out_exactly_the_flagged_samples(misaligned_in, tmp_path):
    src, samples, flagged = misaligned_in
    kinds = {s["__key__"]: json.loads(json.loads(s["json"])["world"])["kind"] for s in samples}
    mismatched = {k for k, kind in kinds.items() if kind == "mismatched"}
    assert flagged == mismatched and len(flagged) == 6
    kept_out, dropped_out = tmp_path / "kept", tmp_path / "dropped"

    kept = run_mine(str(src), str(kept_out), MineConfig(), show_progress=False)
    assert set(_all(kept_out)) == {s["__key__"] for s in samples}
    assert kept["dropped_misaligned"] == 0 and kept["samples"] == len(samples)
    figures = mine_quality(str(kept_out))
    assert figures["misaligned_flag_precision"] == figures["misaligned_flag_recall"] == 1.0
    assert figures["misaligned_flagged"] == 6 and figures["misaligned_dropped"] == 0

    manifest = run_mine(
        str(src), str(dropped_out), MineConfig(drop_misaligned=0.5), show_progress=False
    )
    after = _all(dropped_out)
    assert set(after) == {s["__key__"] for s in samples} - flagged
    assert manifest["dropped_misaligned"] == 6 and manifest["samples"] == len(samples) - 6
    assert manifest["beam_counters"]["mine/dropped_misaligned"] == 6
    assert sum(w["dropped_misaligned"] for w in manifest["shards"]) == 6
    assert "6 dropped as misaligned (>= 0.5)" in format_summary(manifest)
    parquet_keys = {
        k for p in dropped_out.glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist()
    }
    assert parquet_keys == set(after)
    everything = _all(kept_out)  # the kept samples are as without the flag, mine.json too
    assert all(sample == everything[key] for key, sample in after.items())
    figures = mine_quality(str(dropped_out))  # truth of the dropped read from the input shards
    assert figures["misaligned_flag_precision"] == figures["misaligned_flag_recall"] == 1.0
    assert figures["misaligned_dropped"] == 6 and figures["samples"] == len(samples) - 6
    assert figures["own_caption_true_rate"] == 1.0


def test_dropped_truth_unavailable_gives_bounds(misaligned_in, tmp_path):
    import shutil

    src, samples, _ = misaligned_in
    copy = tmp_path / "in"
    shutil.copytree(src, copy)
    run_mine(str(copy), str(tmp_path / "out"), MineConfig(drop_misaligned=0.5), show_progress=False)
    shutil.rmtree(copy)
    figures = mine_quality(str(tmp_path / "out"))
    assert figures["misaligned_flag_precision"] is None
    assert figures["misaligned_flag_recall"] is None
    assert figures["misaligned_flag_recall_max"] == 1.0 and figures["misaligned_flagged"] == 6


def test_drop_misaligned_flag_and_its_check():
    from vlforge.pipeline.mine_cli import config_from_args

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["mine", "--in", "x", "--out", "y", "--drop-misaligned", "0.5"])
    assert config_from_args(args).drop_misaligned == 0.5
    args = parser.parse_args(["mine", "--in", "x", "--out", "y"])
    assert config_from_args(args).drop_misaligned is None
    with pytest.raises(UserError, match="drop-misaligned"):
        run_mine("x", "y", MineConfig(drop_misaligned=0.0), show_progress=False)


def test_writer_drops_first_and_last_samples_whole(tmp_path):
    from vlforge.pipeline.mine_scan import read_shard
    from vlforge.pipeline.mine_shards import write_mined_tar
    from vlforge.pipeline.mine_tar import index_samples

    src = tmp_path / "in.tar"
    with open(src, "wb") as handle:
        writer = wds.TarWriter(handle, encoder=False)
        for i in range(4):
            writer.write({"__key__": f"k{i}", "txt": b"x" * (600 * i), "json": b"{}"})
        writer.close()
    data = read_shard(str(src))
    index = index_samples(data)
    payloads = {1: b'{"a": 1}', 2: b'{"a": 2}'}
    write_mined_tar(str(tmp_path / "out.tar"), data, index, payloads, "mine.json", drop={0, 3})
    after = list(read_samples(str(tmp_path / "out.tar")))
    assert [s["__key__"] for s in after] == ["k1", "k2"]
    assert [s["mine.json"] for s in after] == [b'{"a": 1}', b'{"a": 2}']
    assert after[1]["txt"] == b"x" * 1200
    with tarfile.open(tmp_path / "out.tar") as tar:
        assert len(tar.getmembers()) == 6
