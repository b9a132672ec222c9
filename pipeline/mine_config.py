"""The mining stage's knobs (MineConfig), their defaults, and the check of a user's values."""

from __future__ import annotations

from dataclasses import dataclass, field

from vlforge.errors import UserError
from vlforge.pipeline.neighbour_config import NeighbourConfig
from vlforge.pipeline.rewrites import KINDS


@dataclass(frozen=True)
class MineConfig:
    """Knobs of the mining stage; defaults are what `vlforge mine` uses."""

    k_negatives: int = 5  # hard-negative captions per sample
    k_positives: int = 5  # retrieved positive captions per sample
    k_image_positives: int = 5  # image positives per sample
    candidates: int = 64  # neighbours fetched from faiss before the exact rerank and filters
    dup_threshold: float = 0.9  # TF-IDF cosine at/above which a caption is a near-duplicate
    min_negative_score: float = 0.05  # below this a "hard" negative shares nothing with the caption
    image_threshold: float = 0.8  # tag TF-IDF cosine at/above which an image is a positive
    rewrites_per_kind: int = 1
    rewrite_kinds: tuple[str, ...] = KINDS
    dim: int = 128  # dense dimensions for search (TruncatedSVD)
    svd_sample: int = 20_000  # captions the SVD is fitted on
    svd_columns: int = 32_768  # commonest hashed terms the SVD basis keeps
    neighbours: NeighbourConfig = field(default_factory=NeighbourConfig)
    seed: int = 0
    # Leave out samples whose caption the tags contradict this much (alignment.py: contradicted
    # share of checkable claims at/above it); None keeps every sample, only annotated.
    drop_misaligned: float | None = None


def check_config(config: MineConfig) -> None:
    """A UserError (one line) for values the stage cannot run with."""
    if min(config.k_negatives, config.k_positives, config.k_image_positives) < 0:
        raise UserError("k values must not be negative")
    if config.candidates < 1 or config.dim < 1:
        raise UserError("--candidates and --dim must be at least 1")
    if not 0.0 < config.dup_threshold <= 1.0 or not 0.0 < config.image_threshold <= 1.0:
        raise UserError("thresholds must lie in (0, 1]")
    if config.drop_misaligned is not None and not 0.0 < config.drop_misaligned <= 1.0:
        raise UserError("--drop-misaligned must lie in (0, 1]")
    unknown = set(config.rewrite_kinds) - set(KINDS)
    if unknown:
        raise UserError(
            f"unknown rewrite kind(s) {', '.join(sorted(unknown))}; use {', '.join(KINDS)}"
        )
