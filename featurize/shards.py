"""Reading and writing WebDataset shards without ever unpickling: raw bytes in, raw bytes out.

webdataset's default decoders call `pickle.loads` on .pkl/.pyd and `torch.load` on .pth, and a
shard is untrusted input. Featurize therefore reads every field as bytes (writing earlier fields
back byte for byte) and decodes only through `safe_decoder`, whose handler list is explicit:
txt, json, npy (allow_pickle=False), jpg/png images; anything else stays bytes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator

import numpy as np
import webdataset as wds
from apache_beam.io.filesystems import FileSystems
from webdataset.tariterators import group_by_keys, tar_file_iterator

from vlforge.pipeline import storage

FIXED_MTIME = 1_700_000_000  # as the corpus writer; an int: a float costs a pax header a member
SAFE_EXTENSIONS = ("txt", "json", "npy", "jpg", "jpeg", "png")


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def safe_decoder(image: str = "rgb8") -> wds.Decoder:
    """A decoder with no pickle path: no default pre/post handlers, unknown extensions stay bytes.

    Use it as a map, `wds.WebDataset(url).map(safe_decoder())`: `.decode(...)` would add
    webdataset's default post-handlers, which unpickle.
    """
    handlers = [
        wds.handle_extension("txt", lambda b: b.decode("utf-8")),
        wds.handle_extension("json", json.loads),
        wds.handle_extension("npy", _npy),
        wds.imagehandler(image, extensions=["jpg", "jpeg", "png"]),
    ]
    return wds.Decoder(handlers, pre=[], post=[])


def read_raw_samples(path: str) -> Iterator[dict]:
    """Samples of one tar shard as {"__key__": str, ext: bytes, ...}, in the shard's order."""
    with FileSystems.open(path, compression_type=storage.RAW) as stream:
        files = ({**f, "__url__": path} for f in tar_file_iterator(stream))
        for sample in group_by_keys(files):
            yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def write_shard(path: str, samples: Iterable[dict]) -> int:
    """Write samples (bytes or str values) to `path` under a temporary name, then rename."""
    count = 0
    with storage.atomic_writer(path) as handle:
        writer = wds.TarWriter(handle, mtime=FIXED_MTIME)
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()  # writes the end blocks; atomic_writer closes the handle
    return count
