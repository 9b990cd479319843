"""The dask-clip command, called in this process on the session's cluster (the ``cli`` fixture); ``--help``
runs as a user runs it, in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``dask-clip ARGS`` in a process of its own, as a user runs it."""
    command = [sys.executable, "-m", "dask_clip.cli", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def test_embed_writes_parquet_next_to_the_shards(cli, shards: Path, tiny_model: Path) -> None:
    result = cli("embed", str(shards), "--model-dir", str(tiny_model), "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    assert "embedded 3 shards: 18 rows, 15 with an embedding, 3 without" in result.stdout
    assert "image_embedding" in pq.read_schema(shards / "00001.parquet").names
    again = cli("embed", str(shards), "--model-dir", str(tiny_model), "--batch-size", "4")
    assert again.returncode == 0, again.stderr
    assert "embedded 3 shards (3 already complete, skipped): 18 rows" in again.stdout


def test_embed_into_output_folder_on_a_running_scheduler(
    cli, client, shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    result = cli(
        "embed",
        str(shards),
        "--model-dir",
        str(tiny_model),
        "--output",
        str(output),
        "--scheduler-address",
        client.scheduler.address,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in output.glob("*.parquet")) == ["00000.parquet", "00001.parquet", "00003.parquet"]


def test_bad_input_exits_nonzero_with_the_file_named(cli, tmp_path: Path, tiny_model: Path) -> None:
    (tmp_path / "00007.tar").write_bytes(b"")
    result = cli("embed", str(tmp_path), "--model-dir", str(tiny_model))
    assert result.returncode == 1
    assert "00007.tar has no 00007.parquet" in result.stderr


def test_demo_without_weights_shows_both_ways_out(cli, tmp_path: Path) -> None:
    result = cli("demo", "--output", str(tmp_path / "demo"))
    assert result.returncode == 2
    assert "--model-dir" in result.stderr and "--random-weights" in result.stderr


def test_help_lists_every_command_with_defaults() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("embed", "dedup", "reshard", "search", "export", "demo"):
        assert command in result.stdout
    embed_help = run_cli("embed", "--help").stdout
    assert "(default: 32)" in embed_help and "--scheduler-file" in embed_help and "--decode-mode" in embed_help


def test_the_command_list_imports_no_command_it_does_not_run() -> None:
    """``dask-clip --help`` lists every command from its name and help: the classes whose defaults a command's
    options show (and dask.dataframe, torch behind them) are imported only for that command."""
    probe = (
        "import sys\n"
        "from dask_clip.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('dask.dataframe', 'torch', 'dask_clip.dataset', 'dask_clip.ops')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "build-index" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout


@pytest.mark.parametrize("decode_mode", ["exact", "device"])
def test_decode_mode_is_recorded_with_the_embeddings(cli, shards: Path, tiny_model: Path, decode_mode: str) -> None:
    import json

    result = cli(
        "embed",
        str(shards),
        "--model-dir",
        str(tiny_model),
        "--decode-mode",
        decode_mode,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(pq.read_schema(shards / "00000.parquet").metadata[b"dask_clip"])
    assert info["columns"]["image_embedding"]["operation"]["decode_mode"] == decode_mode


def test_curation_commands_chain(cli, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    # a byte-identical copy of one photo under a new key in shard 00003: the duplicate to find
    copied = tmp_path / "copy"
    shutil.copytree(shards, copied)
    duplicate_shard(copied)
    assert cli("embed", str(copied), "--model-dir", str(tiny_model)).returncode == 0

    dedup = cli("dedup", str(copied))
    assert dedup.returncode == 0, dedup.stderr
    assert "1 duplicates flagged (keep=False)" in dedup.stdout

    reshard = cli("reshard", str(copied), str(tmp_path / "kept"), "--filter-column", "keep", "--samples-per-shard", "8")
    assert reshard.returncode == 0, reshard.stderr
    assert "resharded into 3 shards: 18 rows" in reshard.stdout

    export = cli("export", str(copied), str(tmp_path / "index"))
    assert export.returncode == 0, export.stderr
    assert "16 embeddings" in export.stdout
    assert len(list((tmp_path / "index" / "img_emb").glob("*.npy"))) == 3

    image = next(copied.glob("00000.tar"))
    query = tmp_path / "query.jpg"
    import tarfile

    with tarfile.open(image) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
        query.write_bytes(archive.extractfile(member).read())
    search = cli("search", str(copied), "--image", str(query), "-k", "2")
    assert search.returncode == 0, search.stderr
    assert member.name[:-4] in search.stdout.splitlines()[1]


def test_build_index_then_search_with_it_exit_codes(cli, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    import tarfile

    assert cli("embed", str(shards), "--model-dir", str(tiny_model)).returncode == 0
    index = str(tmp_path / "index")
    built = cli("build-index", str(shards), index)
    assert built.returncode == 0, built.stderr
    assert "indexed 15 of 18 rows of 3 shards (3 without a usable embedding, not indexed)" in built.stdout

    with tarfile.open(shards / "00001.tar") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
        (tmp_path / "query.jpg").write_bytes(archive.extractfile(member).read())
    query = ("--image", str(tmp_path / "query.jpg"), "-k", "3")
    exact = cli("search", str(shards), *query)
    searched = cli("search", str(shards), *query, "--index", index)
    assert searched.returncode == 0, searched.stderr
    assert searched.stdout == exact.stdout and member.name[:-4] in searched.stdout.splitlines()[1]

    assert cli("build-index", str(shards), index).returncode == 2  # not empty, no --overwrite
    bad_key = cli("build-index", str(shards), str(tmp_path / "b"), "--index-key", "IVF-x")
    assert bad_key.returncode == 2 and "not a faiss index factory string" in bad_key.stderr
    table = pq.read_table(shards / "00003.parquet")
    pq.write_table(table.slice(1), shards / "00003.parquet")  # a row removed: the index is stale
    stale = cli("search", str(shards), *query, "--index", index)
    assert stale.returncode == 1 and "StaleIndexError" in stale.stderr and "shard 00003" in stale.stderr


def duplicate_shard(folder: Path) -> None:
    """Add a byte-identical copy of 00000's first image as a new row of shard 00003."""
    import io
    import tarfile

    import pyarrow as pa

    with tarfile.open(folder / "00000.tar") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
        payload = archive.extractfile(member).read()
    original = pq.read_table(folder / "00000.parquet").to_pylist()
    row = dict(next(r for r in original if r["key"] == member.name[:-4]), key="000030099")
    table = pq.read_table(folder / "00003.parquet")
    pq.write_table(
        pa.concat_tables([table, pa.Table.from_pylist([row], schema=table.schema)]), folder / "00003.parquet"
    )
    with tarfile.open(folder / "00003.tar", "a") as archive:
        info = tarfile.TarInfo("000030099.jpg")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))


def test_semantic_dedup_and_filters(cli, shards: Path, tiny_model: Path, tmp_path: Path) -> None:
    import shutil

    from dask_clip import testing

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    testing.save_tokenizer_for_clip_model(model)
    folder = shards  # a private copy already
    duplicate_shard(folder)
    assert cli("embed", str(folder), "--model-dir", str(model)).returncode == 0

    semantic = cli("dedup", str(folder), "--method", "semantic", "--n-clusters", "2", "--eps", "1e-6")
    assert semantic.returncode == 0, semantic.stderr
    assert "dedup (semantic) over 3 shards: 19 rows, 1 duplicates flagged" in semantic.stdout

    scored = cli("filter", str(folder), "--by", "clip-score", "--model-dir", str(model), "--min", "2")
    assert scored.returncode == 0, scored.stderr
    marked = "filter by clip_score over 3 shards: 19 rows, 19 marked keep_by_threshold=False"  # cosine <= 1 < 2
    assert marked in scored.stdout
    assert pq.read_table(folder / "00001.parquet").column("clip_score").null_count == 1  # the failed download

    import torch

    from dask_clip.models.classifiers import AestheticMlp

    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMlp(768).state_dict(), weights)
    wrong = cli("filter", str(folder), "--by", "aesthetic", "--model-path", str(weights), "--min", "5")
    assert wrong.returncode == 2  # a configuration error: the classifier does not fit these embeddings
    assert "takes 768-d embeddings but column 'image_embedding' holds 32-d ones" in wrong.stderr
    weights.write_bytes(b"")
    unreadable = cli("filter", str(folder), "--by", "aesthetic", "--model-path", str(weights), "--min", "5")
    assert unreadable.returncode == 2 and "cannot load classifier checkpoint" in unreadable.stderr


def test_info_names_each_configuration_and_dedup_can_decide_again(cli, shards: Path, tiny_model: Path) -> None:
    assert cli("embed", str(shards), "--model-dir", str(tiny_model)).returncode == 0
    info = cli("info", str(shards))
    assert info.returncode == 0, info.stderr
    assert "image_embedding\n  ClipImageEmbedder(model_dir=" in info.stdout
    assert "3 shards (00000, 00001, 00003): 18 rows, 15 with a value, 3 with a reason, 0 with neither" in info.stdout
    first = cli("dedup", str(shards))
    again = cli("dedup", str(shards), "--overwrite")
    assert first.returncode == again.returncode == 0, again.stderr
    assert "0 duplicates flagged" in again.stdout


def subcommand_helps() -> dict[str, str]:
    """Every subcommand's --help text, as argparse prints it, whitespace collapsed (in this process)."""
    import argparse
    import re

    from dask_clip.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: re.sub(r"\s+", " ", sub.format_help()) for name, sub in commands.choices.items()}


def test_help_states_each_default_once_and_only_real_ones() -> None:
    import re

    helps = subcommand_helps()
    assert set(helps) >= {"embed", "dedup", "filter", "reshard", "search", "build-index", "export", "attach", "info"}
    for name, text in helps.items():
        assert not re.search(r"\(default: [^()]*\) \(default:", text), (name, text)
        assert "(default: None)" not in text and "(default: False)" not in text, (name, text)
    assert "--id-col ID_COL id column of the parquet files (default: key) " in helps["embed"]
    assert "--batch-size BATCH_SIZE images per model call (default: 32)" in helps["embed"]
    assert "workers of a local cluster (default: one per core)" in helps["search"]


def test_no_workers_is_a_usage_error_before_a_cluster_starts(cli, shards: Path) -> None:
    result = cli("info", str(shards), "--n-workers", "0")
    assert result.returncode == 2, result.stderr
    assert "UsageError: n_workers must be an integer of at least 1, not 0" in result.stderr
    assert "cluster started" not in result.stderr


def test_search_for_a_missing_image_names_it_before_a_cluster_starts(cli, shards: Path, tmp_path: Path) -> None:
    result = cli("search", str(shards), "--image", str(tmp_path / "nope.jpg"))
    assert result.returncode == 2, result.stderr
    assert f"UsageError: image {str(tmp_path / 'nope.jpg')!r}: no such file" in result.stderr
    assert "cluster started" not in result.stderr


def test_overwrite_with_the_dataset_as_output_exits_2_and_keeps_the_dataset(cli, tmp_path: Path) -> None:
    import numpy as np

    from dask_clip import testing

    dataset = tmp_path / "shards"
    vectors = {f"k{i}": np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(6)}
    testing.write_embedding_shards(dataset, vectors, rows_per_shard=2)
    before = sorted(p.name for p in dataset.iterdir())
    for command in ("build-index", "export"):
        result = cli(command, str(dataset), str(dataset), "--overwrite")
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"UsageError: {dataset}: holds the dataset" in result.stderr
        assert sorted(p.name for p in dataset.iterdir()) == before


def test_main_uses_the_client_this_process_holds_and_leaves_it_open(cli, client, shards: Path, monkeypatch) -> None:
    import dask_clip.distributed.client

    monkeypatch.setattr(dask_clip.distributed.client, "get_client", lambda *args, **kwargs: pytest.fail("connected"))
    result = cli("info", str(shards))  # with --scheduler-address of the session's client
    assert result.returncode == 0, result.stderr
    assert "3 shards" in result.stdout
    assert client.status == "running"
