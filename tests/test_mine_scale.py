"""Mining past one machine: no step holds the whole corpus, and the parts add up to the whole.

- the combiners' statistics equal one pass over every caption, whatever the partitioning;
- text buckets give every sample the rows and ring partners of one global grouping;
- an index filled part by part equals one filled at once, and IVF with every list probed
  equals exact search;
- the index handle and files the search step reads carry no key, caption or text.
"""

from __future__ import annotations

import json
import pickle
import shutil

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from tests.test_mine_stage import world_rows, write_shards
from vlforge.pipeline import mine_phases
from vlforge.pipeline.mine_buckets import (
    CAPTIONS,
    TAGS,
    group_bucket,
    image_hash,
    pair_codes,
    row_starts,
    sample_rows,
    text_parts,
)
from vlforge.pipeline.mine_groups import group_texts, ring_others
from vlforge.pipeline.mine_scan import SumStats, cap_vocabulary, read_shard, scan_shard
from vlforge.pipeline.mine_shards import list_shards
from vlforge.pipeline.mine_stage import MineConfig, run_mine
from vlforge.pipeline.neighbours import (
    NeighbourConfig,
    NeighbourIndex,
    exact_search,
    fill_part,
    merge_parts,
    train_index,
)
from vlforge.pipeline.rewrites import SlotVocabulary
from vlforge.pipeline.tfidf import doc_frequencies


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from vlforge.featurize.scene_graph import SceneGraphParser

    src = tmp_path_factory.mktemp("scale-in")
    samples = write_shards(src, world_rows(150, seed=3), SceneGraphParser(), shard_size=30)
    return src, samples


@pytest.fixture(scope="module")
def scans(corpus):
    src, _ = corpus
    return [scan_shard(path) for path in list_shards(str(src))]


def test_combined_statistics_equal_one_pass(scans):
    texts = [t for s in scans for t in s.texts]
    tag_texts = [t for s in scans for t in s.tag_texts if t]
    pairs = [
        (c, json.loads(s.index.field(data, int(i), "sg.json")))
        for s in scans
        for data in [read_shard(s.shard)]
        for i, c in zip(s.rows.tolist(), s.captions, strict=True)
    ]
    one_pass = SlotVocabulary.from_captions(pairs).table
    expected_vocab = cap_vocabulary(one_pass, 20_000, 8)

    def check(outputs):
        (stats,) = outputs
        assert stats.n_captions == len(texts) and stats.n_tags == len(tag_texts)
        np.testing.assert_array_equal(stats.caption_df, doc_frequencies(texts))
        np.testing.assert_array_equal(stats.tag_df, doc_frequencies(tag_texts))
        assert stats.vocabulary == expected_vocab
        assert stats.n_untagged == 0

    with TestPipeline() as p:
        # Scans in reverse order, each its own bundle: partial sums go through the merge.
        stats = (
            p
            | beam.Create(list(reversed(scans)), reshuffle=True)
            | beam.CombineGlobally(SumStats())
        )
        assert_that(stats, check)


def test_vocabulary_cap_keeps_the_commonest_whatever_the_order():
    table = {"object": {}, "attribute": {}, "relation": {}}

    def a() -> SlotVocabulary:
        vocab = SlotVocabulary()
        for i, name in enumerate(["circle", "square", "star", "heart"]):
            for _ in range(4 - i):
                vocab.add("object", name, "-", name)
        return vocab

    def b() -> SlotVocabulary:
        vocab = SlotVocabulary()
        vocab.add("object", "star", "-", "star")
        vocab.add("object", "star", "-", "stars!")
        vocab.add("object", "heart", "-", "heart")
        return vocab

    one = cap_vocabulary(a().merge(b()).table, 2, 1)
    other = cap_vocabulary(b().merge(a()).table, 2, 1)
    assert one == other
    # circle 4, square 3, star 2 + 2 = 4, heart 1 + 1: circle and star, ties by name
    assert sorted(one["object"]) == ["circle", "star"]
    assert one["object"]["star"] == {"-": {"star": 3}}  # the commonest surface only
    assert cap_vocabulary(table, 2, 1) == table  # the kinds survive even when empty


@pytest.mark.parametrize("n_buckets", [1, 3, 7])
def test_buckets_give_the_global_rows_and_rings(scans, n_buckets):
    seed, limit = 0, 5
    parts: dict = {}
    for scan in reversed(scans):  # arrival order must not matter
        for key, part in text_parts(scan, n_buckets, seed):
            parts.setdefault(key, []).append(part)
    buckets = [group_bucket((key, parts[key]), seed) for key in sorted(parts)]
    starts = row_starts({(b.space, b.bucket): b.size for b in buckets}, n_buckets)
    got: dict = {}
    for bucket in buckets:
        if bucket.space != CAPTIONS:
            continue
        for shard, rows in sample_rows(bucket, starts, limit):
            for pos, row, ring in zip(rows.positions.tolist(), rows.rows, rows.ring, strict=True):
                got[(shard, pos)] = (int(row), [k for k, _ in ring])
    # The same grouping over the whole corpus at once.
    keys = [k for s in scans for k in s.keys]
    texts = [t for s in scans for t in s.texts]
    where = [(s.shard, i) for s in scans for i in range(len(s.keys))]
    images = np.array([image_hash(i) for s in scans for i in s.images], np.int64)
    groups = group_texts(texts, keys, seed)
    partners = ring_others(groups, np.arange(len(keys)), images, limit)
    assert len(got) == len(keys) and starts.total(CAPTIONS) == len(groups.texts)
    for i, at in enumerate(where):
        row, ring = got[at]
        assert ring == [keys[g] for g in partners[i]]
        # Rows are contiguous ids: one per distinct text, the same text the same row.
        assert 0 <= row < starts.total(CAPTIONS)
    by_text: dict = {}
    for i, at in enumerate(where):
        by_text.setdefault(texts[i], set()).add(got[at][0])
    assert all(len(rows) == 1 for rows in by_text.values())
    assert len({next(iter(r)) for r in by_text.values()}) == len(by_text)
    assert starts.total(TAGS) == len({t for s in scans for t in s.tag_texts if t})


def _unit(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(20, dim))[rng.integers(20, size=n)] + 0.4 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_ivf_with_every_list_probed_is_exact_and_parts_merge_to_the_whole():
    x = _unit(3000, 16)
    config = NeighbourConfig(ivf_threshold=500, nlist=24, nprobe=24, storage="flat", use_gpu=False)
    whole = NeighbourIndex(x, config)
    assert whole.kind == "ivf" and whole.nlist == 24
    scores, ids = whole.search(x[:200], 10)
    exact_scores, exact_ids = exact_search(x, x[:200], 10)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    np.testing.assert_array_equal(ids, exact_ids)
    # Trained on a sample, filled in three parts out of order, merged in row order.
    trained = train_index(len(x), x[::7], config)
    cuts = [(0, 1000), (1000, 2200), (2200, 3000)]
    parts = {c: fill_part(trained, np.arange(*c), x[c[0] : c[1]]) for c in reversed(cuts)}
    merged = NeighbourIndex.from_index(merge_parts(trained, [parts[c] for c in cuts]), config)
    assert merged.n == len(x)
    np.testing.assert_array_equal(merged.search(x[:200], 10)[1], exact_ids)


def test_index_files_are_the_parts_merged_in_row_order(tmp_path):
    """Parts written out of order, assembled on disk, mapped back: the in-memory merge's answers,
    and every per-row column (TF-IDF rows, images, pair codes, claims, graphs) in row order."""
    import scipy.sparse as sp

    from vlforge.pipeline.mine_filter import encode_claims
    from vlforge.pipeline.mine_index_files import OpenIndex, assemble_files, write_part
    from vlforge.pipeline.mine_shard import space_relations

    n = 3000
    x = _unit(n, 16)
    config = NeighbourConfig(ivf_threshold=500, nlist=24, nprobe=24, use_gpu=False)
    trained = train_index(n, x[::7], config)
    cuts = [(0, 1000), (1000, 2200), (2200, n)]
    sparse = sp.random(n, 64, density=0.1, format="csr", dtype=np.float32, random_state=0)
    images = np.random.default_rng(0).integers(0, 2**62, size=n)
    names = ["circle", "square"]
    graphs = [(((names[r % 2], 1 + r % 3),), (), ()) if r % 5 else None for r in range(n)]
    name_id = {name: i for i, name in enumerate(names)}
    parts = []
    for bucket, (lo, hi) in reversed(list(enumerate(cuts))):
        rows = np.arange(lo, hi)
        parts.append(
            write_part(
                str(tmp_path),
                CAPTIONS,
                bucket,
                lo,
                sparse=sparse[lo:hi],
                pair_codes=pair_codes(rows, images[lo:hi]),
                first_image=images[lo:hi],
                vectors=None,
                faiss_part=fill_part(trained, rows, x[lo:hi]),
                claims=encode_claims(graphs[lo:hi], name_id, space_relations()),
                graphs=graphs[lo:hi],
            )
        )
    reducer = type("Reducer", (), {"dim": 16})()  # assembling reads only its dimension
    files = assemble_files(parts, str(tmp_path), n, reducer, trained, "ivf")
    opened = OpenIndex(files, config)
    in_memory = [fill_part(trained, np.arange(*c), x[c[0] : c[1]]) for c in cuts]
    whole = NeighbourIndex.from_index(merge_parts(trained, in_memory), config)
    found = opened.neighbours.search(x[:200], 10)
    for got, want in zip(found, whole.search(x[:200], 10), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(opened.neighbours.lists, whole.lists)
    assert (opened.sparse != sparse).nnz == 0
    np.testing.assert_array_equal(opened.first_image, images)
    rows = np.array([0, 999, 1000, 2199, 2200, n - 1])
    assert opened.has_image(rows, pair_codes(rows, images[rows])).all()
    assert not opened.has_image(rows, pair_codes(rows, images[rows] + 1)).any()
    expected = encode_claims(graphs, name_id, space_relations())
    for field in expected.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(opened.claims, field), getattr(expected, field))
    assert opened.text_graph(1001) == [[["square", 3]], [], []]
    assert opened.text_graph(1000) is None


def test_ivf_pq_past_its_threshold_still_finds_the_neighbours():
    x = _unit(12_000, 32, seed=1)
    config = NeighbourConfig(ivf_threshold=1000, pq_threshold=5000, pq_bytes=8, use_gpu=False)
    index = NeighbourIndex(x, config)
    assert index.kind == "ivfpq"
    _, exact = exact_search(x, x[:300], 10)
    _, approx = index.search(x[:300], 64)  # mining fetches 64 candidates, then reranks exactly
    found = np.mean([len(set(e) & set(a)) / 10 for e, a in zip(exact, approx, strict=True)])
    assert found >= 0.85  # 0.89 measured: 64 PQ candidates hold most of the exact top 10


def test_search_index_holds_no_text(corpus, tmp_path, monkeypatch):
    """The index handle and the index files the workers map carry no key or caption."""
    src, samples = corpus
    seen = tmp_path / "indexes"
    original = mine_phases.assemble

    def recording(item, *args):
        space, files = original(item, *args)
        shutil.copytree(files.directory, seen / space)  # run_mine deletes them at the end
        (seen / space / "handle.pkl").write_bytes(pickle.dumps(files))
        return space, files

    monkeypatch.setattr(mine_phases, "assemble", recording)
    out = tmp_path / "out"
    run_mine(str(src), str(out), MineConfig(), show_progress=False)
    assert sorted(p.name for p in seen.iterdir()) == sorted([CAPTIONS, TAGS])
    blob = b"".join(p.read_bytes() for p in seen.rglob("*") if p.is_file())
    for sample in samples:
        assert sample["__key__"].encode() not in blob
        assert sample["txt"] not in blob and sample["txt"].lower() not in blob
    # every sample has tags: claims suffice, the texts' graphs are not kept
    assert not (seen / CAPTIONS / "graphs_json.npy").exists()
    assert (seen / CAPTIONS / "claims_obj_name.npy").exists()
    handle = pickle.loads((seen / CAPTIONS / "handle.pkl").read_bytes())
    assert handle.n == len({s["txt"].decode().strip().lower() for s in samples})
    assert not (out / mine_phases.WORK_DIR).exists()  # deleted when the stage ends


def test_no_phase_reads_a_side_input(corpus, tmp_path, monkeypatch):
    """On DaskRunner a side input is a persisted bag that recomputes its upstream, and a
    CombineGlobally with its default (built on one) hung a phase; every phase reads staged files
    instead, so none of the five pipelines may hold a transform with a side input."""
    src, _ = corpus
    built: list[beam.Pipeline] = []

    class Recorded(beam.Pipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    class SideInputs(beam.pipeline.PipelineVisitor):
        def __init__(self):
            self.found: list[str] = []

        def visit_transform(self, applied):
            if applied.side_inputs:
                self.found.append(applied.full_label)

    monkeypatch.setattr(beam, "Pipeline", Recorded)
    run_mine(str(src), str(tmp_path / "out"), MineConfig(), show_progress=False)
    assert len(built) == 5
    for pipeline in built:
        visitor = SideInputs()
        pipeline.visit(visitor)
        assert visitor.found == []
