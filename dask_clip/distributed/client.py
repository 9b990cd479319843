"""Start or connect to a Dask cluster and return a client with workers ready."""

from __future__ import annotations

import logging
from typing import Any

from distributed import Client, LocalCluster

logger = logging.getLogger(__name__)

CLUSTER_TYPES = ("cpu", "gpu")
GPU_EXTRA_HINT = 'pip install "dask_clip[gpu]"'


def get_client(
    cluster_type: str = "cpu",
    scheduler_address: str | None = None,
    scheduler_file: str | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    timeout: float = 60.0,
    rmm_pool_size: str | int | None = None,
    enable_spilling: bool = False,
    protocol: str | None = None,
    **cluster_kwargs: Any,
) -> Client:
    """A ``distributed.Client`` whose cluster has at least one connected worker.

    - ``scheduler_address`` (``"tcp://host:8786"``) or ``scheduler_file`` connects to a running
      cluster (started with ``dask scheduler`` / ``dask worker``); giving both is a ``ValueError``.
    - Otherwise ``cluster_type="cpu"`` starts a ``LocalCluster`` and ``"gpu"`` a
      ``dask_cuda.LocalCUDACluster`` (one worker per GPU), passing ``n_workers``,
      ``threads_per_worker`` and ``cluster_kwargs`` on.
    - GPU clusters only: ``rmm_pool_size`` (e.g. ``"24GB"``) pre-allocates an RMM memory pool per
      GPU, ``enable_spilling`` lets cuDF spill device memory to host; ``protocol`` (``"tcp"``,
      ``"ucx"``) is passed to either kind of local cluster.

    Raises ``TimeoutError`` when no worker has connected within ``timeout`` seconds.
    """
    if cluster_type not in CLUSTER_TYPES:
        raise ValueError(f"cluster_type must be one of {CLUSTER_TYPES}, not {cluster_type!r}")
    if scheduler_address and scheduler_file:
        raise ValueError("give scheduler_address or scheduler_file, not both")
    gpu_options = {"rmm_pool_size": rmm_pool_size, "enable_cudf_spill": enable_spilling}
    if cluster_type == "cpu" and (rmm_pool_size is not None or enable_spilling):
        raise ValueError("rmm_pool_size and enable_spilling apply to cluster_type='gpu' only")
    if protocol is not None:
        cluster_kwargs["protocol"] = protocol
    if cluster_type == "gpu":
        cluster_kwargs.update({name: value for name, value in gpu_options.items() if value})

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


def _start_local_cluster(cluster_type: str, n_workers: int | None, threads_per_worker: int | None, **kwargs: Any) -> Any:
    if cluster_type == "cpu":
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)
    local_cuda_cluster = _import_local_cuda_cluster()
    gpu_count = count_gpus()
    if gpu_count == 0:
        raise RuntimeError(
            "cluster_type='gpu' but no GPU was found (NVML sees no device); "
            "use cluster_type='cpu' or run on a machine with an NVIDIA GPU and driver"
        )
    kwargs.setdefault("resources", {"GPU": 1})
    return local_cuda_cluster(n_workers=n_workers, threads_per_worker=threads_per_worker or 1, **kwargs)


def _import_local_cuda_cluster() -> Any:
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as error:
        raise ImportError(f"cluster_type='gpu' needs dask-cuda: {GPU_EXTRA_HINT} ({error})") from error
    return LocalCUDACluster


def count_gpus() -> int:
    """How many NVIDIA GPUs NVML sees; 0 when there is no driver or no device."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - every NVML failure means the same thing here: no usable GPU
        return 0
