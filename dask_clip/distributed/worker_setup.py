"""Preparing worker processes: memory allocator tuning for every worker, and loading an operation's model
ahead of its first shard. Both are ``WorkerPlugin``s, so workers that join later are prepared too."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from distributed import WorkerPlugin

from dask_clip.errors import UsageError

MALLOC_MMAP_THRESHOLD = 32 * 2**20
MALLOC_TRIM_THRESHOLD = 64 * 2**20


def reuse_freed_memory() -> bool:
    """Let glibc's malloc reuse freed memory for the next batch instead of returning it to the OS.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also freezes malloc's mmap
    threshold at 128 KiB: every tensor and decoded image larger than that is then mmap'd and
    unmapped per operation, and its pages faulted in again each time. That halves the throughput of
    a small CLIP on one CPU thread and slows decoding by ~25%. Raising both thresholds (to 32 MiB and
    64 MiB) keeps at most a few tens of MiB more per malloc arena. Returns whether it was applied
    (only with glibc).
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)
    )


class MemoryTuningPlugin(WorkerPlugin):
    """``reuse_freed_memory`` in every worker process, when it starts (or when the plugin is registered)."""

    idempotent = True
    name = "dask_clip-memory-tuning"

    def setup(self, worker: Any) -> None:
        reuse_freed_memory()


class ModelWarmupPlugin(WorkerPlugin):
    """Load an operation's model into the worker's cache at worker start-up (once per cache key)."""

    idempotent = True

    def __init__(self, operation: Any) -> None:
        self.model = operation.model
        self.name = f"dask_clip-warmup-{self.model.cache_key}"

    def setup(self, worker: Any) -> None:
        self.model.get()


def prepare_workers(operation: Any, client: Any = None) -> None:
    """Load ``operation``'s model on every worker of ``client`` (the current one by default), now and on join.

    ``operation`` is anything with a ``model`` spec: an embedder, a classifier. ``UsageError`` for one without.
    """
    from dask_clip.distributed.client import current_client

    if getattr(operation, "model", None) is None:
        raise UsageError(f"{type(operation).__name__} has no model to load on the workers")
    client = client or current_client()
    if client is None:
        raise UsageError("prepare_workers needs a Dask client: call get_client() first, or pass client=")
    client.register_plugin(ModelWarmupPlugin(operation))
