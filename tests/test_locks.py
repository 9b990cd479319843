"""One writer at a time: a run that writes into a folder holds a lock file there; a second writer is refused with
the holder's name, and a stale lock (a dead process, or an old one of another host) is taken over."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import dask_clip.dataset.save
from dask_clip import ConfigurationError, ImageTextPairDataset, testing

LOCK_NAME = ".dask_clip.lock"  # the name is a contract: the error tells users to remove it by hand
WIDTH = 8


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    """3 shards of 4 rows with 8-wide embeddings (empty tars)."""
    rng = np.random.default_rng(0)
    vectors = {f"k{i:03d}": rng.standard_normal(WIDTH).astype(np.float32) for i in range(12)}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=4)
    return tmp_path / "shards"


def another_writers_lock(lock: Path, host: str, pid: int, refreshed_ago: timedelta) -> dict:
    """Write the lock another run would hold: ``host``/``pid``, last refreshed ``refreshed_ago``."""
    refreshed = datetime.now(timezone.utc) - refreshed_ago
    holder = {
        "host": host,
        "pid": pid,
        "started": (refreshed - timedelta(minutes=30)).isoformat(timespec="seconds"),
        "refreshed": refreshed.isoformat(timespec="seconds"),
        "operation": "save_metadata",
        "command": "dask-clip embed shards --model-dir clip",
        "token": "f" * 32,
    }
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps(holder))
    return holder


def dead_pid() -> int:
    """The pid of a process of this host that has ended."""
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(ended.stdout)


def test_a_second_writer_is_refused_while_the_first_writes(
    client, dataset_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    planning, go_on = threading.Event(), threading.Event()
    plan_save = dask_clip.dataset.save.plan_save

    def first_run_waits_while_planning(*args, **kwargs):
        if not planning.is_set():
            planning.set()
            go_on.wait(60)
        return plan_save(*args, **kwargs)

    monkeypatch.setattr(dask_clip.dataset.save, "plan_save", first_run_waits_while_planning)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(ImageTextPairDataset.from_webdataset(str(dataset_folder)).save_metadata, str(output))
        try:
            assert planning.wait(60)
            with pytest.raises(ConfigurationError) as raised:
                ImageTextPairDataset.from_webdataset(str(dataset_folder)).save_metadata(str(output))
        finally:
            go_on.set()
        summary = first.result(timeout=120)
    message = str(raised.value)
    assert type(raised.value).__name__ == "FolderLockedError"
    assert message.startswith(f"{output / LOCK_NAME}: another run writes into this folder")
    assert f"pid {os.getpid()} on host {socket.gethostname()} (save_metadata: " in message
    assert f"remove {output / LOCK_NAME}" in message
    assert summary["written"].all() and len(summary) == 3  # the first run's output is whole
    for stem in ("00000", "00001", "00002"):
        written, source = pq.read_table(output / f"{stem}.parquet"), pq.read_table(dataset_folder / f"{stem}.parquet")
        assert written.column("image_embedding").to_pylist() == source.column("image_embedding").to_pylist()
    assert not (output / LOCK_NAME).exists()


def test_a_lock_whose_process_has_ended_is_taken_over(
    client, dataset_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid = dead_pid()
    another_writers_lock(dataset_folder / LOCK_NAME, socket.gethostname(), pid, timedelta(seconds=1))
    with caplog.at_level(logging.WARNING, logger="dask_clip"):
        summary = ImageTextPairDataset.from_webdataset(str(dataset_folder)).save_metadata(overwrite=True)
    assert summary["written"].all()
    assert f"taking over the stale lock of pid {pid} on host {socket.gethostname()}" in caplog.text
    assert not (dataset_folder / LOCK_NAME).exists()


def test_a_lock_of_another_host_is_respected_until_it_is_old(
    client, dataset_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lock = dataset_folder / LOCK_NAME
    holder = another_writers_lock(lock, "elsewhere", 4242, timedelta(minutes=2))
    before = {p.name: p.read_bytes() for p in dataset_folder.iterdir()}
    with pytest.raises(ConfigurationError) as raised:
        ImageTextPairDataset.from_webdataset(str(dataset_folder)).save_metadata(overwrite=True)
    message = str(raised.value)
    assert "pid 4242 on host elsewhere (save_metadata: dask-clip embed shards --model-dir clip)" in message
    assert f"since {holder['started']}, last refreshed {holder['refreshed']}" in message
    assert "stale after 10 minutes without a refresh" in message
    assert {p.name: p.read_bytes() for p in dataset_folder.iterdir()} == before  # the lock too is left alone

    another_writers_lock(lock, "elsewhere", 4242, timedelta(minutes=11))
    with caplog.at_level(logging.WARNING, logger="dask_clip"):
        assert ImageTextPairDataset.from_webdataset(str(dataset_folder)).save_metadata(overwrite=True)["written"].all()
    assert "taking over the stale lock of pid 4242 on host elsewhere" in caplog.text and not lock.exists()


def test_a_folder_being_replaced_or_written_into_is_not_replaced_again(
    client, dataset_folder: Path, tmp_path: Path
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    export = tmp_path / "export"
    another_writers_lock(tmp_path / f".export{LOCK_NAME}", "elsewhere", 1, timedelta(minutes=1))  # replacing it
    with pytest.raises(ConfigurationError, match=r"\.export\.dask_clip\.lock: another run writes into this folder"):
        dataset.export_clip_retrieval(str(export))
    assert not export.exists()
    (tmp_path / f".export{LOCK_NAME}").unlink()

    dataset.export_clip_retrieval(str(export))
    another_writers_lock(export / LOCK_NAME, "elsewhere", 1, timedelta(minutes=1))  # someone writes into it
    with pytest.raises(ConfigurationError, match=r"export/\.dask_clip\.lock: another run writes into this folder"):
        dataset.export_clip_retrieval(str(export), overwrite=True)
    assert (export / LOCK_NAME).exists()


def test_the_lock_is_refreshed_while_held_and_removed_on_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dask_clip.io import locks

    monkeypatch.setattr(locks, "REFRESH_EVERY_S", 0.05)
    lock = tmp_path / "folder" / LOCK_NAME
    with pytest.raises(RuntimeError, match="the run failed"), locks.writer_lock(str(lock), "save_metadata"):
        first = json.loads(lock.read_text())
        assert first["host"] == socket.gethostname() and first["pid"] == os.getpid()
        assert first["operation"] == "save_metadata" and first["command"]
        deadline = time.monotonic() + 10
        while json.loads(lock.read_text())["refreshed"] == first["refreshed"]:
            assert time.monotonic() < deadline, "the lock was not refreshed"
            time.sleep(0.05)
        assert json.loads(lock.read_text())["started"] == first["started"]
        raise RuntimeError("the run failed")
    assert not lock.exists() and not (tmp_path / "folder").exists()  # the folder it made for the lock goes too
