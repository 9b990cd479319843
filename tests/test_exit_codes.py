"""The README's exit-code table, row by row, through the ``dask-clip`` command: called in this process on the
session's cluster (the ``cli`` fixture), or, for a limit the operating system enforces on a process, in its own."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dask_clip import testing

EXIT_DATA = 1
EXIT_CONFIGURATION = 2


def run_cli_with_file_size_limit(*args: str, file_size_limit: int) -> subprocess.CompletedProcess[str]:
    """``dask-clip ARGS`` in a new process whose processes write at most ``file_size_limit`` bytes per file."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        [sys.executable, "-m", "dask_clip.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
        preexec_fn=limit_file_size,
    )


def embed(cli, shards: Path, model: Path | str, *options: str) -> subprocess.CompletedProcess[str]:
    """``dask-clip embed`` with ``cli``: on the session's cluster unless ``options`` name another."""
    return cli("embed", str(shards), "--model-dir", str(model), *options)


def assert_printed_once(result: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert len(re.findall(pattern, result.stderr)) == 1, result.stderr


# --- exit code 2: fix the call ---------------------------------------------------------------------------------
def test_a_zero_batch_size_is_a_bad_argument(cli, shards: Path, tiny_model: Path) -> None:
    result = embed(cli, shards, tiny_model, "--batch-size", "0")
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"UsageError: batch_size must be an integer of at least 1, not 0")


def test_zero_samples_per_shard_is_a_bad_argument(cli, shards: Path, tmp_path: Path) -> None:
    result = cli("reshard", str(shards), str(tmp_path / "out"), "--samples-per-shard", "0")
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"samples_per_shard must be an integer of at least 1, not 0")


def test_a_dataset_folder_that_does_not_exist(cli, tiny_model: Path, tmp_path: Path) -> None:
    result = embed(cli, tmp_path / "nowhere", tiny_model)
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"DatasetNotFoundError: .*nowhere: no such directory")


def test_a_missing_model_folder(cli, shards: Path, tmp_path: Path) -> None:
    result = embed(cli, shards, tmp_path / "no-model")
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"ModelLoadError: model directory '.*no-model' does not exist")


def test_a_model_with_only_pickled_weights(cli, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    result = embed(cli, shards, model)
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"has no safetensors weights .*\['pytorch_model.bin'\]")


def test_a_model_without_its_preprocessor_config(cli, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "preprocessor_config.json").unlink()
    result = embed(cli, shards, model)
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"ModelLoadError: .*preprocessor_config\.json")


def test_weights_a_worker_cannot_load_stop_the_run_once(cli, tiny_model: Path, tmp_path: Path) -> None:
    """The client finds every file it checks; the workers find the weights corrupt. The first worker's
    failure cancels the other shards: the cause is printed once, and no shard is written."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    (model / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}not a tensor file")
    shards = tmp_path / "shards"
    testing.make_img2dataset_shards(shards, shard_numbers=range(6), samples_per_shard=2)
    before = {path.name: path.read_bytes() for path in shards.glob("*.parquet")}
    result = embed(cli, shards, model)
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"cannot load the CLIP vision tower of")
    assert "Traceback" not in result.stderr
    assert {path.name: path.read_bytes() for path in shards.glob("*.parquet")} == before


def test_a_column_the_command_reads_is_missing(cli, shards: Path, tmp_path: Path) -> None:
    result = cli("reshard", str(shards), str(tmp_path / "out"), "--filter-column", "keep")
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"ColumnError: no filter column 'keep'")


def test_a_missing_optional_dependency_names_the_extra(cli, shards: Path, tiny_model: Path) -> None:
    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here")
    result = embed(cli, shards, tiny_model, "--cluster-type", "gpu")
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(
        result, r"MissingDependencyError: cluster_type='gpu' needs dask_cuda: pip install \"dask_clip\[gpu\]\""
    )


def test_a_folder_another_run_writes_into_is_refused(cli, shards: Path, tiny_model: Path) -> None:
    holder = {"host": "elsewhere", "pid": 7, "started": "2100-01-01T00:00:00+00:00", "operation": "save_metadata"}
    holder |= {"refreshed": "2100-01-01T00:00:00+00:00", "command": "dask-clip embed", "token": "0" * 32}
    (shards / ".dask_clip.lock").write_text(json.dumps(holder))
    result = embed(cli, shards, tiny_model)
    assert result.returncode == EXIT_CONFIGURATION
    assert_printed_once(result, r"FolderLockedError: .*shards/\.dask_clip\.lock: another run writes into this folder")


# --- exit code 1: fix (or skip) the data ----------------------------------------------------------------------
def test_a_bad_shard_is_named(cli, shards: Path, tiny_model: Path) -> None:
    tar = shards / "00001.tar"
    tar.write_bytes(tar.read_bytes()[:1000])  # cut inside the first member
    result = embed(cli, shards, tiny_model)
    assert result.returncode == EXIT_DATA
    assert_printed_once(result, r"ShardReadError: .*00001\.tar: cannot read tar")
    assert "Traceback" not in result.stderr


def test_unpaired_shard_files_are_named(cli, shards: Path, tiny_model: Path) -> None:
    (shards / "00001.parquet").unlink()
    result = embed(cli, shards, tiny_model)
    assert result.returncode == EXIT_DATA
    assert_printed_once(result, r"DatasetLayoutError: .*00001\.tar has no 00001\.parquet")


def test_a_write_that_fails_names_the_file(shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Every process of the run may write at most 4 KiB per file (``RLIMIT_FSIZE``): the parquet files are
    larger, so each write fails as on a full disk, with the operating system's own error."""
    options = ("--output", str(tmp_path / "out"), "--no-progress", "--n-workers", "1")  # its workers: limited too
    result = run_cli_with_file_size_limit(
        "embed", str(shards), "--model-dir", str(tiny_model), *options, file_size_limit=4096
    )
    assert result.returncode == EXIT_DATA, result.stderr
    assert_printed_once(result, r"WriteError: .*out/0000[013]\.parquet: cannot write: \[Errno 27\] File too large")
    assert not list((tmp_path / "out").glob("*.parquet")), "a half-written file was left at a final name"


def test_the_readme_table_names_every_error_class() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme[readme.index("| exit code |") :]
    table = table[: table.index("\n\n")]
    import dask_clip.errors

    classes = [name for name, value in vars(dask_clip.errors).items() if isinstance(value, type)]
    assert [name for name in classes if f"`{name}`" not in table and name != "ImageDecodeError"] == []
