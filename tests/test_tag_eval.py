"""Tag figures against world truth, on hand-made tags."""

from __future__ import annotations

import pytest

from vlforge.featurize.tag_eval import tag_figures


def tag(name: str, count: int = 1, attributes: tuple[str, ...] = ()) -> dict:
    return {
        "name": name,
        "score": 0.9,
        "count": count,
        "attributes": [{"name": a} for a in attributes],
    }


def test_tag_figures_on_a_hand_counted_example():
    truth = {
        "labels": ["circle", "circle", "square"],
        "colours": ["red", "blue", "green"],
        "sizes": ["small", "small", "large"],
    }
    tags = {
        "tags": [
            tag("circle", count=2, attributes=("red",)),  # two circles: attributes not judged
            tag("square", count=1, attributes=("green", "small")),  # green right, small wrong
            tag("star"),  # not in the image
        ]
    }
    figures = tag_figures([(tags, truth), ({"tags": []}, {"labels": ["heart"]})])
    assert figures["tag_precision"] == pytest.approx(2 / 3, abs=1e-4)
    assert figures["tag_recall"] == pytest.approx(2 / 3, abs=1e-4)  # circle, square; not heart
    assert figures["tag_count_accuracy"] == 1.0
    assert figures["tag_attribute_precision"] == 0.5
    assert figures["tag_eval_samples"] == 2


def test_a_wrong_count_is_counted():
    figures = tag_figures([({"tags": [tag("circle", count=1)]}, {"labels": ["circle", "circle"]})])
    assert figures["tag_count_accuracy"] == 0.0
    assert figures["tag_attribute_precision"] is None
