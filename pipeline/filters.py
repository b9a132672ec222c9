"""Sample filters: each returns a reason string or '' and is counted under that reason.

Caption filters run before the download (no request for a caption we would drop anyway);
image filters run on the original size, as DataComp does.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field, replace

from py3langid.langid import MODEL_FILE, LanguageIdentifier

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)

# A small default blocklist; users pass their own file with --blocklist.
DEFAULT_BLOCKLIST = ("nsfw", "porn", "xxx", "click here to download", "stock photo watermark")


@dataclass(frozen=True)
class FilterConfig:
    min_side: int = 0
    max_side: int = 0  # 0 = no limit
    max_aspect: float = 0.0  # 0 = no limit; max(w, h) / min(w, h)
    min_caption_chars: int = 1
    max_caption_chars: int = 0  # 0 = no limit
    min_caption_words: int = 1
    languages: tuple[str, ...] = ()  # ISO 639-1 codes to keep; () keeps all
    min_language_score: float = 0.0
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    dedup_urls: bool = True
    dedup_images: bool = True
    dedup_near_images: bool = True
    dedup_captions: bool = True
    # Hamming distance (of 64 bits) at or under which two images count as one: recompression and
    # 1-2 px shifts land within 6; distinct demo-world scenes were never closer than 14.
    phash_max_distance: int = 6


# DataComp's "basic" filter: English (fastText there, py3langid here), caption > 2 words and
# > 5 characters, shorter side >= 200 px, aspect ratio <= 3.
PRESETS: dict[str, dict[str, object]] = {
    "none": {},
    "datacomp-basic": {
        "languages": ("en",),
        "min_caption_words": 3,
        "min_caption_chars": 6,
        "min_side": 200,
        "max_aspect": 3.0,
    },
}


def apply_preset(config: FilterConfig, preset: str) -> FilterConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown filter preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return replace(config, **PRESETS[preset])  # type: ignore[arg-type]


def normalize_caption(text: str) -> str:
    """NFC, whitespace collapsed: the caption as written to `txt`."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def caption_key(text: str) -> str:
    """What two captions must share to count as the same caption."""
    return " ".join(_WORD.findall(text.casefold()))


@dataclass
class CaptionVerdict:
    reason: str = ""
    language: str = ""
    language_score: float = 0.0
    words: int = 0
    extra: dict = field(default_factory=dict)


class CaptionFilter:
    def __init__(self, config: FilterConfig):
        self.config = config
        # The model ships inside py3langid; normalized probabilities make the score a confidence.
        self._langid = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self._blocklist = [
            re.compile(r"\b" + re.escape(w.casefold()) + r"\b") for w in config.blocklist
        ]

    def check(self, caption: str) -> CaptionVerdict:
        cfg = self.config
        words = len(_WORD.findall(caption))
        lang, score = self._langid.classify(caption) if caption else ("", 0.0)
        verdict = CaptionVerdict(language=lang, language_score=round(float(score), 3), words=words)
        if len(caption) < cfg.min_caption_chars:
            verdict.reason = "caption_too_short"
        elif words < cfg.min_caption_words:
            verdict.reason = "caption_too_few_words"
        elif cfg.max_caption_chars and len(caption) > cfg.max_caption_chars:
            verdict.reason = "caption_too_long"
        elif any(p.search(caption.casefold()) for p in self._blocklist):
            verdict.reason = "blocklist"
        elif cfg.languages and (lang not in cfg.languages or score < cfg.min_language_score):
            verdict.reason = "language"
        return verdict


def image_reason(config: FilterConfig, width: int, height: int) -> str:
    """Filter on the original (pre-resize) size."""
    short, long = min(width, height), max(width, height)
    if short < config.min_side:
        return "min_side"
    if config.max_side and long > config.max_side:
        return "max_side"
    if config.max_aspect and short > 0 and long / short > config.max_aspect:
        return "aspect_ratio"
    return ""
