"""Crashes and re-runs: atomic files, resume, a failing shard, and a worker killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, testing
from dask_clip.errors import ShardReadError

from .helpers import start_cli_cluster, stop_processes


def embed(shards: Path, model: Path, **options) -> ImageTextPairDataset:
    return ClipImageEmbedder(str(model), autocast=False, **options)(ImageTextPairDataset.from_webdataset(str(shards)))


def test_resume_recomputes_only_the_missing_shard(client, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    first = embed(shards, tiny_model).save_metadata(str(output))
    assert first["written"].all()
    mtimes = {p.name: p.stat().st_mtime_ns for p in output.glob("*.parquet")}
    (output / "00001.parquet").unlink()

    again = embed(shards, tiny_model).save_metadata(str(output))
    assert dict(zip(again["stem"], again["written"], strict=True)) == {"00000": False, "00001": True, "00003": False}
    assert again[["rows", "errors"]].equals(first[["rows", "errors"]])
    assert all((output / name).stat().st_mtime_ns == mtime for name, mtime in mtimes.items() if name != "00001.parquet")

    forced = embed(shards, tiny_model).save_metadata(str(output), overwrite=True)
    assert forced["written"].all()


def test_a_different_configuration_is_not_resumed(client, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    embed(shards, tiny_model).save_metadata(str(output))
    changed = embed(shards, tiny_model, normalize_embeddings=False).save_metadata(str(output))
    assert changed["written"].all()


def test_in_place_resume_after_an_interrupted_run(client, shards: Path, tiny_model: Path) -> None:
    untouched = pq.read_table(shards / "00003.parquet")
    embed(shards, tiny_model).save_metadata()
    pq.write_table(untouched, shards / "00003.parquet")  # as if the run died before this shard
    again = embed(shards, tiny_model).save_metadata()
    assert dict(zip(again["stem"], again["written"], strict=True)) == {"00000": False, "00001": False, "00003": True}
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    assert frame["image_embedding"].notna().sum() == 15


def test_a_failing_shard_is_named_and_finished_shards_are_kept(
    client, shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    good_tar = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(good_tar[: len(good_tar) // 2])
    with pytest.raises(ShardReadError, match=r"00001\.tar: cannot read tar"):
        embed(shards, tiny_model, on_error="raise").save_metadata(str(output))
    # the failure did not stop the other shards: they ran to the end and are on disk
    assert {p.name for p in output.glob("*.parquet")} == {"00000.parquet", "00003.parquet"}

    (shards / "00001.tar").write_bytes(good_tar)
    rerun = embed(shards, tiny_model, on_error="raise").save_metadata(str(output))
    assert rerun.loc[rerun["written"], "stem"].tolist() == ["00001"]


WRITER = """
import sys, numpy as np, pandas as pd
from dask_clip.columns import to_embedding_array
from dask_clip.io.metadata import write_shard_metadata
from dask_clip.provenance import FileRecords
rows = 400_000
vectors = np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32)
frame = pd.DataFrame({"key": np.arange(rows).astype(str)})
frame["image_embedding"] = to_embedding_array(vectors, np.ones(rows, dtype=bool))
print("ready", flush=True)
write_shard_metadata(frame, sys.argv[1], FileRecords())
"""


def test_a_writer_killed_mid_write_leaves_no_file_at_the_final_name(tmp_path: Path) -> None:
    final = tmp_path / "00000.parquet"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".00000.parquet.*.tmp")):
        assert writer.poll() is None, "the writer finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert not final.exists()
    assert not list(tmp_path.glob("*.parquet"))


@pytest.mark.slow
def test_killing_a_worker_mid_run_still_completes_with_identical_outputs(tmp_path: Path, tiny_model: Path) -> None:
    from dask_clip import get_client

    shards = tmp_path / "shards"
    testing.make_img2dataset_shards(shards, shard_numbers=range(10), samples_per_shard=12)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    processes, scheduler_file = start_cli_cluster(tmp_path, n_workers=2)
    try:
        with get_client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
            embed(shards, tiny_model).save_metadata(str(clean))

            pids = client.run(os.getpid)
            victim = pids[sorted(pids)[0]]
            run = _save_in_background(client, shards, tiny_model, killed)
            deadline = time.monotonic() + 120
            while not list(killed.glob("*.parquet")):
                assert time.monotonic() < deadline, "no shard finished"
                time.sleep(0.01)
            assert len(list(killed.glob("*.parquet"))) < 10, "the run ended before the worker could be killed"
            os.kill(victim, signal.SIGKILL)
            summary = run.result(timeout=300)
            assert summary["written"].sum() == 10
    finally:
        stop_processes(processes)

    for stem in (f"{n:05d}" for n in range(10)):
        expected = pq.read_table(clean / f"{stem}.parquet").to_pandas()
        actual = pq.read_table(killed / f"{stem}.parquet").to_pandas()
        assert actual["key"].tolist() == expected["key"].tolist()
        np.testing.assert_array_equal(
            np.stack(actual["image_embedding"].dropna().to_numpy()),
            np.stack(expected["image_embedding"].dropna().to_numpy()),
        )
        assert actual["embedding_error"].tolist() == expected["embedding_error"].tolist()


def _save_in_background(client, shards: Path, model: Path, output: Path):
    """Run save_metadata on a client thread so the test can act while it runs."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    return pool.submit(lambda: embed(shards, model).save_metadata(str(output)))
