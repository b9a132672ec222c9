"""Shard I/O for mining: raw samples out of WebDataset tars, and tars back with mine.json added.

Members are read as raw bytes through webdataset's tar iterators only (no decoders: its defaults
unpickle), and written back byte for byte, so every earlier field survives a mining pass.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator

import apache_beam as beam
import pyarrow as pa
import webdataset as wds
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from vlforge.errors import UserError
from vlforge.pipeline import storage

# Same fixed member mtime as the corpus writer: reruns give byte-identical shards.
_FIXED_MTIME = 1_700_000_000.0
MINE_FIELD = "mine.json"


def list_shards(source: str) -> list[str]:
    """--in as a directory, a glob or one .tar → sorted shard paths; a UserError if none."""
    if source.endswith(".tar") and not any(c in source for c in "*?["):
        found = [source] if storage.exists(source) else []
    elif any(c in source for c in "*?["):
        found = [p for p in storage.glob(source) if p.endswith(".tar")]
    else:
        found = storage.glob(storage.join(source, "*.tar"))
    found = [p for p in found if not p.rsplit("/", 1)[-1].startswith(".tmp-")]
    if not found:
        raise UserError(f"{source}: no .tar shards found")
    return found


def read_samples(path: str) -> Iterator[dict]:
    """{"__key__": str, ext: bytes, ...} per sample, in the tar's order."""
    try:
        with FileSystems.open(path, compression_type=storage.RAW) as handle:
            stream = io.BytesIO(handle.read())
        members = ({**m, "__url__": path} for m in wds.tariterators.tar_file_iterator(stream))
        for sample in wds.tariterators.group_by_keys(members):
            yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}
    except (OSError, ValueError, tarfile.TarError) as err:
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


def check_shard(path: str) -> None:
    """Fail before the pipeline starts if a shard's first header is not a tar header."""
    try:
        with FileSystems.open(path, compression_type=storage.RAW) as handle:
            head = handle.read(1024 * 64)
        with tarfile.open(fileobj=io.BytesIO(head), mode="r|*") as tar:
            tar.next()
    except (OSError, ValueError, tarfile.TarError) as err:
        if isinstance(err, tarfile.ReadError) and "unexpected end" in str(err):
            return  # a member larger than the probe: the header itself was fine
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from err


def _json(data: bytes | None) -> dict | None:
    if not data:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def light_record(sample: dict, shard: str) -> dict:
    """The fields mining reads; the image and features stay in the shard."""
    meta = _json(sample.get("json")) or {}
    caption = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
    return {
        "key": sample["__key__"],
        "shard": shard,
        "caption": caption,
        # Two samples of the same picture are never each other's negatives.
        "image": str(meta.get("sha256") or sample["__key__"]),
        "sg": _json(sample.get("sg.json")),
        "tags": _json(sample.get("tags.json")),
    }


class ReadLightRecords(beam.DoFn):
    """Shard path → light records (key, caption, scene graph, tags)."""

    def __init__(self):
        self.samples = Metrics.counter("mine", "samples_in")

    def process(self, path: str):
        for sample in read_samples(path):
            if "txt" not in sample:
                continue  # nothing to mine; the writer still copies it through
            self.samples.inc()
            yield light_record(sample, path)


def output_path(shard: str, out_dir: str) -> str:
    return storage.join(out_dir, shard.rsplit("/", 1)[-1])


class WriteMinedShard(beam.DoFn):
    """(input shard path, {key: mine dict}) → the same shard in out_dir with mine.json added."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.written = Metrics.counter("mine", "samples_out")

    def process(self, element):
        shard, mined = element
        mined = dict(mined)
        target = output_path(shard, self.out_dir)
        counts = []
        with storage.atomic_writer(target) as handle:
            writer = wds.TarWriter(handle, mtime=_FIXED_MTIME, encoder=False)
            for sample in read_samples(shard):
                key = sample["__key__"]
                out = dict(sample)
                if key in mined:
                    out[MINE_FIELD] = json.dumps(mined[key], sort_keys=True).encode()
                writer.write(out)
                counts.append(_counts(key, mined.get(key)))
            writer.close()
        self._write_stats(shard, target, counts)
        self.written.inc(len(counts))
        yield {"shard": target.rsplit("/", 1)[-1], "samples": len(counts)}

    @staticmethod
    def _write_stats(shard: str, target: str, counts: list[dict]) -> None:
        """The sibling parquet, with the mining counts joined on as columns."""
        source = shard[: -len(".tar")] + ".parquet"
        dest = target[: -len(".tar")] + ".parquet"
        extra = pa.Table.from_pylist(counts)
        if storage.exists(source):
            table = storage.read_parquet(source)
            if "key" in table.column_names and table.num_rows:
                by_key = {c["key"]: c for c in counts}
                for name in ("n_hard_negatives", "n_positives", "n_image_positives", "n_rewrites"):
                    values = [
                        by_key.get(k, {}).get(name, 0) for k in table.column("key").to_pylist()
                    ]
                    if name in table.column_names:
                        table = table.drop_columns([name])
                    table = table.append_column(name, pa.array(values, pa.int32()))
                storage.write_parquet(dest, table)
                return
        storage.write_parquet(dest, extra)


def _counts(key: str, mine: dict | None) -> dict:
    mine = mine or {}
    return {
        "key": key,
        "n_hard_negatives": len(mine.get("hard_negatives", [])),
        "n_positives": len(mine.get("positives", [])),
        "n_image_positives": len(mine.get("image_positives", [])),
        "n_rewrites": len(mine.get("rewrites", [])),
    }
