"""Streaming WebDataset loader: shard URLs → deterministic, resumable global batches.

Global batch t is a pure function of (seed, t, batch size, stream count), whatever the number of
ranks and workers (MosaicML streaming's design: canonical partitions, not physical ones):

- The data is read as S canonical *streams* (SlotStream): shards are split into *units* (a shard,
  or 1/m of it when there are fewer shards than streams), stream s taking units s, s+S, … of
  reshuffled permutations (`epochs`), drawn with replacement (`resampled`) or one pass (`once`).
- A *chunk* is a few consecutive units of a stream read interleaved through a shuffle buffer that
  is drained at the chunk's end; a position is (chunk, samples emitted from it), so resuming
  re-reads at most one chunk's raw bytes, without decoding them.
- Global batch t = the next B/S samples of each stream, stream by stream. A rank takes its
  contiguous share and reads only the streams it lies in; a checkpoint stores the positions of
  every stream, so a run resumes at any rank count on the same sample stream.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from vlforge.errors import UserError
from vlforge.train.decode import decode_sample

log = logging.getLogger(__name__)

SHARD_ORDERS = ("epochs", "resampled", "once")

# Seed streams: distinct first words keep the RNGs of different purposes independent.
_PERM, _RESAMPLE, _SHUFFLE, _BATCH, _TASK, _FORWARD = 11, 12, 13, 14, 15, 16


# ---------------------------------------------------------------------------------------------
# Shard URLs
# ---------------------------------------------------------------------------------------------


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard patterns → URLs. Accepts brace patterns (`a-{000000..000009}.tar`, `a-{0,3}.tar`),
    `::`-separated lists, local globs and directories (their *.tar), `file://`, `pipe:CMD` and any
    fsspec URL (s3://, gs://, memory://, …). Local paths must exist."""
    # `::` separates patterns (webdataset's convention); a comma may be a brace alternative.
    specs = spec if isinstance(spec, list) else spec.split("::")
    urls: list[str] = []
    for one in (s.strip() for s in specs):
        if not one:
            continue
        # Braces expand in pipe: commands too, as webdataset does: `pipe:curl -s …/a-{0..9}.tar`.
        for item in braceexpand.braceexpand(one):
            if _is_url(item):
                urls.append(item)
            elif os.path.isdir(item):
                found = sorted(glob.glob(os.path.join(item, "*.tar")))
                if not found:
                    raise UserError(f"no .tar shards in directory {item}")
                urls.extend(found)
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
                if not found:
                    raise UserError(f"no shards match {item}")
                urls.extend(found)
            elif os.path.exists(item):
                urls.append(item)
            else:
                raise UserError(f"shard not found: {item}")
    if not urls:
        raise UserError(f"no shards in {spec!r}")
    return urls


def open_shard(url: str) -> BinaryIO:
    """Local paths, file://, pipe: and http(s) through webdataset's gopen; other schemes by fsspec."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if url.startswith("pipe:") or scheme in ("", "file", "http", "https"):
        return gopen(url, "rb")
    import fsspec  # only needed for object stores

    return fsspec.open(url, "rb").open()


def iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per extension) of one shard; a damaged shard ends early with a warning."""

    def warn(exn: Exception) -> bool:
        warnings.warn(f"shard {url}: {exn}; skipping the rest of it", stacklevel=2)
        return False

    try:
        stream = open_shard(url)
    except Exception as exn:  # an unreachable shard must not kill a long run
        warn(exn)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=warn)
        yield from group_by_keys(files, handler=warn)
    finally:
        stream.close()


# ---------------------------------------------------------------------------------------------
# The per-slot stream
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConfig:
    urls: tuple[str, ...]
    seed: int = 0
    order: str = "epochs"
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    units_per_chunk: int = 4

    def __post_init__(self) -> None:
        if self.order not in SHARD_ORDERS:
            raise UserError(f"shard order must be one of {SHARD_ORDERS}, not {self.order!r}")


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(w) for w in words])


class SlotStream:
    """The raw-sample stream of slot `slot` of `slots`: yields (raw sample, (chunk, emitted))."""

    def __init__(self, cfg: StreamConfig, slot: int, slots: int):
        self.cfg, self.slot, self.slots = cfg, slot, slots
        n = len(cfg.urls)
        self.parts = -(-slots // n)  # ceil: each shard splits in this many interleaved parts
        self.n_units = n * self.parts

    def unit(self, k: int) -> tuple[int, int] | None:
        """Slot-local unit number k → (shard index, part), or None past the end of a finite pass."""
        cfg = self.cfg
        if cfg.order == "resampled":
            u = int(_rng(_RESAMPLE, cfg.seed, self.slot, k).integers(self.n_units))
        else:
            j = self.slot + self.slots * k
            rnd, idx = divmod(j, self.n_units)
            if cfg.order == "once" and rnd > 0:
                return None
            perm = (
                _rng(_PERM, cfg.seed, rnd).permutation(self.n_units)
                if cfg.shuffle_shards
                else np.arange(self.n_units)
            )
            u = int(perm[idx])
        return u // self.parts, u % self.parts

    def _unit_samples(self, shard: int, part: int) -> Iterator[dict[str, Any]]:
        for i, sample in enumerate(iter_shard(self.cfg.urls[shard])):
            if i % self.parts == part:
                yield sample

    def _chunk_raw(self, chunk: int) -> tuple[Iterator[dict[str, Any]], bool]:
        """Round-robin over the chunk's units; second value False when the pass has ended."""
        per = self.cfg.units_per_chunk
        units = [self.unit(chunk * per + i) for i in range(per)]
        live = [self._unit_samples(*u) for u in units if u is not None]

        def interleave() -> Iterator[dict[str, Any]]:
            iters = list(live)
            while iters:
                for it in list(iters):
                    try:
                        yield next(it)
                    except StopIteration:
                        iters.remove(it)

        return interleave(), bool(live)

    def _shuffled(self, raw: Iterator[dict[str, Any]], chunk: int) -> Iterator[dict[str, Any]]:
        size = self.cfg.shuffle_buffer
        if size <= 1:
            yield from raw
            return
        rng = _rng(_SHUFFLE, self.cfg.seed, self.slot, chunk)
        buf: list[dict[str, Any]] = []
        for sample in raw:
            buf.append(sample)
            if len(buf) >= size:
                i = int(rng.integers(len(buf)))
                buf[i], buf[-1] = buf[-1], buf[i]
                yield buf.pop()
        # Drain at the chunk's end so a chunk is self-contained: positions never span chunks.
        for i in rng.permutation(len(buf)):
            yield buf[int(i)]

    def __iter__(self) -> Iterator[tuple[dict[str, Any], tuple[int, int]]]:
        return self.iterate()

    def iterate(self, chunk: int = 0, skip: int = 0) -> Iterator[tuple[dict, tuple[int, int]]]:
        """From position (chunk, skip): skipped samples are read but not decoded or yielded."""
        empty = 0  # consecutive chunks without a sample: a whole pass of them means no data
        while empty * self.cfg.units_per_chunk < self.n_units:
            raw, live = self._chunk_raw(chunk)
            if not live:
                return
            emitted = 0
            for emitted, sample in enumerate(self._shuffled(raw, chunk), start=1):
                if emitted <= skip:
                    continue
                yield sample, (chunk, emitted)
            empty = empty + 1 if emitted == 0 else 0
            chunk, skip = chunk + 1, 0


# ---------------------------------------------------------------------------------------------
# Global batches: canonical streams read in workers, micro-batches assembled in the main process
# ---------------------------------------------------------------------------------------------

# (samples, this batch's RNG, an RNG shared by every rank's batch of the same step) → batch.
Assembler = Callable[
    [list[dict[str, Any]], np.random.Generator, np.random.Generator], dict[str, Any]
]


class Loader:
    """Rank-count-invariant global batches (MosaicML streaming's canonical partitions).

    The data is read as `streams` canonical SlotStreams (a number fixed by the run, never by its
    ranks or workers); global batch t is, stream by stream, the next B/streams samples of each,
    so it is a pure function of (seed, t, B, streams). Rank r of N takes positions
    [rB/N, (r+1)B/N) of it and cuts them into `grad_accum` micro-batches, so it reads only the
    streams (shards) its positions lie in — 1/N of the corpus when N divides `streams`. Workers
    read and decode a share of the rank's streams; the main process joins their pieces and
    assembles each micro-batch with an RNG from (seed, t, its first global position), and puts
    `_seed` in it for in-forward randomness: masking, negatives and dropout are the same
    whatever the rank count, as long as ranks × grad_accum (the micro-batch shape) is.
    """

    def __init__(
        self,
        cfg: StreamConfig,
        assemble: Assembler,
        batch_size: int,
        num_workers: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fields: tuple[str, ...] | None = None,
        required: tuple[str, ...] = (),
        state: dict[str, Any] | list[dict[str, Any]] | None = None,
        drop_last: bool = True,
        prefetch_factor: int = 4,
        grad_accum: int = 1,
        streams: int = 0,
    ):
        if streams < 0:
            raise UserError(f"--data-streams must be at least 0, not {streams}")
        streams = streams or default_streams(batch_size)
        if batch_size % streams or batch_size % (world_size * grad_accum):
            raise UserError(
                f"batch size {batch_size} must split into {streams} data streams and over "
                f"{world_size} ranks × {grad_accum} accumulation steps"
            )
        self.cfg, self.assemble, self.batch = cfg, assemble, batch_size
        self.streams, self.per_stream = streams, batch_size // streams
        self.rank, self.world, self.accum = rank, world_size, grad_accum
        self.drop_last = drop_last
        self.span = (rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        b = self.per_stream
        mine = [s for s in range(streams) if s * b < self.span[1] and (s + 1) * b > self.span[0]]
        self.step, self.positions = 0, {s: [0, 0] for s in mine}
        start = merge_states(state) if state else None
        if start is not None and (start["streams"], start["batch_size"]) != (streams, batch_size):
            # Another stream layout: the saved positions mean nothing, so fresh streams under a
            # new seed rather than a replay of data the run has already seen.
            log.warning("data layout changed since the checkpoint; data stream restarts")
            cfg = replace(cfg, seed=cfg.seed + 7919 * (int(start.get("step", 0)) + 1))
            self.cfg, start = cfg, None
        if start is not None:
            self.step = int(start["step"])
            for s in mine:
                self.positions[s] = list(start["positions"].get(s, [0, 0]))
        workers = min(num_workers, len(mine))  # a worker without a stream would only idle
        self.pieces_per_step = max(1, workers)
        per_stream_cfg = replace(cfg, shuffle_buffer=-(-cfg.shuffle_buffer // streams))
        dataset = StepPieces(
            per_stream_cfg, streams, b, mine, fields, required, dict(self.positions), self.step
        )
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            prefetch_factor=prefetch_factor if workers else None,
            persistent_workers=False,
            # Pieces as the workers made them: the default would turn numpy arrays into tensors.
            collate_fn=_as_is,
            # A private generator: creating the iterator must not draw from the global torch RNG,
            # which a resumed run restores.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def _steps(self) -> Iterator[tuple[int, dict[int, list], dict[int, list[int]], bool]]:
        """(step, stream → samples, stream → position after them, complete) per global step."""
        group: list[dict[str, Any]] = []
        for piece in self.loader:
            group.append(piece)
            if len(group) == self.pieces_per_step:
                yield self._join(group)
                group = []
        if group:
            yield self._join(group)

    def _join(self, group: list[dict[str, Any]]) -> tuple:
        samples = {s: v for p in group for s, v in p["samples"].items()}
        positions = {s: v for p in group for s, v in p["positions"].items()}
        complete = len(group) == self.pieces_per_step and all(p["complete"] for p in group)
        return group[0]["step"], samples, positions, complete

    def __iter__(self) -> Iterator[dict[str, Any]]:
        b, (lo, hi) = self.per_stream, self.span
        micro = (hi - lo) // self.accum
        for step, samples, positions, complete in self._steps():
            if not complete and self.drop_last:
                return
            # This rank's global positions, in global order: stream s holds s*b … s*b+b-1.
            rows = [
                (s * b + i, x)
                for s in sorted(samples)
                for i, x in enumerate(samples[s])
                if lo <= s * b + i < hi
            ]
            cuts = [rows[a * micro : (a + 1) * micro] for a in range(self.accum)]
            if not complete:
                cuts = [c for c in cuts if c] or []
            for a, cut in enumerate(cuts):
                if a == len(cuts) - 1:  # the step is taken once its last micro-batch is
                    self.step = step + 1
                    self.positions.update({s: list(p) for s, p in positions.items()})
                yield self._assemble(step, cut)
            if not complete:
                return

    def _assemble(self, step: int, rows: list[tuple[int, dict]]) -> dict[str, Any]:
        first = rows[0][0]
        rng = _rng(_BATCH, self.cfg.seed, step, first)
        # The task of a sampled-task recipe: one per step, the same on every rank.
        shared = _rng(_TASK, self.cfg.seed, step)
        batch = self.assemble([x for _, x in rows], rng, shared)
        batch["_seed"] = int(_rng(_FORWARD, self.cfg.seed, step, first).integers(2**62))
        return batch

    def state_dict(self) -> dict[str, Any]:
        """This rank's streams' positions; the union of every rank's resumes at any rank count."""
        return {
            "version": 2,
            "streams": self.streams,
            "batch_size": self.batch,
            "step": self.step,
            "positions": {str(s): p for s, p in self.positions.items()},
        }


def _as_is(piece: dict[str, Any]) -> dict[str, Any]:
    return piece


def default_streams(batch_size: int, most: int = 32) -> int:
    """The largest divisor of the batch size up to `most`: enough streams to spread over ranks
    (N ranks read disjoint shards when N divides it), few enough to keep open files bounded."""
    return max(d for d in range(1, min(batch_size, most) + 1) if batch_size % d == 0)


def merge_states(states: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any] | None:
    """One rank's loader state or all ranks' → one state (positions of every stream saved)."""
    states = [states] if isinstance(states, dict) else [s for s in states if s]
    if not states or any(s.get("version") != 2 for s in states):
        if states:
            log.warning("the checkpoint's data position has an older format; data stream restarts")
        return None
    first = states[0]
    if any((s["streams"], s["batch_size"], s["step"]) != (first["streams"], first["batch_size"],
           first["step"]) for s in states):  # fmt: skip
        raise UserError("the checkpoint's ranks disagree on the data position")
    positions = {int(k): [int(x) for x in v] for s in states for k, v in s["positions"].items()}
    return {**first, "positions": positions}


class StepPieces(IterableDataset):
    """A worker's share of a rank's streams: per global step, b decoded samples of each."""

    def __init__(
        self,
        cfg: StreamConfig,
        streams: int,
        per_stream: int,
        mine: list[int],
        fields: tuple[str, ...] | None,
        required: tuple[str, ...],
        positions: dict[int, list[int]],
        step: int,
    ):
        super().__init__()
        self.cfg, self.streams, self.b, self.mine = cfg, streams, per_stream, mine
        self.fields, self.required = fields, required
        self.positions, self.step = positions, step

    def _samples(self, s: int) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """Stream s's decodable samples that have the required fields, with positions."""
        chunk, skip = self.positions.get(s, [0, 0])
        told = False
        for raw, pos in SlotStream(self.cfg, s, self.streams).iterate(chunk, skip):
            if not all(f in raw for f in self.required):
                if not told:  # say it once per stream, not once per sample
                    missing = [f for f in self.required if f not in raw]
                    warnings.warn(
                        f"sample {raw['__key__']} lacks {missing}; such samples are skipped",
                        stacklevel=2,
                    )
                    told = True
                continue
            try:
                yield decode_sample(raw, self.fields), list(pos)
            except Exception as exn:  # a corrupt member costs one sample, not the run
                warnings.warn(f"sample {raw.get('__key__')}: {exn}; skipped", stacklevel=2)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, me = (info.num_workers, info.id) if info else (1, 0)
        own = self.mine[me::workers]
        its = {s: self._samples(s) for s in own}
        positions = {s: list(self.positions.get(s, [0, 0])) for s in own}
        step = self.step
        while True:
            samples: dict[int, list] = {}
            complete = True
            for s in own:
                got = []
                for sample, pos in its[s]:
                    got.append(sample)
                    positions[s] = pos
                    if len(got) == self.b:
                        break
                complete &= len(got) == self.b
                samples[s] = got
            if any(samples.values()) or complete:
                yield {
                    "step": step,
                    "samples": samples,
                    "positions": {s: list(p) for s, p in positions.items()},
                    "complete": complete,
                }
            if not complete:
                return
            step += 1
