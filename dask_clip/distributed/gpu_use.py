"""Saying, at the start of a run whose model tasks ask for a GPU, once and as a warning, why GPUs that the run
could use go unused: GPUs the NVIDIA driver sees but no worker offering the ``GPU`` resource, every task of a
host put on one of its several GPUs, or a torch that cannot use the GPUs the driver sees. A cluster without
any GPU (or with GPUs hidden on purpose by ``CUDA_VISIBLE_DEVICES``) runs on the CPU with an INFO line.

The check runs on the client (``execution`` calls it before computing), from the scheduler's view of the
workers' resources and a quick ``process_gpu_view`` on every worker, so it is as loud in a notebook as in a
script or the CLI.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from dask_clip.gpu_environment import ProcessGpuView, process_gpu_view

logger = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"
WORKERS_FIX = (
    "start one worker per GPU offering the resource (dask-cuda: `dask cuda worker --resources GPU=1`, or "
    "get_client(cluster_type='gpu') on one machine), or give device='cpu' to run on the CPU on purpose"
)
ONE_DEVICE_FIX = (
    "give each worker its own GPU: dask-cuda (`dask cuda worker --resources GPU=1`, or "
    "get_client(cluster_type='gpu')) sets CUDA_VISIBLE_DEVICES per worker, a LocalCluster or `dask worker` does not"
)
SHOWN_HOSTS = 3
"""Hosts a cause names before it says how many more there are."""
_announced: set[tuple[str, str]] = set()


def warn_of_unused_gpus(client: Any, workers: Mapping[str, Mapping[str, Any]]) -> None:
    """At the start of a run whose tasks ask for the ``GPU`` resource: a warning (once per client and cause) naming
    why GPUs go unused, else an INFO line when no worker offers the resource. ``workers`` is the scheduler's
    ``scheduler_info()["workers"]`` (address -> info with ``resources``); ``client`` is None for this process alone
    (the threaded scheduler)."""
    if client is None:
        views, offering = {"this process": process_gpu_view()}, None
    else:
        views = _views_of_workers(client)
        offering = {address for address, info in workers.items() if GPU_RESOURCE in info.get("resources", {})}
    causes = unused_gpu_causes(views, offering)
    announcement = (client.id if client is not None else "", "GPUs go unused in this run: " + " ".join(causes))
    if causes and announcement not in _announced:
        _announced.add(announcement)
        logger.warning(announcement[1])
    elif not causes and offering is not None and not offering:
        hidden = sorted({view.host for view in views.values() if view.driver_gpus and view.hidden})
        why = f"GPUs hidden on purpose by CUDA_VISIBLE_DEVICES on {_hosts(hidden)}" if hidden else ""
        logger.info("%s: models run on the CPU", why or "no worker sees a GPU")


def _views_of_workers(client: Any) -> dict[str, ProcessGpuView]:
    """``process_gpu_view`` of every worker, by address; a worker that cannot answer is named in a warning."""
    answers = client.run(process_gpu_view, on_error="return")
    for address, answer in answers.items():
        if not isinstance(answer, ProcessGpuView):
            logger.warning("cannot check whether worker %s uses its GPUs: %r", address, answer)
    return {address: answer for address, answer in answers.items() if isinstance(answer, ProcessGpuView)}


def unused_gpu_causes(views: Mapping[str, ProcessGpuView], offering: set[str] | None) -> list[str]:
    """Each reason the processes ``views`` (by worker address) leave GPUs unused, a sentence with its fix.

    ``offering`` is the workers that offer the ``GPU`` resource (the model tasks run there), None for this process
    alone (no resources).
    """
    seeing = [view for view in views.values() if view.driver_gpus and not view.hidden]
    causes = []
    if offering is not None and not offering and seeing:
        causes.append(
            f"the NVIDIA driver sees GPUs on {_hosts(view.host for view in seeing)} but no worker offers the "
            f"`{GPU_RESOURCE}` resource, so tasks are not packed num_gpus_per_worker to a GPU: every worker "
            f"process puts its own model on one GPU, or runs on the CPU. Fix: {WORKERS_FIX}."
        )
    running = [view for address, view in views.items() if not offering or address in offering]
    by_host: dict[str, list[ProcessGpuView]] = defaultdict(list)
    for view in running:
        if view.torch_uses_gpus:
            by_host[view.host].append(view)
    crowded = [
        f"{host} ({'this process' if offering is None else f'{len(on_host)} worker(s)'} on GPU "
        f"{on_host[0].device} of {on_host[0].driver_gpus})"
        for host, on_host in by_host.items()
        if on_host[0].driver_gpus > 1 and len({view.device for view in on_host}) == 1
    ]
    if crowded:
        causes.append(
            f"every task of a host runs on one of the several GPUs its driver sees: {_hosts(crowded)}. "
            f"Fix: {ONE_DEVICE_FIX}."
        )
    blind = [view for view in running if view.environment is not None and not view.torch_uses_gpus]
    if blind:
        environment = blind[0].environment
        built = f"built for CUDA {environment.torch_cuda}" if environment.torch_cuda else "a CPU-only build"
        causes.append(
            f"torch {environment.torch_version} ({built}) cannot use the GPUs the NVIDIA driver "
            f"{environment.driver_version} sees on {_hosts(view.host for view in blind)}; model tasks with "
            f"device=None stop with a DeviceSetupError. Fix: {environment.torch_mismatch_fix()}."
        )
    return causes


def _hosts(hosts: Iterable[str]) -> str:
    """``"host(s) a, b, c and 2 more"``: the distinct ``hosts`` in order, the first ``SHOWN_HOSTS`` named."""
    distinct = list(dict.fromkeys(hosts))
    shown = ", ".join(distinct[:SHOWN_HOSTS])
    more = len(distinct) - SHOWN_HOSTS
    return f"host(s) {shown}" + (f" and {more} more" if more > 0 else "")
