"""Samples grouped by text, as arrays: one row per distinct text, its members, and a seeded ring.

Rows are the distinct texts in sorted order (stable row ids for the index). Within a row,
members are sorted by key (the first is the text's representative: its key, caption, graph);
the ring orders them by a seeded hash so that each sample's "others with the same text" are the
next ones round the ring, a different few for each sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlforge.pipeline.tfidf import stable_hash


@dataclass
class TextGroups:
    texts: list[str]  # distinct texts, sorted
    offsets: np.ndarray  # int64, len(texts) + 1: each row's slice of `members` and `ring`
    members: np.ndarray  # int64 sample ids, grouped by row, by key within a row
    ring: np.ndarray  # the same ids, grouped by row, in ring order
    row: np.ndarray  # int64 per sample id: its text's row, -1 when it has no text
    ring_pos: np.ndarray  # int64 per sample id: its place in its row's ring, -1 likewise

    @property
    def first(self) -> np.ndarray:
        """The representative sample of each row (lowest key)."""
        return self.members[self.offsets[:-1]]


def group_texts(texts: list[str | None], keys: list[str], seed: int) -> TextGroups:
    """Group sample ids 0..n-1 by text (None: left out)."""
    n = len(texts)
    ids = [i for i, t in enumerate(texts) if t is not None]
    ids.sort(key=lambda i: (texts[i], keys[i]))
    members = np.asarray(ids, np.int64)
    starts = [j for j in range(len(ids)) if j == 0 or texts[ids[j]] != texts[ids[j - 1]]]
    offsets = np.asarray(starts + [len(ids)], np.int64)
    distinct = [texts[ids[j]] for j in starts]
    row = np.full(n, -1, np.int64)
    sizes = np.diff(offsets)
    row[members] = np.repeat(np.arange(len(distinct)), sizes)
    ring = members.copy()
    for r in np.flatnonzero(sizes > 1):
        lo, hi = offsets[r], offsets[r + 1]
        group = members[lo:hi].tolist()
        group.sort(key=lambda i: (stable_hash(keys[i], seed), keys[i]))
        ring[lo:hi] = group
    ring_pos = np.full(n, -1, np.int64)
    ring_pos[ring] = np.arange(len(ring)) - np.repeat(offsets[:-1], sizes)
    return TextGroups(distinct, offsets, members, ring, row, ring_pos)


def ring_others(
    groups: TextGroups, samples: np.ndarray, images: np.ndarray, limit: int
) -> list[list[int]]:
    """For each sample: up to `limit` other sample ids of its text with another image.

    They are the next ones round the ring, as many steps as it takes. Vectorised over a window of
    steps; a sample whose window is mostly its own image's copies finishes in Python.
    """
    out: list[list[int]] = [[] for _ in samples]
    if limit <= 0 or not len(samples):
        return out
    rows = groups.row[samples]
    sizes = np.where(rows >= 0, groups.offsets[rows + 1] - groups.offsets[rows], 1)
    todo = np.flatnonzero(sizes > 1)
    if not len(todo):
        return out
    window = limit + 4
    steps = np.arange(1, window + 1)
    s, size = samples[todo], sizes[todo]
    start = groups.offsets[rows[todo]]
    at = (groups.ring_pos[s][:, None] + steps[None, :]) % size[:, None]
    other = groups.ring[start[:, None] + at]
    ok = (steps[None, :] < size[:, None]) & (images[other] != images[s][:, None])
    for j, i in enumerate(todo.tolist()):
        found = other[j][ok[j]][:limit].tolist()
        if len(found) < limit and size[j] - 1 > window:
            found = _walk(groups, int(s[j]), images, limit)
        out[i] = found
    return out


def _walk(groups: TextGroups, sample: int, images: np.ndarray, limit: int) -> list[int]:
    r = groups.row[sample]
    lo, hi = groups.offsets[r], groups.offsets[r + 1]
    size, at = hi - lo, groups.ring_pos[sample]
    found = []
    for step in range(1, size):
        if len(found) >= limit:
            break
        other = int(groups.ring[lo + (at + step) % size])
        if images[other] != images[sample]:
            found.append(other)
    return found
