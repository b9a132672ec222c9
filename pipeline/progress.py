"""Row-level progress from DoFns running in this process (in-memory and multi-threaded runners).

Crawl code only adds to a counter under a lock (updating a tqdm bar per row from 32 threads
measurably slowed the crawl); the driver's progress thread reads it twice a second. Workers in
other processes or machines cannot reach this counter: for them the driver counts finished chunk
checkpoints instead (see corpus.py).
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_done = 0


def advance(rows: int = 1) -> None:
    global _done
    with _lock:
        _done += rows


def rows_done() -> int:
    return _done


def reset() -> None:
    global _done
    with _lock:
        _done = 0
