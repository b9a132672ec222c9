"""The demo world's image questions: answers are true of the image, and they travel from the URL
list to the sample json where LXMERT's batch hook reads them."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

from vlforge.world.captions import PLURALS
from vlforge.world.questions import ANSWERS, NUMBER_WORDS, all_questions, scene_questions
from vlforge.world.scene import SHAPES, Scene, WorldObject, sample_scene, scene_rng

SINGULAR = {p: s for s, p in PLURALS.items()}


def _check(scene: Scene, q: dict[str, str]) -> None:
    """Answer `q` from the scene's objects independently of the generator."""
    objects, text = scene.objects, q["question"]
    assert q["answer"] in ANSWERS
    if m := re.fullmatch(r"what colour (?:is|are) the (\w+)\?", text):
        shape = SINGULAR.get(m.group(1), m.group(1))
        hues = {o.colour for o in objects if o.shape == shape}
        assert hues == {q["answer"]}, (text, objects)
    elif m := re.fullmatch(r"what shape is the (\w+) object\?", text):
        named = [o for o in objects if o.colour == m.group(1)]
        assert len(named) == 1 and named[0].shape == q["answer"], (text, objects)
    elif m := re.fullmatch(r"how many (\w+) are there\?", text):
        word = m.group(1)
        n = len(objects) if word == "shapes" else sum(o.shape == SINGULAR[word] for o in objects)
        assert q["answer"] == NUMBER_WORDS[n], (text, objects)
    else:
        raise AssertionError(f"unknown question form: {text}")


def test_answers_are_true_of_the_image():
    kinds: Counter = Counter()
    for index in range(60):
        scene = sample_scene(7, index)
        for q in all_questions(scene):
            _check(scene, q)
            kinds[q["kind"]] += 1
        chosen = scene_questions(scene, scene_rng(7, index, "questions"))
        assert chosen == scene_questions(scene, scene_rng(7, index, "questions"))  # reproducible
        assert 1 <= len(chosen) <= 4 and all(q in all_questions(scene) for q in chosen)
    assert kinds["colour"] and kinds["shape"] and kinds["count"]


def test_hand_scene():
    box = (0.0, 0.0, 30.0, 30.0)
    scene = Scene(
        100, 100, sample_scene(0, 0).background,
        [WorldObject("heart", "red", "small", box), WorldObject("heart", "red", "large", box),
         WorldObject("star", "blue", "small", box)],
    )  # fmt: skip
    got = {q["question"]: q["answer"] for q in all_questions(scene)}
    assert got["what colour are the hearts?"] == "red"
    assert got["what colour is the star?"] == "blue"
    assert got["what shape is the blue object?"] == "star"
    assert "what shape is the red object?" not in got  # two red objects: no single answer
    assert got["how many hearts are there?"] == "two"
    assert got["how many circles are there?"] == "zero"
    assert got["how many shapes are there?"] == "three"
    assert len([q for q in got if q.startswith("how many")]) == len(SHAPES) + 1
    # Every kind is represented in the draw even though absent-shape counts dominate the pool.
    drawn = scene_questions(scene, random.Random(0), limit=3)
    assert {q["kind"] for q in drawn} == {"colour", "shape", "count"}


def test_questions_travel_as_a_column_into_the_sample_json(tmp_path):
    from vlforge.pipeline.input_lists import read_rows
    from vlforge.train.recipes.lxmert import sample_questions
    from vlforge.world.url_list import make_url_list

    path = make_url_list(12, 3, "http://127.0.0.1:1", tmp_path / "urls.parquet", 0.0)
    table = read_rows(str(path))
    for caption, extra in zip(
        table.column("caption").to_pylist(), table.column("extra").to_pylist(), strict=True
    ):
        meta = json.loads(extra)  # what pipeline/shard_writer.py merges into the sample json
        world = json.loads(meta["world"])
        questions = sample_questions({"json": meta})
        assert questions and questions == json.loads(meta["questions"])
        scene = sample_scene(3, world["index"])
        assert [o.shape for o in scene.objects] == world["labels"]
        for q in questions:
            _check(scene, q)
        assert caption
