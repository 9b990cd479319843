"""A WorkerPlugin that loads an embedder's model on every worker, including workers that join later."""

from __future__ import annotations

from typing import Any

from distributed import WorkerPlugin

from dask_clip.distributed.model_cache import get_or_load


class ModelWarmupPlugin(WorkerPlugin):
    """Load ``embedder``'s model into the worker's cache at worker start-up (once per cache key).

    Registered with ``client.register_plugin``, it runs on every current worker and on each worker
    that joins afterwards, so the first shard a new worker gets does not wait for a model load.
    """

    idempotent = True

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.name = f"dask_clip-warmup-{embedder.cache_key}"

    def setup(self, worker: Any) -> None:
        get_or_load(self.embedder.cache_key, self.embedder.load_model)


def prepare_workers(embedder: Any, client: Any = None) -> None:
    """Load ``embedder``'s model on every worker of ``client`` (the current one by default), now and on join."""
    from distributed import get_client

    (client or get_client()).register_plugin(ModelWarmupPlugin(embedder))
