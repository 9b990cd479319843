"""Start or connect to a Dask cluster and return a client with workers ready."""

from __future__ import annotations

import logging
import socket
from typing import Any

from distributed import Client, LocalCluster

from dask_clip.arguments import at_least, one_of
from dask_clip.errors import DeviceUnavailableError, UsageError
from dask_clip.gpu_environment import check_torch_sees_gpus, count_gpus, detect
from dask_clip.optional import require

logger = logging.getLogger(__name__)

CLUSTER_TYPES = ("cpu", "gpu")
GPU_WORKER_THREADS = 4
"""Threads of a local GPU worker: as many embedding tasks share its GPU at once as ``1 / num_gpus_per_worker``
of the embedders' default (0.25) allows, while their decode threads feed it."""


def current_client() -> Client | None:
    """The Dask client of this context (the one a user created, or the worker's own), or None."""
    from distributed import get_client as distributed_get_client

    try:
        return distributed_get_client()
    except ValueError:
        return None


def get_client(
    cluster_type: str = "cpu",
    scheduler_address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    timeout: float = 60.0,
    enable_spilling: bool = False,
    protocol: str | None = None,
    **cluster_kwargs: Any,
) -> Client:
    """A ``distributed.Client`` whose cluster has at least one connected worker.

    - ``scheduler_address`` (``"tcp://host:8786"``) or ``scheduler_file`` connects to a running
      cluster (started with ``dask scheduler`` / ``dask worker``); giving both is a ``ValueError``.
    - Otherwise ``cluster_type="cpu"`` starts a ``LocalCluster`` and ``"gpu"`` a
      ``dask_cuda.LocalCUDACluster`` (one worker per GPU, ``GPU_WORKER_THREADS`` threads each and a ``GPU``
      resource of 1, so that four embedding tasks asking for 0.25 share a GPU), passing ``n_workers``,
      ``threads_per_worker`` and ``cluster_kwargs`` on.
    - GPU clusters only: ``enable_spilling`` lets cuDF spill device memory to host; ``protocol``
      (``"tcp"``, ``"ucx"``; ``"ucx"`` needs the ``ucx`` extra) is passed to either kind of local cluster.
      There is no RMM pool option: torch allocates with its own caching allocator, so a pool would only
      take memory from the model.

    Raises ``UsageError`` for contradictory arguments or fewer than one worker or thread,
    ``DeviceUnavailableError`` / ``DeviceSetupError`` for a GPU cluster on a machine without a GPU torch can
    use, and ``TimeoutError`` when no worker has connected within ``timeout`` seconds.
    """
    one_of("cluster_type", cluster_type, CLUSTER_TYPES)
    if scheduler_address and scheduler_file:
        raise UsageError("give scheduler_address or scheduler_file, not both")
    if "rmm_pool_size" in cluster_kwargs:
        raise UsageError(
            "rmm_pool_size is not supported: torch does not allocate from an RMM pool, so the pool would only "
            "take GPU memory from the model"
        )
    for name, value in (("n_workers", n_workers), ("threads_per_worker", threads_per_worker)):
        if value is not None:
            at_least(name, value)  # a local cluster of no worker would only time out
    if cluster_type == "cpu" and enable_spilling:
        raise UsageError("enable_spilling applies to cluster_type='gpu' only")
    if protocol is not None:
        cluster_kwargs["protocol"] = protocol
    if cluster_type == "gpu" and enable_spilling:
        cluster_kwargs["enable_cudf_spill"] = True

    if scheduler_address or scheduler_file:
        where = scheduler_address or f"the scheduler in {scheduler_file}"
        try:
            client = Client(address=scheduler_address, scheduler_file=scheduler_file, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise TimeoutError(f"cannot connect to {where} within {timeout:g}s: {error}") from error
    else:
        where = f"the local {cluster_type} cluster"
        cluster = _start_local_cluster(cluster_type, n_workers, threads_per_worker, **cluster_kwargs)
        client = Client(cluster)
        logger.info("Dask dashboard: %s", client.dashboard_link)

    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError as error:
        client.close()
        raise TimeoutError(f"no workers connected to {where} within {timeout:g}s") from error
    return client


def _start_local_cluster(
    cluster_type: str, n_workers: int | None, threads_per_worker: int | None, **kwargs: Any
) -> Any:
    if cluster_type == "cpu":
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)
    local_cuda_cluster = require("dask_cuda", "gpu", "cluster_type='gpu'").LocalCUDACluster
    if count_gpus() == 0:
        raise DeviceUnavailableError(
            f"cluster_type='gpu' but no GPU was found on {socket.gethostname()} (NVML sees no device); "
            "use cluster_type='cpu' or run on a machine with an NVIDIA GPU and driver"
        )
    check_torch_sees_gpus(detect())  # the workers would see what this process sees
    kwargs.setdefault("resources", {"GPU": 1})
    threads = threads_per_worker or GPU_WORKER_THREADS
    return local_cuda_cluster(n_workers=n_workers, threads_per_worker=threads, **kwargs)
