"""The demo world: deterministic scenes, truthful captions, known mess, and a server whose faults
behave exactly as documented (checked with plain http.client, not with our crawler)."""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import json
import random
import threading
import warnings
from collections import Counter

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlforge.errors import UserError
from vlforge.world import cli as world_cli
from vlforge.world.captions import caption_scene, foreign_caption, short_caption
from vlforge.world.mess import KINDS, allocate, kind_counts
from vlforge.world.render import render_scene
from vlforge.world.scene import COLOURS, SHAPES, SIZES, relation_of, sample_scene
from vlforge.world.server import BOMB_SIDE, OVERSIZE_BYTES, WorldServer
from vlforge.world.url_list import (
    PRIVATE_REDIRECT_TARGET,
    clean_caption,
    fault_path,
    iter_rows,
)

BASE = "http://127.0.0.1:8765"


def _rows(n: int, seed: int, mess: float = 0.35) -> list[dict]:
    return list(iter_rows(n, seed, BASE, mess))


# ---- scenes, rendering, captions ----------------------------------------------------------------


def test_scenes_are_deterministic_and_well_formed():
    for index in range(200):
        scene = sample_scene(5, index)
        assert scene == sample_scene(5, index)
        assert 256 <= scene.width <= 480 and 256 <= scene.height <= 480
        assert max(scene.width, scene.height) / min(scene.width, scene.height) <= 2
        assert 1 <= len(scene.objects) <= 4
        for obj in scene.objects:
            assert obj.shape in SHAPES and obj.colour in COLOURS and obj.size in SIZES
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= scene.width and 0 <= y0 < y1 <= scene.height
            assert min(x1 - x0, y1 - y0) >= 24
        for i, a in enumerate(scene.objects):  # non-overlapping
            for b in scene.objects[i + 1 :]:
                assert (
                    a.box[2] <= b.box[0]
                    or b.box[2] <= a.box[0]
                    or a.box[3] <= b.box[1]
                    or b.box[3] <= a.box[1]
                )
        n = len(scene.objects)
        assert len(scene.relations) == n * (n - 1) // 2
    assert sample_scene(5, 0) != sample_scene(6, 0)
    tiny = sample_scene(5, 1, 48, 36)
    assert (tiny.width, tiny.height) == (48, 36) and len(tiny.objects) == 1


def test_relations_follow_the_geometry():
    for index in range(100):
        scene = sample_scene(2, index)
        for s, name, o in scene.relations:
            a, b = scene.objects[s].box, scene.objects[o].box
            holds = {
                "left of": a[2] <= b[0],
                "right of": b[2] <= a[0],
                "above": a[3] <= b[1],
                "below": b[3] <= a[1],
            }
            assert holds[name], (index, s, name, o)


def test_rendering_is_deterministic_and_jitter_shifts():
    scene = sample_scene(3, 4)
    image = render_scene(scene)
    assert image.mode == "RGB" and image.size == (scene.width, scene.height)
    assert np.array_equal(np.asarray(image), np.asarray(render_scene(scene)))
    shifted = np.asarray(render_scene(scene, jitter=2)).astype(int)
    original = np.asarray(image).astype(int)
    assert not np.array_equal(shifted, original)
    # The shift moves everything by (2, 2): compare the overlapping parts.
    assert np.abs(shifted[2:, 2:] - original[:-2, :-2]).mean() < 3
    for obj in scene.objects:  # the shape's colour fills its box centre
        x0, y0, x1, y1 = obj.box
        centre = original[int((y0 + y1) / 2), int((x0 + x1) / 2)]
        assert np.abs(centre - original[1, 1]).sum() > 0


def _true_of_scene(graph: dict, scene) -> None:
    """Every object, attribute and relation a caption's graph claims holds in the scene."""
    names = {o["id"]: o["name"] for o in graph["objects"]}
    attrs: dict[int, set] = {}
    for a in graph["attributes"]:
        attrs.setdefault(a["object"], set()).add(a["name"])
    shapes = [o for o in graph["objects"] if o["name"] != "background"]
    for obj in shapes:
        fits = [
            o
            for o in scene.objects
            if o.shape == obj["name"] and attrs.get(obj["id"], set()) <= {o.colour, o.size}
        ]
        assert len(fits) >= obj["count"], (obj, attrs.get(obj["id"]))
    for obj in graph["objects"]:
        if obj["name"] == "background":
            assert scene.background.word in attrs[obj["id"]]
    for rel in graph["relations"]:
        assert rel["name"] in {"left of", "right of", "above", "below", "next to", "on"}
        if rel["name"] == "on":
            assert names[rel["object"]] == "background"
            continue

        def candidates(oid):
            return [
                i
                for i, o in enumerate(scene.objects)
                if o.shape == names[oid] and attrs.get(oid, set()) <= {o.colour, o.size}
            ]

        ok = False
        for i in candidates(rel["subject"]):
            for j in candidates(rel["object"]):
                if i == j:
                    continue
                actual = relation_of(scene, i, j)
                if rel["name"] == actual or (
                    rel["name"] == "next to" and actual in ("left of", "right of")
                ):
                    ok = True
        assert ok, rel


def test_captions_say_only_true_things_in_varied_templates():
    rng = random.Random(0)
    captions = []
    for index in range(400):
        scene = sample_scene(9, index)
        caption, graph = caption_scene(scene, rng)
        assert set(graph) == {"objects", "attributes", "relations"}
        assert [o["id"] for o in graph["objects"]] == list(range(len(graph["objects"])))
        for obj in graph["objects"]:
            assert obj["name"] in caption.lower() or obj["name"] + "s" in caption.lower()
        for attr in graph["attributes"]:
            assert attr["name"] in caption.lower()
        _true_of_scene(graph, scene)
        captions.append(caption)
    assert len(set(captions)) >= 0.97 * len(captions)  # exact repeats stay rare
    starts = Counter(" ".join(c.lower().split()[:2]) for c in captions)
    assert len(starts) >= 10
    assert any("two " in c.lower() for c in captions)  # counts
    assert any(" and " in c for c in captions)  # coordination
    assert any(" sits " in c or " lies " in c for c in captions)  # verb relations
    assert any(c.count(".") >= 2 for c in captions)  # two sentences
    assert sum(c[0].isupper() for c in captions) not in (0, len(captions))


def test_caption_graph_format_is_exact():
    scene = sample_scene(1, 3)
    _caption, graph = caption_scene(scene, random.Random(1))
    for obj in graph["objects"]:
        assert set(obj) == {"id", "name", "count"}
    for attr in graph["attributes"]:
        assert set(attr) == {"object", "name"}
    for rel in graph["relations"]:
        assert set(rel) == {"subject", "name", "object"}


def test_mess_captions():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    rng = random.Random(3)
    for index in range(50):
        scene = sample_scene(4, index)
        short, _ = short_caption(scene, rng)
        assert 1 <= len(short) <= 5
        foreign, graph = foreign_caption(scene, rng)
        assert len(foreign.split()) >= 4
        assert langid.classify(foreign)[0] in ("fr", "de", "es"), foreign
        assert graph["objects"]


# ---- the list -----------------------------------------------------------------------------------


def test_list_is_deterministic_by_seed():
    assert _rows(120, 7) == _rows(120, 7)
    assert _rows(120, 7) != _rows(120, 8)


def test_every_kind_in_a_small_list_and_proportions_on_a_large_one():
    n = 2 * len(KINDS)
    assert {json.loads(r["world"])["kind"] for r in _rows(n, 1)} == set(KINDS)
    counts = Counter(allocate(20_000, 1))
    assert sum(counts.values()) == 20_000
    for name, kind in KINDS.items():
        assert counts[name] == pytest.approx(20_000 * kind.proportion, abs=2), name
    assert counts["clean"] / 20_000 == pytest.approx(0.60, abs=0.001)
    assert counts["mismatched"] / 20_000 == pytest.approx(0.05, abs=0.001)
    assert sum(k.proportion for k in KINDS.values()) == pytest.approx(1.0)
    assert kind_counts(500, 0.0) == {"clean": 500, **{k: 0 for k in KINDS if k != "clean"}}
    half = kind_counts(20_000, 0.175)
    assert half["clean"] == 20_000 - sum(v for k, v in half.items() if k != "clean")
    assert half["clean"] / 20_000 == pytest.approx(0.8, abs=0.001)


def test_kinds_are_spread_through_the_list():
    kinds = allocate(3000, 2)
    assert kinds[0] == "clean"
    for third in (kinds[:1000], kinds[1000:2000], kinds[2000:]):
        assert set(third) == set(KINDS)  # stratified, not bunched


def test_rows_carry_their_truth():
    rows = _rows(300, 11)
    by_url = {}
    for index, row in enumerate(rows):
        world = json.loads(row["world"])
        assert world["index"] == index
        assert (
            len(world["boxes"])
            == len(world["labels"])
            == len(world["colours"])
            == len(world["sizes"])
        )
        kind = world["kind"]
        if kind == "clean":
            scene = sample_scene(11, index)
            assert world["labels"] == [o.shape for o in scene.objects]
            assert world["boxes"] == [list(o.box) for o in scene.objects]
            assert (row["caption"], world["scene_graph"]) == clean_caption(11, index)
            _true_of_scene(world["scene_graph"], scene)
            assert row["url"] == f"{BASE}/w/11/img/{index}.jpg"
            by_url[row["url"]] = (index, row["caption"])
        if kind in ("dup_url", "dup_image", "near_dup"):
            source = world["source"]
            assert source < index and json.loads(rows[source]["world"])["kind"] == "clean"
        if kind == "dup_url":
            assert by_url[row["url"]] == (world["source"], row["caption"])
        if kind == "mismatched":
            _true_of_scene(world["scene_graph"], sample_scene(11, world["caption_of"]))
        if kind == "blocklisted":
            assert "nsfw" in row["caption"].lower()
        if kind == "private_url":
            assert row["url"].startswith("http://10.23.0.1/")
        if kind == "robots_disallowed":
            assert "/private/" in row["url"]
        if kind == "tiny":
            assert (world["width"], world["height"]) == (48, 36)
        if kind == "extreme_aspect":
            assert (
                world["width"] / world["height"] > 3 and min(world["width"], world["height"]) >= 200
            )
    ok_captions = [
        r["caption"] for r in rows if KINDS[json.loads(r["world"])["kind"]].expect_status == "ok"
    ]
    assert len(set(ok_captions)) >= len(ok_captions) - 2  # the crawler drops exact repeats


def test_mess_fraction_zero_is_all_clean():
    kinds = {json.loads(r["world"])["kind"] for r in _rows(80, 3, 0.0)}
    assert kinds == {"clean"}


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with WorldServer(hold_seconds=0.3, slow_body_seconds=0.5, cache_size=64) as srv:
        yield srv


def _get(server: WorldServer, path: str, read: bool = True):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read() if read else b""
    return conn, response, body


def _fetch(server: WorldServer, path: str):
    conn, response, body = _get(server, path)
    conn.close()
    return response, body


def test_images_and_duplicates(server):
    response, body = _fetch(server, "/w/3/img/5.jpg")
    assert response.status == 200 and response.getheader("Content-Type") == "image/jpeg"
    image = Image.open(io.BytesIO(body))
    scene = sample_scene(3, 5)
    assert image.size == (scene.width, scene.height)
    assert _fetch(server, "/w/3/dupimg/5-77.jpg")[1] == body  # byte-identical
    near = _fetch(server, "/w/3/near/5-78.jpg")[1]
    assert near != body and Image.open(io.BytesIO(near)).size == image.size
    assert Image.open(io.BytesIO(_fetch(server, "/w/3/tiny/6.jpg")[1])).size == (48, 36)
    assert Image.open(io.BytesIO(_fetch(server, "/w/3/wide/6.jpg")[1])).size == (960, 240)
    assert _fetch(server, "/private/3/6.jpg")[0].status == 200
    assert _fetch(server, "/nothing/here")[0].status == 404


def test_robots_txt(server):
    response, body = _fetch(server, "/robots.txt")
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain")
    import urllib.robotparser

    rules = urllib.robotparser.RobotFileParser()
    rules.parse(body.decode().splitlines())
    assert not rules.can_fetch("vlforge", server.url("/private/3/1.jpg"))
    assert rules.can_fetch("vlforge", server.url("/w/3/img/1.jpg"))


def test_status_faults(server):
    assert _fetch(server, fault_path(1, "http_404", 1))[0].status == 404
    for _ in range(2):
        assert _fetch(server, fault_path(1, "http_500", 1))[0].status == 500
    assert _fetch(server, fault_path(1, "flaky_503", 1))[0].status == 503
    assert _fetch(server, fault_path(1, "flaky_503", 1))[0].status == 200
    first, _ = _fetch(server, fault_path(1, "rate_limited", 1))
    assert first.status == 429 and first.getheader("Retry-After") == "1"
    assert _fetch(server, fault_path(1, "rate_limited", 1))[0].status == 200
    for _ in range(2):
        response, _ = _fetch(server, fault_path(1, "always_429", 1))
        assert response.status == 429 and response.getheader("Retry-After") == "1"


def test_redirects(server):
    path = fault_path(1, "redirect_loop", 2)
    response, _ = _fetch(server, path)
    assert response.status == 302 and response.getheader("Location") == path
    path = fault_path(1, "redirect_ok", 2)
    hops = []
    while True:
        response, body = _fetch(server, path)
        if response.status != 302:
            break
        path = response.getheader("Location")
        hops.append(path)
    assert len(hops) == 2 and response.status == 200 and body[:3] == b"\xff\xd8\xff"
    response, _ = _fetch(server, fault_path(1, "redirect_private", 2))
    assert response.status == 302 and response.getheader("Location") == PRIVATE_REDIRECT_TARGET


def test_content_faults(server):
    response, body = _fetch(server, fault_path(1, "wrong_content_type", 3))
    assert response.status == 200 and response.getheader("Content-Type").startswith("text/html")
    response, body = _fetch(server, fault_path(1, "bad_magic", 3))
    assert response.getheader("Content-Type") == "image/jpeg" and body.lstrip().startswith(b"<")
    response, body = _fetch(server, fault_path(1, "corrupt", 3))
    assert response.getheader("Content-Type") == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    with pytest.raises(Exception):  # noqa: B017 - PIL raises one of several types
        Image.open(io.BytesIO(body)).load()
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR) is None
    response, body = _fetch(server, fault_path(1, "x_robots_noai", 3))
    assert response.status == 200 and response.getheader("X-Robots-Tag") == "noai"
    response, body = _fetch(server, fault_path(1, "bomb", 3))
    assert response.getheader("Content-Type") == "image/png" and len(body) < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        header = Image.open(io.BytesIO(body))  # reads the header only
    assert header.size == (BOMB_SIDE, BOMB_SIDE) and BOMB_SIDE**2 > 100_000_000


def test_truncated_and_oversize(server):
    conn, response, _ = _get(server, fault_path(1, "truncated", 4), read=False)
    declared = int(response.getheader("Content-Length"))
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    assert len(info.value.partial) == declared // 2
    conn.close()
    conn, response, _ = _get(server, fault_path(1, "oversize", 4), read=False)
    assert int(response.getheader("Content-Length")) == OVERSIZE_BYTES
    assert len(response.read(1024)) == 1024  # the body really streams
    conn.close()  # hang up early, as a crawler does


def test_connection_reset(server):
    with pytest.raises(ConnectionError):
        _fetch(server, fault_path(1, "connection_reset", 5))


def test_timeout_and_slow_body(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.1)
    conn.request("GET", fault_path(1, "timeout", 6))
    with pytest.raises(TimeoutError):
        conn.getresponse()  # no headers within our read timeout
    conn.close()
    conn, response, _ = _get(server, fault_path(1, "slow_body", 6), read=False)
    assert response.status == 200  # headers at once
    declared = int(response.getheader("Content-Length"))
    first = response.read1(declared)
    assert 0 < len(first) < declared  # the body trickles
    conn.close()


def test_hold_blocks_until_released():
    with WorldServer() as srv:
        results = []
        worker = threading.Thread(
            target=lambda: results.append(_fetch(srv, srv.hold_url(1))[0].status)
        )
        worker.start()
        worker.join(0.3)
        assert worker.is_alive() and not results  # still held
        srv.release_holds()
        worker.join(10)
        assert results == [200]
        assert _fetch(srv, srv.hold_url(2))[0].status == 200  # later holds answer at once


def test_close_releases_held_requests():
    srv = WorldServer(hold_seconds=60).start()
    errors = []

    def fetch():
        try:
            _fetch(srv, srv.hold_url(1))
        except (ConnectionError, http.client.HTTPException) as err:
            errors.append(err)

    worker = threading.Thread(target=fetch)
    worker.start()
    while not srv.request_log[fault_path(0, "hold", 1)]:
        worker.join(0.01)
    srv.close()
    worker.join(10)
    assert not worker.is_alive() and errors


def test_request_log_counts_paths(server):
    path = "/w/8/img/1.jpg"
    before = server.request_log[path]
    for _ in range(3):
        _fetch(server, path)
    _fetch(server, "/robots.txt")
    assert server.request_log[path] == before + 3
    assert server.request_log["/robots.txt"] >= 1
    assert server.request_log["/w/8/img/999.jpg"] == 0


def test_prerender_keeps_images(server):
    urls = [server.image_url(9, i) for i in range(3)]
    assert server.prerender(urls) >= 3
    assert _fetch(server, "/w/9/img/1.jpg")[1] == _fetch(server, "/w/9/dupimg/1-50.jpg")[1]


def test_served_truth_matches_the_list(server):
    rows = list(iter_rows(70, 4, server.base_url))
    for row in rows:
        world = json.loads(row["world"])
        if world["kind"] in ("clean", "near_dup", "tiny"):
            response, body = _fetch(server, row["url"][len(server.base_url) :])
            assert response.status == 200
            assert Image.open(io.BytesIO(body)).size == (world["width"], world["height"])


# ---- the CLI ------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vlforge")
    world_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.mark.parametrize("ext", ["parquet", "csv", "tsv", "jsonl"])
def test_cli_make_writes_each_format(tmp_path, capsys, ext):
    out = tmp_path / "sub" / f"urls.{ext}"
    assert _cli("world", "make", "--n", "70", "--seed", "2", "--out", str(out)) == 0
    line = capsys.readouterr().out.strip()
    assert "70 rows" in line and "clean=" in line and "\n" not in line
    if ext == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif ext == "jsonl":
        rows = [json.loads(x) for x in out.read_text().splitlines()]
    else:
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t" if ext == "tsv" else ","))
    assert rows == _rows(70, 2)
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temp file left behind


def test_cli_make_rejects_bad_input(tmp_path):
    with pytest.raises(UserError, match="extension"):
        _cli("world", "make", "--n", "10", "--out", str(tmp_path / "urls.xlsx"))
    with pytest.raises(UserError, match="--n"):
        _cli("world", "make", "--n", "0", "--out", str(tmp_path / "urls.csv"))
    with pytest.raises(UserError, match="mess-fraction"):
        _cli("world", "make", "--n", "5", "--mess-fraction", "2", "--out", str(tmp_path / "u.csv"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot"):
        _cli("world", "make", "--n", "5", "--out", str(blocker / "urls.csv"))
    assert not (tmp_path / "urls.csv").exists()
