"""alignment(): the share of a caption's checkable claims that the detector's tags support."""

from __future__ import annotations

from vlforge.pipeline.alignment import alignment, contradicted_share, misaligned

DETECTABLE = {"circle", "square", "triangle", "star", "heart", "hexagon"}


def sg(*objects, attrs=()):
    """objects: names, or (name, count); attrs: (object index, attribute)."""
    objects = [(o, 1) if isinstance(o, str) else o for o in objects]
    return {
        "objects": [{"id": i, "name": n, "count": c} for i, (n, c) in enumerate(objects)],
        "attributes": [{"object": o, "name": a} for o, a in attrs],
        "relations": [],
    }


def tag(name, *attrs, count=1, score=0.99):
    return {
        "name": name,
        "count": count,
        "score": score,
        "attributes": [{"name": a, "score": 0.5} for a in attrs],
    }


def tags(*entries):
    return {"tags": list(entries)}


def test_supported_caption_scores_one():
    a = alignment(
        sg("circle", "square", attrs=[(0, "red"), (1, "small")]),
        tags(tag("circle", "red", "large"), tag("square", "blue", "small")),
        DETECTABLE,
    )
    assert a == {"claims": 4, "contradicted": 0, "score": 1.0}
    assert contradicted_share(a) == 0.0 and not misaligned(a, 0.5)


def test_absent_object_is_contradicted():
    a = alignment(sg("star", "heart"), tags(tag("circle"), tag("square")), DETECTABLE)
    assert a == {"claims": 2, "contradicted": 2, "score": 0.0}
    assert misaligned(a, 0.5) and misaligned(a, 1.0)
    half = alignment(sg("star", "circle"), tags(tag("circle")), DETECTABLE)
    assert half["contradicted"] == 1 and half["claims"] == 2
    assert misaligned(half, 0.5) and not misaligned(half, 0.51)


def test_wrong_colour_is_contradicted():
    a = alignment(sg("circle", attrs=[(0, "blue")]), tags(tag("circle", "red")), DETECTABLE)
    assert a == {"claims": 2, "contradicted": 1, "score": 0.5}


def test_attributes_the_detector_did_not_judge_are_no_claims():
    # Size claimed, only a colour tagged; "shiny" is no known category.
    a = alignment(
        sg("circle", attrs=[(0, "large"), (0, "shiny")]), tags(tag("circle", "red")), DETECTABLE
    )
    assert a == {"claims": 1, "contradicted": 0, "score": 1.0}


def test_attributes_of_several_instances_are_not_checked():
    # Two circles tagged: the tag's colour may be the other circle's.
    a = alignment(
        sg("circle", attrs=[(0, "blue")]), tags(tag("circle", "red", count=2)), DETECTABLE
    )
    assert a["claims"] == 1 and a["contradicted"] == 0
    a = alignment(sg(("circle", 2), attrs=[(0, "blue")]), tags(tag("circle", "red")), DETECTABLE)
    assert a["claims"] == 1 and a["contradicted"] == 0


def test_no_checkable_claims_is_never_flagged():
    none = {"claims": 0, "contradicted": 0, "score": None}
    assert alignment(sg("photo", "background"), tags(tag("circle")), DETECTABLE) == none
    assert alignment(sg("circle"), None, DETECTABLE) == none  # no tags.json
    assert alignment(None, tags(tag("circle")), DETECTABLE) == none  # no scene graph
    assert alignment(sg("circle"), tags(tag("circle")), set()) == none  # detector knows nothing
    assert not misaligned(none, 0.01) and contradicted_share(none) is None
    assert not misaligned(None, 0.5)


def test_an_unsure_detection_with_the_same_attributes_may_be_the_object():
    # The yellow circle was detected, unsure, as a yellow hexagon: neither support nor contradiction.
    caption = sg("circle", "square", attrs=[(0, "yellow")])
    unsure = tags(tag("hexagon", "yellow", score=0.8), tag("square"))
    assert alignment(caption, unsure, DETECTABLE) == {"claims": 1, "contradicted": 0, "score": 1.0}
    sure = tags(tag("hexagon", "yellow", score=0.99), tag("square"))
    assert alignment(caption, sure, DETECTABLE)["contradicted"] == 1
    other_colour = tags(tag("hexagon", "blue", score=0.8), tag("square"))
    assert alignment(caption, other_colour, DETECTABLE)["contradicted"] == 1
    # A detection the caption accounts for (it names one square, one is tagged) excuses nothing.
    named = tags(tag("square", "yellow", score=0.8))
    assert alignment(caption, named, DETECTABLE)["contradicted"] == 1
    # One square more than the caption names: that one may be the circle.
    extra = tags(tag("square", "yellow", count=2, score=0.8))
    assert alignment(caption, extra, DETECTABLE)["contradicted"] == 0


def test_old_tag_format_one_entry_per_instance_and_string_attributes():
    old = {"tags": [{"name": "circle", "attributes": ["red"]}, {"name": "circle"}]}
    a = alignment(sg("circle", attrs=[(0, "blue")]), old, DETECTABLE)
    assert a["claims"] == 1 and a["contradicted"] == 0  # two circles: colour not checked
    one = {"tags": [{"name": "circle", "attributes": ["red"]}]}
    assert alignment(sg("circle", attrs=[(0, "blue")]), one, DETECTABLE)["contradicted"] == 1
