"""The dask-clip command, run as a user runs it: a separate process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "dask_clip.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_embed_writes_parquet_next_to_the_shards(shards: Path, tiny_model: Path) -> None:
    result = run_cli("embed", str(shards), "--model-dir", str(tiny_model), "--batch-size", "4", "--n-workers", "1")
    assert result.returncode == 0, result.stderr
    assert "embedded 3 shards: 18 rows, 15 with an embedding, 3 without" in result.stdout
    assert "image_embedding" in pq.read_schema(shards / "00001.parquet").names
    again = run_cli("embed", str(shards), "--model-dir", str(tiny_model), "--batch-size", "4", "--n-workers", "1")
    assert again.returncode == 0, again.stderr
    assert "embedded 3 shards (3 already complete, skipped): 18 rows" in again.stdout


def test_embed_into_output_folder_on_a_running_scheduler(client, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = run_cli("embed", str(shards), "--model-dir", str(tiny_model), "--output", str(output),
                     "--scheduler-address", client.scheduler.address)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00003.parquet"]


def test_bad_input_exits_nonzero_with_the_file_named(tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "00007.tar").write_bytes(b"")
    result = run_cli("embed", str(tmp_path), "--model-dir", str(tiny_model))
    assert result.returncode == 1
    assert "00007.tar has no 00007.parquet" in result.stderr


def test_demo_without_weights_shows_both_ways_out(tmp_path: Path) -> None:
    result = run_cli("demo", "--output", str(tmp_path / "demo"))
    assert result.returncode == 2
    assert "--model-dir" in result.stderr and "--random-weights" in result.stderr


def test_demo_with_random_weights_runs_the_whole_pipeline(tmp_path: Path) -> None:
    result = run_cli("demo", "--random-weights", "--output", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert "MEANINGLESS" in result.stdout
    assert "embedded 4 shards: 32 rows, 28 with an embedding, 4 without" in result.stdout
    assert len(list((tmp_path / "demo" / "shards").glob("*.parquet"))) == 4
