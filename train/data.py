"""Streaming WebDataset loader: shard URLs → deterministic, resumable batches per rank and worker.

The stream of each (rank, worker) *slot* is a pure function of the seed and its position, so a
checkpoint stores a few integers per slot and a resumed run sees exactly the batches it would have.

- Shards are split into *units*: a shard, or 1/m of it (every m-th sample) when there are fewer
  shards than slots, so any shard count splits over any number of slots without overlap or loss.
- Epoch-free order: `epochs` walks reshuffled permutations of the units forever (each pass sees
  every sample once, slot s taking units s, s+S, s+2S, …); `resampled` draws units with
  replacement (open_clip's --dataset-resampled); `once` is one pass, for evaluation.
- A *chunk* is a few consecutive units of a slot read interleaved through a shuffle buffer that is
  drained at the chunk's end; a position is (chunk, samples emitted from it), so resuming re-reads
  at most one chunk's raw bytes, without decoding them.
- torch's DataLoader hands out worker batches round-robin; after a resume the physical worker p
  plays logical worker (p + consumed batches) mod W, so the round-robin order carries on as well.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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
_PERM, _RESAMPLE, _SHUFFLE, _BATCH, _TASK = 11, 12, 13, 14, 15


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
# Batches in workers, positions in the main process
# ---------------------------------------------------------------------------------------------

# (samples, this batch's RNG, an RNG shared by every rank's batch of the same step) → batch.
Assembler = Callable[
    [list[dict[str, Any]], np.random.Generator, np.random.Generator], dict[str, Any]
]


@dataclass
class LoaderState:
    """Where every logical worker of this rank stands: what a checkpoint stores for the data."""

    world_size: int = 1
    num_workers: int = 1
    consumed: int = 0  # batches this rank has taken
    # logical worker → [batches emitted, chunk, samples emitted in chunk]
    positions: dict[int, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "consumed": self.consumed,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        return cls(
            world_size=int(d["world_size"]),
            num_workers=int(d["num_workers"]),
            consumed=int(d["consumed"]),
            positions={int(k): [int(x) for x in v] for k, v in d["positions"].items()},
        )


class BatchStream(IterableDataset):
    """Decoded, assembled batches of one rank; each carries `_position` for the main process."""

    def __init__(
        self,
        cfg: StreamConfig,
        assemble: Assembler,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        fields: tuple[str, ...] | None = None,
        required: tuple[str, ...] = (),
        state: LoaderState | None = None,
        drop_last: bool = True,
    ):
        super().__init__()
        self.cfg, self.assemble, self.batch_size = cfg, assemble, batch_size
        self.rank, self.world_size = rank, world_size
        self.fields, self.required = fields, required
        self.state, self.drop_last = state, drop_last

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, physical = (info.num_workers, info.id) if info else (1, 0)
        rotation = self.state.consumed % workers if self.state else 0
        logical = (physical + rotation) % workers
        slot, slots = self.rank * workers + logical, self.world_size * workers
        batches, chunk, skip = (
            self.state.positions.get(logical, [0, 0, 0]) if self.state else [0, 0, 0]
        )
        stream = SlotStream(self.cfg, slot, slots)
        pending: list[dict[str, Any]] = []
        position, incomplete = (chunk, skip), 0
        for raw, position in stream.iterate(chunk, skip):
            if not all(f in raw for f in self.required):
                incomplete += 1
                if incomplete == 1:  # say it once per worker, not once per sample
                    missing = [f for f in self.required if f not in raw]
                    warnings.warn(
                        f"sample {raw['__key__']} lacks {missing}; such samples are skipped",
                        stacklevel=2,
                    )
                continue
            try:
                pending.append(decode_sample(raw, self.fields))
            except Exception as exn:  # a corrupt member costs one sample, not the run
                warnings.warn(f"sample {raw.get('__key__')}: {exn}; skipped", stacklevel=2)
                continue
            if len(pending) == self.batch_size:
                yield self._emit(pending, slot, batches, logical, workers, position)
                batches, pending = batches + 1, []
        if pending and not self.drop_last:
            yield self._emit(pending, slot, batches, logical, workers, position)

    def _emit(
        self, samples: list, slot: int, index: int, logical: int, workers: int, pos: tuple
    ) -> dict:
        # One RNG per batch, from its place in the stream: masking replays exactly on resume.
        # The shared RNG depends only on the rank's batch count (the same on every rank), so a
        # task-sampling recipe trains the same task on all ranks in a step.
        rng = _rng(_BATCH, self.cfg.seed, slot, index)
        shared = _rng(_TASK, self.cfg.seed, index * workers + logical)
        batch = self.assemble(samples, rng, shared)
        batch["_position"] = (logical, index + 1, pos[0], pos[1])
        return batch


class Loader:
    """A DataLoader over a BatchStream that tracks the position of what it has handed out."""

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
        state: dict[str, Any] | None = None,
        drop_last: bool = True,
        prefetch_factor: int = 4,
    ):
        workers = max(1, num_workers)
        start = LoaderState.from_dict(state) if state else None
        if start and (start.world_size, start.num_workers) != (world_size, workers):
            # The slot layout changed, so the old positions mean nothing: start fresh streams
            # under a new seed rather than replaying data the run has already seen.
            log.warning("data layout changed since the checkpoint; data stream restarts")
            cfg = StreamConfig(**{**cfg.__dict__, "seed": cfg.seed + 7919 * (start.consumed + 1)})
            start = None
        self.state = start or LoaderState(world_size=world_size, num_workers=workers)
        dataset = BatchStream(
            cfg, assemble, batch_size, rank, world_size, fields, required, start, drop_last
        )
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=prefetch_factor if num_workers else None,
            persistent_workers=False,
            # A private generator: creating the iterator must not draw from the global torch RNG,
            # which a resumed run restores for dropout.
            generator=torch.Generator().manual_seed(cfg.seed),
        )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            logical, batches, chunk, emitted = batch.pop("_position")
            self.state.positions[int(logical)] = [int(batches), int(chunk), int(emitted)]
            self.state.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.state.to_dict()
