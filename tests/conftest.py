"""Shared fixtures: generated shards, random-weight CLIP models and a real 2-worker LocalCluster."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dask_clip import testing

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight full CLIPModel (projection size 32) saved with save_pretrained."""
    return testing.save_random_clip_model(tmp_path_factory.mktemp("tiny-clip"), shape="tiny")


@pytest.fixture(scope="session")
def pristine_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards 00000, 00001, 00003 (a gap) of 6 rows, one failed download each, tar keys shuffled."""
    return testing.make_img2dataset_shards(tmp_path_factory.mktemp("pristine"))[0].parent


@pytest.fixture
def shards(pristine_shards: Path, tmp_path: Path) -> Path:
    """A private copy of the pristine shards, free to overwrite."""
    return Path(shutil.copytree(pristine_shards, tmp_path / "shards"))


@pytest.fixture(scope="session")
def client():
    """A real LocalCluster: 2 worker processes with 1 thread each."""
    from dask_clip import get_client

    with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0") as dask_client:
        yield dask_client
        dask_client.cluster.close()


@pytest.fixture
def cli(client, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., subprocess.CompletedProcess[str]]]:
    """Runs ``dask-clip ARGS`` in this process (``dask_clip.cli.main``), on the session's cluster unless ARGS name
    where to compute; returns its exit code and what it printed, as ``subprocess.run`` would."""
    from dask_clip.cli import main

    where = {"--cluster-type", "--scheduler-address", "--scheduler-file", "--n-workers"}
    dask_logs = logging.getLogger("distributed")
    level = dask_logs.level

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [*args] if where.intersection(args) else [*args, "--scheduler-address", client.scheduler.address]
        capsys.readouterr()
        returncode = main(argv)
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(argv, returncode, printed.out, printed.err)

    yield run
    dask_logs.setLevel(level)  # main quiets Dask's logs for the rest of its process


def start_cli_worker(scheduler_file: Path, name: str) -> subprocess.Popen:
    """A worker started with ``dask worker`` (as ``python -m``), one thread, on loopback."""
    command = [
        sys.executable,
        "-m",
        "distributed.cli.dask_worker",
        "--scheduler-file",
        str(scheduler_file),
        "--nthreads",
        "1",
        "--name",
        name,
        "--host",
        "127.0.0.1",
        "--dashboard-address",
        ":0",
    ]
    return subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.DEVNULL)


def start_cli_cluster(folder: Path, n_workers: int) -> tuple[list[subprocess.Popen], Path]:
    """A scheduler and ``n_workers`` workers started with Dask's own command-line tools, on loopback."""
    scheduler_file = folder / "scheduler.json"
    command = [
        sys.executable,
        "-m",
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dashboard-address",
        ":0",
        "--scheduler-file",
        str(scheduler_file),
    ]
    processes = [subprocess.Popen(command, stderr=subprocess.DEVNULL)]
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        assert time.monotonic() < deadline, "the scheduler did not start"
        time.sleep(0.1)
    processes += [start_cli_worker(scheduler_file, f"worker-{i}") for i in range(n_workers)]
    return processes, scheduler_file


def stop_processes(processes: list[subprocess.Popen]) -> None:
    """Workers first, then the scheduler (a worker whose scheduler is gone may wait to reconnect);
    whatever does not stop within 30 s of SIGTERM is killed."""
    for process in reversed(processes):
        process.terminate()
    for process in reversed(processes):
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
