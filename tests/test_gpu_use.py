"""A run that could use GPUs and does not says so at its start, once, as a warning naming the cause and the fix;
a cluster without GPUs says it runs on the CPU at INFO only. No GPU here: what NVML and torch report is
simulated, on in-process workers (which share this process's NVML, torch and ``CUDA_VISIBLE_DEVICES``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from distributed import Client, LocalCluster, Worker

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, gpu_environment
from dask_clip.distributed import gpu_use
from dask_clip.distributed.gpu_use import unused_gpu_causes, warn_of_unused_gpus
from dask_clip.execution import compute, map_shards
from dask_clip.gpu_environment import GpuEnvironment, ProcessGpuView

LOGGER = "dask_clip.distributed.gpu_use"


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """``machine(driver_gpus, torch_gpus, torch_cuda="13.0", visible=None)``: what NVML, torch and
    ``CUDA_VISIBLE_DEVICES`` report from now on in this process and its in-process workers."""
    monkeypatch.setattr(gpu_use, "_announced", set())  # each test is a new run

    def simulate(driver_gpus: int, torch_gpus: int, torch_cuda: str | None = "13.0", visible: str | None = None):
        monkeypatch.setattr(gpu_environment, "driver_view", lambda: (driver_gpus, "580.65", "13.0"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: torch_gpus)
        monkeypatch.setattr(torch.version, "cuda", torch_cuda)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)

    return simulate


def in_process_cluster(resources: dict[str, float]):
    """Two in-process workers offering ``resources``, and a client to them."""
    cluster = LocalCluster(n_workers=0, processes=False, dashboard_address=":0")
    for name in ("a", "b"):
        cluster.worker_spec[name] = {"cls": Worker, "options": {"nthreads": 1, "resources": resources}}
    cluster.sync(cluster._correct_state)
    client = Client(cluster)
    client.wait_for_workers(2)
    return cluster, client


@pytest.fixture(scope="module")
def plain_workers():
    """Workers that offer no ``GPU`` resource (a LocalCluster, ``dask worker`` without ``--resources``)."""
    cluster, client = in_process_cluster({})
    with cluster, client:
        yield client


@pytest.fixture(scope="module")
def gpu_workers():
    """Workers that offer ``GPU=1`` each."""
    cluster, client = in_process_cluster({"GPU": 1})
    with cluster, client:
        yield client


def run_twice(client: Client, shards: Path) -> None:
    """Two computes of a step whose tasks ask for a quarter of a GPU, as an embedder's do (nothing on a GPU)."""

    def unchanged(rows, task):
        return rows

    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    frame = map_shards(
        unchanged, dataset.pandas_metadata, dataset.shards, dataset.meta, id_col="key", resources={"GPU": 0.25}
    )
    with client.as_current():
        assert len(compute(frame)) == len(dataset.metadata)
        assert compute(frame.key.count()) == len(dataset.metadata)


def warnings_in(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER and record.levelname == "WARNING"]


def test_gpus_without_a_gpu_resource_are_a_warning_once_per_run(machine, plain_workers, pristine_shards, caplog):
    machine(driver_gpus=4, torch_gpus=4)  # a LocalCluster on a 4-GPU machine
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_twice(plain_workers, pristine_shards)
    [warning] = warnings_in(caplog)  # once, not per task or per compute
    assert "no worker offers the `GPU` resource" in warning
    assert "dask cuda worker --resources GPU=1" in warning and "get_client(cluster_type='gpu')" in warning
    assert "(2 worker(s) on GPU 0 of 4)" in warning  # and both workers put their model on the first GPU


def test_workers_pinned_to_one_of_several_gpus_are_a_warning(machine, gpu_workers, pristine_shards, caplog):
    machine(driver_gpus=4, torch_gpus=1, visible="0")  # every worker started with CUDA_VISIBLE_DEVICES=0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_twice(gpu_workers, pristine_shards)
    [warning] = warnings_in(caplog)
    assert "every task of a host runs on one of the several GPUs" in warning
    assert "(2 worker(s) on GPU 0 of 4)" in warning and "sets CUDA_VISIBLE_DEVICES per worker" in warning
    assert "no worker offers" not in warning


def test_a_torch_without_cuda_on_a_gpu_machine_is_a_warning(machine, gpu_workers, pristine_shards, caplog):
    machine(driver_gpus=2, torch_gpus=0, torch_cuda=None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_twice(gpu_workers, pristine_shards)
    [warning] = warnings_in(caplog)
    assert f"torch {torch.__version__} (a CPU-only build) cannot use the GPUs the NVIDIA driver 580.65" in warning
    assert "install a CUDA build of torch" in warning


def test_a_cpu_only_cluster_says_so_at_info_only(machine, plain_workers, pristine_shards, tiny_model, caplog, tmp_path):
    machine(driver_gpus=0, torch_gpus=0)
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    with caplog.at_level(logging.INFO, logger=LOGGER), plain_workers.as_current():
        ClipImageEmbedder(str(tiny_model), batch_size=4)(dataset).save_metadata(str(tmp_path / "out"))
    assert not warnings_in(caplog)
    assert "no worker sees a GPU: models run on the CPU" in caplog.messages


def test_gpus_hidden_on_purpose_are_not_a_warning(machine, plain_workers, pristine_shards, caplog) -> None:
    machine(driver_gpus=2, torch_gpus=0, visible="")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        run_twice(plain_workers, pristine_shards)
    assert not warnings_in(caplog)
    assert any("GPUs hidden on purpose by CUDA_VISIBLE_DEVICES" in message for message in caplog.messages)


def view(host: str, driver_gpus: int, visible: str | None, torch_gpus: int, torch_cuda: str | None = "13.0"):
    environment = GpuEnvironment(host, driver_gpus, "580.65", "13.0", "2.11.0", torch_cuda, torch_gpus)
    return ProcessGpuView(host, driver_gpus, visible, environment if driver_gpus else None)


def test_one_worker_per_gpu_leaves_none_unused() -> None:
    dask_cuda_like = {f"w{i}": view("gpu-1", 4, ",".join(str((i + j) % 4) for j in range(4)), 4) for i in range(4)}
    assert unused_gpu_causes(dask_cuda_like, offering=set(dask_cuda_like)) == []
    one_gpu = {"w0": view("gpu-1", 1, None, 1), "cpu": view("cpu-1", 0, None, 0)}
    assert unused_gpu_causes(one_gpu, offering={"w0"}) == []
    # a host whose workers use two of its four GPUs is not "every task on one device"
    by_uuid = {"w0": view("gpu-2", 4, "GPU-aa", 1), "w1": view("gpu-2", 4, "GPU-bb", 1)}
    assert unused_gpu_causes(by_uuid, offering={"w0", "w1"}) == []


def test_only_the_workers_that_run_gpu_tasks_count_and_hosts_are_summarised() -> None:
    views = {"gpu": view("gpu-1", 2, "1", 1), "cpu": view("gpu-1", 2, "0", 1)}
    assert unused_gpu_causes(views, offering={"gpu"}) != []  # only "gpu" runs the model tasks: GPU 0 idle
    many = {f"w{i}": view(f"node-{i}", 8, "0", 1) for i in range(5)}
    [cause] = unused_gpu_causes(many, offering=set(many))
    assert "host(s) node-0 (1 worker(s) on GPU 0 of 8), node-1" in cause and "and 2 more" in cause


def test_this_process_alone_is_checked_without_a_client(machine, caplog) -> None:
    machine(driver_gpus=8, torch_gpus=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        warn_of_unused_gpus(None, {})
        warn_of_unused_gpus(None, {})
    [warning] = warnings_in(caplog)
    assert "(this process on GPU 0 of 8)" in warning and "no worker offers" not in warning


def test_a_worker_that_cannot_be_checked_is_named(caplog) -> None:
    class Unreachable:
        id = "client-1"

        def run(self, function, on_error):
            return {"tcp://10.0.0.7:40000": OSError("worker lost")}

    with caplog.at_level(logging.WARNING, logger=LOGGER):
        warn_of_unused_gpus(Unreachable(), {"tcp://10.0.0.7:40000": {"resources": {}}})
    [warning] = warnings_in(caplog)
    assert "cannot check whether worker tcp://10.0.0.7:40000 uses its GPUs" in warning and "worker lost" in warning


def test_the_view_imports_torch_only_when_the_driver_sees_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_environment, "driver_view", lambda: (0, None, None))
    monkeypatch.setattr(gpu_environment, "detect", lambda: pytest.fail("torch must not be asked"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-3f,0")
    seen = gpu_environment.process_gpu_view()
    assert seen.environment is None and seen.device == "MIG-3f" and not seen.hidden
