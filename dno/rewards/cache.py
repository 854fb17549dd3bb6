"""Loads each reward model once per process, and keeps only a few.

An entry is the loader, its options and the files' real paths; it remembers each file's size and
modification time, so a replaced file is loaded again and its old model is dropped, not kept
beside the new one. At most ``MAX_CACHED`` models stay cached, the least recently used going
first. Hosts that manage memory (ComfyUI) move the cached modules between devices themselves;
:func:`clear_reward_cache` drops them all.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Callable, Hashable, Sequence, Tuple

MAX_CACHED = 4
_CACHE: "OrderedDict[Hashable, Tuple[Tuple, object]]" = OrderedDict()
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
        tuple(os.path.realpath(p) for p in paths), tuple(sorted(options.items())),
    )
    stamps = tuple(_file_signature(p) for p in paths)
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry[0] == stamps:
            _CACHE.move_to_end(key)
            return entry[1]
        _CACHE.pop(key, None)           # a replaced file: its old model goes now
    result = loader(*paths, **options)
    with _LOCK:
        _CACHE[key] = (stamps, result)
        _CACHE.move_to_end(key)
        while len(_CACHE) > MAX_CACHED:
            _CACHE.popitem(last=False)
    return result


def clear_reward_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def cached_count() -> int:
    return len(_CACHE)
