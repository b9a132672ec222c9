"""Row-level progress from DoFns running in this process (in-memory and multi-threaded runners).

Workers in other processes or machines cannot reach the terminal; for them the driver falls back
to counting finished chunk checkpoints (see corpus.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_lock = threading.Lock()
_listener: Callable[[int], None] | None = None


def set_listener(listener: Callable[[int], None] | None) -> None:
    global _listener
    with _lock:
        _listener = listener


def advance(rows: int = 1) -> None:
    listener = _listener
    if listener is not None:
        with _lock:
            listener(rows)


def has_listener() -> bool:
    return _listener is not None
