"""Caption and image filters, the DataComp preset, caption normalization."""

import pytest

from vlforge.pipeline.filters import (
    CaptionFilter,
    FilterConfig,
    apply_preset,
    caption_key,
    image_reason,
    normalize_caption,
)


@pytest.fixture(scope="module")
def datacomp():
    return apply_preset(FilterConfig(), "datacomp-basic")


def test_datacomp_preset_values(datacomp):
    assert datacomp.languages == ("en",)
    assert (datacomp.min_caption_words, datacomp.min_caption_chars) == (3, 6)
    assert (datacomp.min_side, datacomp.max_aspect) == (200, 3.0)


@pytest.mark.parametrize(
    ("caption", "reason"),
    [
        ("star", "caption_too_short"),
        ("red star", "caption_too_few_words"),  # DataComp wants more than 2 words
        ("a red star on a wooden table", ""),
        ("un cercle rouge à gauche d'un carré bleu", "language"),
        ("zwei gelbe Herzen auf einem gestreiften Hintergrund", "language"),
        ("a nsfw picture of a red star", "blocklist"),
        ("a picture of a red star, NSFW", "blocklist"),
        ("a transistor on a breadboard", ""),  # 'nsfw' inside no word, blocklist is whole words
    ],
)
def test_caption_filter(datacomp, caption, reason):
    verdict = CaptionFilter(datacomp).check(caption)
    assert verdict.reason == reason


def test_language_is_recorded_even_without_filtering():
    verdict = CaptionFilter(FilterConfig()).check("a small blue square above a red circle")
    assert verdict.reason == "" and verdict.language == "en" and verdict.language_score > 0.5


@pytest.mark.parametrize(
    ("size", "reason"),
    [((320, 240), ""), ((199, 400), "min_side"), ((750, 250), ""), ((760, 250), "aspect_ratio")],
)
def test_image_filter(datacomp, size, reason):
    assert image_reason(datacomp, *size) == reason


def test_max_side_and_unknown_preset():
    assert image_reason(FilterConfig(max_side=500), 600, 300) == "max_side"
    with pytest.raises(ValueError, match="unknown filter preset"):
        apply_preset(FilterConfig(), "laion-magic")


def test_caption_normalization_and_key():
    assert normalize_caption("  a\tred\n\nstar  ") == "a red star"
    assert caption_key("A red star!") == caption_key("a  RED star")
    assert caption_key("a red star") != caption_key("a red stars")
