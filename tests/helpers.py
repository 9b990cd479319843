"""Helpers that tests import (fixtures live in conftest.py): a cluster started with Dask's own command-line
tools, as on many nodes, and what a run of the demo left."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple


class DemoRun(NamedTuple):
    """A ``dask-clip demo`` run: the folder it ran in (its output under ``demo_output/`` there) and what it printed."""

    folder: Path
    stdout: str


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
