"""Scene-graph rewrites: each kind changes exactly one slot, and the sentence stays grammatical."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from vlforge.pipeline.mine_eval import one_slot_apart
from vlforge.pipeline.rewrites import (
    SlotVocabulary,
    _choose,
    apply_edit,
    indefinite_article,
    pluralize,
    replace_span,
    rewrite,
    token_offsets,
)

CORPUS = [
    "a red circle to the left of a blue square",
    "two green triangles above a yellow star",
    "an orange heart below a small red circle",
    "a big blue square to the right of two red circles",
    "three yellow stars next to a green heart",
    "a small orange triangle above a big green square",
    "A purple circle below an orange star.",
    "two blue hearts to the left of a purple triangle",
]
CASES = [
    "a red circle to the left of a blue square",
    "two green triangles above a yellow star",
    "A purple circle below an orange star.",
]


@pytest.fixture(scope="module")
def parsed():
    parser_module = importlib.import_module("vlforge.featurize.scene_graph")
    parser = parser_module.SceneGraphParser()
    graphs = dict(zip(CORPUS, parser.parse_many(CORPUS), strict=True))
    # Twice over, so every value passes the vocabulary's minimum count.
    vocab = SlotVocabulary.from_captions(list(graphs.items()) * 2)
    return parser, graphs, vocab


@pytest.mark.parametrize("kind", ["object", "attribute", "relation"])
@pytest.mark.parametrize("caption", CASES)
def test_each_kind_changes_exactly_one_slot(parsed, kind, caption):
    parser, graphs, vocab = parsed
    sg = graphs[caption]
    for seed in range(5):
        made = rewrite(caption, sg, vocab, np.random.default_rng(seed), kinds=[kind])
        assert len(made) == 1, caption
        edit = made[0]
        assert edit["kind"] == kind and edit["from"] != edit["to"]
        claimed = apply_edit(sg, edit)
        assert one_slot_apart(sg, claimed)
        # The parser reads the new sentence as exactly the claimed graph: one slot changed, no
        # other word moved, number and articles still agree.
        reparsed = parser.parse(edit["caption"])
        assert one_slot_apart(sg, reparsed), (caption, edit["caption"])
        assert sorted(o["name"] for o in reparsed["objects"]) == sorted(
            o["name"] for o in claimed["objects"]
        )
        assert _articles_agree(edit["caption"]), edit["caption"]
        # Everything after the replaced words is untouched.
        _, e = edit["span"]
        assert edit["caption"][e:] == caption[len(caption) - len(edit["caption"]) + e :]


def _articles_agree(text: str) -> bool:
    words = text.replace(".", "").split()
    for word, nxt in zip(words, words[1:], strict=False):
        if word.lower() in ("a", "an") and word.lower() != indefinite_article(nxt):
            return False
    return True


def test_plural_objects_get_plural_replacements(parsed):
    _, graphs, vocab = parsed
    caption = "two green triangles above a yellow star"
    sg = graphs[caption]
    plural_slot = next(i for i, o in enumerate(sg["objects"]) if o["count"] > 1)
    for seed in range(10):
        made = rewrite(caption, sg, vocab, np.random.default_rng(seed), kinds=["object"])
        if made and made[0]["slot"] == plural_slot:
            word = made[0]["caption"].split()[2]
            assert word.endswith("s"), made[0]["caption"]
            return
    pytest.fail("no rewrite of the plural object in 10 seeds")


def test_attribute_swaps_stay_in_their_category_and_fix_the_article(parsed):
    _, graphs, vocab = parsed
    caption = "a red circle to the left of a blue square"
    for seed in range(10):
        for edit in rewrite(
            caption, graphs[caption], vocab, np.random.default_rng(seed), kinds=["attribute"]
        ):
            assert edit["to"] in {"red", "blue", "green", "yellow", "orange", "purple"}
            assert _articles_agree(edit["caption"])


def test_no_swap_into_an_object_the_detector_sees(parsed):
    _, graphs, vocab = parsed
    caption = CASES[0]
    tags = {"tags": [{"name": n, "score": 0.9, "attributes": []} for n in ("star", "heart")]}
    for seed in range(10):
        for edit in rewrite(caption, graphs[caption], vocab, np.random.default_rng(seed),
                            kinds=["object"], image_tags=tags):  # fmt: skip
            assert edit["to"] not in {"star", "heart", "circle", "square"}


def test_same_seed_same_rewrites(parsed):
    _, graphs, vocab = parsed
    a = rewrite(CASES[1], graphs[CASES[1]], vocab, np.random.default_rng(7))
    b = rewrite(CASES[1], graphs[CASES[1]], vocab, np.random.default_rng(7))
    assert a == b and len(a) == 3


def test_text_surgery_helpers():
    assert [indefinite_article(w) for w in ["orange", "red", "hour", "unicorn", "umbrella"]] == [
        "an", "a", "an", "a", "an",
    ]  # fmt: skip
    assert [pluralize(w) for w in ["box", "berry", "circle", "fire hydrant"]] == [
        "boxes", "berries", "circles", "fire hydrants",
    ]  # fmt: skip
    assert replace_span("A red ball.", 2, 5, "orange") == ("An orange ball.", 3, 9)
    assert replace_span("Red ball", 0, 3, "blue")[0] == "Blue ball"
    assert token_offsets("A  red ball.", ["A", "red", "ball", "."]) == [
        (0, 1), (3, 6), (7, 11), (11, 12),
    ]  # fmt: skip
    assert token_offsets("a ball", ["a", "cat"]) is None


def test_relations_without_a_side_are_never_swapped():
    from vlforge.pipeline.rewrites import relation_compatible

    assert relation_compatible("left of", "right of")
    assert not relation_compatible("left of", "next to")  # may be true as well
    assert not relation_compatible("next to", "left of")  # "next to" names no side
    assert not relation_compatible("on", "above")


@pytest.mark.parametrize(
    "two_circles",
    [
        {"tags": [{"name": n} for n in ("circle", "circle", "square")]},  # before `count`
        {"tags": [{"name": "circle", "count": 2}, {"name": "square", "count": 1}]},
    ],
)
def test_with_tags_only_detectable_unique_things_are_swapped(parsed, two_circles):
    _, graphs, vocab = parsed
    caption = CASES[0]  # a red circle to the left of a blue square
    detectable = {"circle", "square", "triangle", "star", "heart"}
    for seed in range(10):
        rng = np.random.default_rng(seed)
        made = rewrite(caption, graphs[caption], vocab, rng, image_tags=two_circles,
                       detectable=detectable)  # fmt: skip
        for edit in made:
            # The image has two circles: the circle's colour and its relations prove nothing.
            assert edit["kind"] != "relation"
            if edit["kind"] == "attribute":
                assert edit["from"] == "blue"
            if edit["kind"] == "object":
                assert edit["to"] in detectable - {"circle", "square"}


def test_weighted_choice_is_numpys_draw():
    """_choose skips rng.choice's validation but must draw exactly what it draws."""
    meta = np.random.default_rng(7)
    for _ in range(2000):
        options = [f"v{i}" for i in range(int(meta.integers(1, 30)))]
        counts = meta.integers(1, 10 ** int(meta.integers(1, 7)), size=len(options))
        vocab = SlotVocabulary()
        for name, count in zip(options, counts.tolist(), strict=True):
            vocab.add("object", name, "singular", name, count)
        seed = int(meta.integers(2**63))
        ours, numpys = np.random.default_rng(seed), np.random.default_rng(seed)
        weights = counts.astype(np.float64)
        want = options[int(numpys.choice(len(options), p=weights / weights.sum()))]
        assert _choose(ours, vocab, "object", options) == want
        assert ours.random() == numpys.random()  # the same state afterwards
