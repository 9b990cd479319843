"""get_client: argument errors, connection errors and the GPU path's messages."""

from __future__ import annotations

import sys
import time
import types

import pytest

from dask_clip import get_client


def test_unknown_cluster_type_lists_the_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"one of \('cpu', 'gpu'\), not 'tpu'"):
        get_client("tpu")


def test_address_and_file_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        get_client(scheduler_address="tcp://127.0.0.1:8786", scheduler_file="scheduler.json")


@pytest.mark.parametrize(("option", "value"), [("n_workers", 0), ("n_workers", -1), ("threads_per_worker", 0)])
def test_no_workers_or_threads_is_refused_at_once(option: str, value: int) -> None:
    from dask_clip import UsageError

    started = time.perf_counter()
    with pytest.raises(UsageError, match=rf"{option} must be an integer of at least 1, not {value}"):
        get_client("cpu", timeout=5, **{option: value})
    assert time.perf_counter() - started < 2  # not after waiting for a worker that cannot come


def test_gpu_memory_options_are_refused_on_cpu() -> None:
    with pytest.raises(ValueError, match="cluster_type='gpu' only"):
        get_client("cpu", enable_spilling=True)


def test_an_rmm_pool_that_torch_would_not_use_is_refused() -> None:
    with pytest.raises(ValueError, match="torch does not allocate from an RMM pool"):
        get_client("gpu", rmm_pool_size="24GB")


@pytest.fixture
def healthy_gpu_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """One GPU that the driver sees and torch can use."""
    monkeypatch.setattr("dask_clip.distributed.client.count_gpus", lambda: 1)
    monkeypatch.setattr("dask_clip.distributed.client.check_torch_sees_gpus", lambda environment: None)


def test_gpu_options_reach_the_cuda_cluster(monkeypatch: pytest.MonkeyPatch, healthy_gpu_machine) -> None:
    received = {}

    def fake_cluster(**kwargs):
        received.update(kwargs)
        raise RuntimeError("stop here: the options were received")

    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = fake_cluster
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    with pytest.raises(RuntimeError, match="stop here"):
        get_client("gpu", enable_spilling=True, protocol="ucx")
    assert received["enable_cudf_spill"] is True and "rmm_pool_size" not in received
    assert received["protocol"] == "ucx" and received["resources"] == {"GPU": 1}
    # four embedding tasks asking for 0.25 of the GPU can run at once only with four threads
    assert received["threads_per_worker"] == 4


def test_no_scheduler_listening_is_a_clear_timeout() -> None:
    with pytest.raises(TimeoutError, match=r"cannot connect to tcp://127\.0\.0\.1:1 within 2s"):
        get_client(scheduler_address="tcp://127.0.0.1:1", timeout=2)


def test_gpu_without_dask_cuda_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dask_cuda", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "dask_clip\[gpu\]"'):
        get_client("gpu")


def test_gpu_on_a_machine_without_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kwargs: pytest.fail("must not start a CUDA cluster without a GPU")
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr("dask_clip.distributed.client.count_gpus", lambda: 0)
    with pytest.raises(RuntimeError, match="no GPU was found"):
        get_client("gpu")


@pytest.mark.gpu
def test_gpu_cluster_runs_a_task() -> None:
    with get_client("gpu") as client:
        assert client.submit(lambda: 1 + 1).result() == 2
