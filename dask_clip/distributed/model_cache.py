"""A per-process cache of loaded models, keyed by a configuration key fixed on the client.

Every Dask worker process keeps its own cache (module state lives per process), so a model is
loaded once per worker and configuration and reused by every partition and every later call.
Outside a cluster (a notebook without a client, unit tests) the same cache serves the local process.
"""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from dask_clip.distributed.client import current_client

_models: dict[str, Any] = {}
_load_counts: Counter[str] = Counter()
_key_locks: dict[str, threading.Lock] = {}
_registry_lock = threading.Lock()


def make_cache_key(kind: str, config: dict[str, Any]) -> str:
    """A short, stable key for one model configuration: ``"<kind>-<12 hex digits>"``."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    return f"{kind}-{digest[:12]}"


def get_or_load(key: str, load: Callable[[], Any]) -> Any:
    """The model cached under ``key`` in this process, calling ``load()`` only on the first request.

    Threads of one worker asking for the same key at once wait for a single load.
    """
    with _registry_lock:
        lock = _key_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _models:
            _models[key] = load()
            _load_counts[key] += 1
        return _models[key]


def local_cache_info() -> dict[str, int]:
    """For this process: each cached key and how many times it was loaded since the last clear."""
    return {key: _load_counts[key] for key in _models}


def clear_local_cache() -> list[str]:
    """Drop every cached model of this process and its load counts (and free GPU memory).

    Returns the keys dropped.
    """
    with _registry_lock:
        dropped = list(_models)
        _models.clear()
        _load_counts.clear()
    gc.collect()
    try:
        import torch
    except ImportError:
        return dropped
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dropped


def cache_info(client: Any = None) -> dict[str, dict[str, int]]:
    """Per worker address, the cached model keys and how many times each was loaded.

    ``client=None`` uses the current Dask client; with none, the local process, under ``"local"``.
    """
    client = client or current_client()
    if client is None:
        return {"local": local_cache_info()}
    return client.run(local_cache_info)


def clear_cache(client: Any = None) -> dict[str, list[str]]:
    """Free every cached model on every worker (or locally); returns the keys dropped per worker."""
    client = client or current_client()
    if client is None:
        return {"local": clear_local_cache()}
    return client.run(clear_local_cache)
