"""A cluster started as on many nodes: `dask scheduler` and `dask worker` processes on loopback."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, cache_info, get_client, prepare_workers

from .helpers import start_cli_cluster, start_cli_worker, stop_processes


@pytest.fixture
def cli_cluster(tmp_path: Path):
    processes, scheduler_file = start_cli_cluster(tmp_path, n_workers=1)
    yield processes, scheduler_file
    stop_processes(processes)


@pytest.mark.slow
def test_python_api_and_cli_on_a_scheduler_file_cluster(
    cli, cli_cluster, shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    _, scheduler_file = cli_cluster
    with get_client(scheduler_file=str(scheduler_file)) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        summary = ClipImageEmbedder(str(tiny_model))(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata(
            str(tmp_path / "api")
        )
    assert summary["written"].all()

    result = cli(
        "embed",
        str(shards),
        "--model-dir",
        str(tiny_model),
        "--output",
        str(tmp_path / "cli"),
        "--scheduler-file",
        str(scheduler_file),
    )
    assert result.returncode == 0, result.stderr
    for stem in ("00000", "00001", "00003"):
        assert pq.read_table(tmp_path / "cli" / f"{stem}.parquet").equals(
            pq.read_table(tmp_path / "api" / f"{stem}.parquet")
        )


@pytest.mark.slow
def test_workers_that_join_late_get_the_model(cli_cluster, tiny_model: Path) -> None:
    processes, scheduler_file = cli_cluster
    embedder = ClipImageEmbedder(str(tiny_model))
    with get_client(scheduler_file=str(scheduler_file)) as client:
        prepare_workers(embedder, client)
        assert [counts for counts in cache_info(client).values()] == [{embedder.model.cache_key: 1}]
        processes.append(start_cli_worker(scheduler_file, "late"))
        client.wait_for_workers(2, timeout=60)
        deadline = time.monotonic() + 60
        while list(cache_info(client).values()) != [{embedder.model.cache_key: 1}] * 2:
            assert time.monotonic() < deadline, cache_info(client)
            time.sleep(0.2)
