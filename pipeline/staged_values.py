"""A stage's intermediate values as files: plain arrays and JSON, never pickle.

Why files: mining runs as several pipelines (mine_phases), and what one phase computes (a shard's
scan, a text bucket, the corpus statistics, a trained index) is read by the next ones from files
under the stage's work directory. Those files may sit in a shared bucket (gs://, s3://) that
other people can write to, so they are decoded without executing anything: numpy arrays with
`allow_pickle=False`, and a JSON description of the value's structure in which only the
dataclasses registered here (`register`) can be named.

The format is one `.npz`: `__value__` (the JSON, as uint8 bytes) and one array per ndarray or
sparse-matrix part, referred to from the JSON by number. Tuples, sets and dicts with non-string
keys are tagged so that they come back as they went in (a compact scene graph is tuples, which
the filters put in sets). numpy's npz writer and reader are the well-kept part; the structure
layer is ours because no library encodes dataclasses of arrays without pickle (msgpack and JSON
know neither arrays nor tuples; safetensors holds arrays only).
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import scipy.sparse as sp

from vlforge.pipeline import storage

T = TypeVar("T")
_TYPES: dict[str, type] = {}
_META = "__value__"


def register(cls: type[T]) -> type[T]:
    """Allow a dataclass to be written and read back (by its module and name)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    _TYPES[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


class _Encoder:
    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def array(self, value: np.ndarray) -> int:
        if value.dtype == object:
            raise TypeError("object arrays are not staged (they would need pickle)")
        self.arrays.append(value)
        return len(self.arrays) - 1

    def encode(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, int | float | np.integer | np.floating | np.bool_):
            return value.item() if isinstance(value, np.generic) else value
        if isinstance(value, np.ndarray):
            return {"$a": self.array(value)}
        if sp.issparse(value):
            csr = value.tocsr()
            parts = [self.array(csr.data), self.array(csr.indices), self.array(csr.indptr)]
            return {"$csr": parts, "shape": list(csr.shape)}
        if isinstance(value, list):
            if all(isinstance(v, str) for v in value):
                return value  # the common case (keys, captions): no per-item call
            return [self.encode(v) for v in value]
        if isinstance(value, tuple):
            return {"$t": [self.encode(v) for v in value]}
        if isinstance(value, set | frozenset):
            return {"$s": [self.encode(v) for v in sorted(value, key=repr)]}
        if isinstance(value, dict):
            if all(isinstance(k, str) and not k.startswith("$") for k in value):
                return {k: self.encode(v) for k, v in value.items()}
            return {"$d": [[self.encode(k), self.encode(v)] for k, v in value.items()]}
        if dataclasses.is_dataclass(value):
            name = f"{type(value).__module__}.{type(value).__qualname__}"
            if name not in _TYPES:
                raise TypeError(f"{name} is not registered with staged_values.register")
            fields = {
                f.name: self.encode(getattr(value, f.name)) for f in dataclasses.fields(value)
            }
            return {"$c": name, "f": fields}
        raise TypeError(f"cannot stage a {type(value).__name__}")


def _decode(node: Any, arrays: Any) -> Any:
    if isinstance(node, list):
        return [_decode(v, arrays) for v in node]
    if not isinstance(node, dict):
        return node
    if "$a" in node:
        return arrays[f"a{node['$a']}"]
    if "$csr" in node:
        data, indices, indptr = (arrays[f"a{i}"] for i in node["$csr"])
        return sp.csr_matrix((data, indices, indptr), shape=tuple(node["shape"]))
    if "$t" in node:
        return tuple(_decode(v, arrays) for v in node["$t"])
    if "$s" in node:
        return {_decode(v, arrays) for v in node["$s"]}
    if "$d" in node:
        return {_decode(k, arrays): _decode(v, arrays) for k, v in node["$d"]}
    if "$c" in node:
        cls = _TYPES.get(node["$c"])
        if cls is None:
            raise ValueError(f"staged value names an unknown type {node['$c']!r}")
        return cls(**{k: _decode(v, arrays) for k, v in node["f"].items()})
    return {k: _decode(v, arrays) for k, v in node.items()}


def encode(value: Any) -> bytes:
    """A value → the bytes of one .npz (see the module docstring)."""
    encoder = _Encoder()
    meta = json.dumps(encoder.encode(value), separators=(",", ":")).encode()
    arrays = {f"a{i}": a for i, a in enumerate(encoder.arrays)}
    buffer = io.BytesIO()
    np.savez(buffer, **{_META: np.frombuffer(meta, np.uint8)}, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> Any:
    """encode's bytes → the value (arrays loaded without pickle)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return _decode(json.loads(arrays.pop(_META).tobytes()), arrays)


def write(path: str, value: Any) -> str:
    storage.write_bytes(path, encode(value))
    return path


def read(path: str) -> Any:
    return decode(storage.read_bytes(path))


@dataclass(frozen=True)
class Staged:
    """A handle on a staged value: a path, and the run it belongs to (a later run in the same
    worker process may write another value at the same path)."""

    path: str
    run: str

    def get(self) -> Any:
        """The value, read once per process and kept (a few at a time: see _CACHE_SIZE)."""
        with _LOCK:
            if self in _CACHE:
                _CACHE.move_to_end(self)
                return _CACHE[self]
        value = read(self.path)
        with _LOCK:
            _CACHE[self] = value
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return value


# Corpus statistics, row starts, a reducer and a trained index per space: the values a phase's
# tasks all read. Bounded, so an old run's values do not stay in a long-lived worker.
_CACHE_SIZE = 8
_CACHE: OrderedDict[Staged, Any] = OrderedDict()
_LOCK = threading.Lock()


class WithStaged:
    """fn(element, *staged values, *args): a Beam callable that reads its small inputs from
    staged files (each worker once) instead of side inputs. Side inputs on DaskRunner recompute
    their whole upstream in every reading task (dask_fixes, point 2)."""

    def __init__(self, fn: Callable, *handles: Staged | dict, args: tuple = ()):
        self.fn, self.handles, self.args = fn, handles, args

    def __call__(self, element: Any) -> Any:
        values = [
            {k: h.get() for k, h in handle.items()} if isinstance(handle, dict) else handle.get()
            for handle in self.handles
        ]
        return self.fn(element, *values, *self.args)
