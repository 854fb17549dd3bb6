"""Loads each reward model once per process.

The key is the loader, its options and, for every file, its real path, size and modification time,
so a replaced file is loaded again. Hosts that manage memory (ComfyUI) move the cached modules
between devices themselves; :func:`clear_reward_cache` drops them.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, Hashable, Sequence, Tuple

_CACHE: Dict[Hashable, object] = {}
_LOCK = threading.Lock()


def _file_signature(path: str) -> Tuple:
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return (real, None, None)
    if os.path.isdir(real):
        stamps = tuple(sorted((n, os.stat(os.path.join(real, n)).st_mtime_ns) for n in os.listdir(real)))
        return (real, "dir", stamps)
    stat = os.stat(real)
    return (real, stat.st_size, stat.st_mtime_ns)


def cached_load(loader: Callable, paths: Sequence[str], **options):
    """``loader(*paths, **options)``, reusing an earlier result for the same files and options."""
    key = (
        getattr(loader, "__module__", ""), getattr(loader, "__qualname__", repr(loader)),
        tuple(_file_signature(p) for p in paths), tuple(sorted(options.items())),
    )
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    result = loader(*paths, **options)
    with _LOCK:
        _CACHE[key] = result
    return result


def clear_reward_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def cached_count() -> int:
    return len(_CACHE)
