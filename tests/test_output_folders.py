"""One overwrite rule for reshard, build_index and export: a folder is replaced only when the same command wrote
it, never when it is (or holds, or is inside) the input dataset; a killed run's scratch is cleaned up."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import fsspec.implementations.local
import numpy as np
import pytest

from dask_clip import ImageTextPairDataset, UsageError, testing
from dask_clip.io.shards import discover_shards
from dask_clip.provenance import Computed

MANIFEST_NAME = ".dask_clip-output.json"  # the name is a contract: users see it in their folders
WIDTH = 8
COMMANDS: dict[str, Callable[..., object]] = {
    "to_webdataset": lambda dataset, path, **kw: dataset.to_webdataset(path, samples_per_shard=4, **kw),
    "build_index": lambda dataset, path, **kw: dataset.build_index(path, **kw),
    "export_clip_retrieval": lambda dataset, path, **kw: dataset.export_clip_retrieval(path, **kw),
}


@pytest.fixture
def dataset_folder(tmp_path: Path) -> Path:
    """``tmp_path/parent/shards``: 3 shards of 4 rows with 8-wide embeddings (empty tars)."""
    rng = np.random.default_rng(0)
    vectors = {f"k{i:03d}": rng.standard_normal(WIDTH).astype(np.float32) for i in range(12)}
    testing.write_embedding_shards(tmp_path / "parent" / "shards", vectors, rows_per_shard=4)
    return tmp_path / "parent" / "shards"


def listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def spellings(dataset_folder: Path, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "link").symlink_to(dataset_folder)
    return {
        "the dataset": str(dataset_folder),
        "with a trailing slash": f"{dataset_folder}/",
        "through ..": str(dataset_folder / ".." / "shards"),
        "through a symlink": str(tmp_path / "link"),
        "its parent": str(dataset_folder.parent),
        "its grandparent": str(tmp_path),
        "inside it": str(dataset_folder / "out"),
    }


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overwrite_never_replaces_the_dataset_its_parent_or_a_folder_inside(
    client, dataset_folder: Path, tmp_path: Path, command: str
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    paths = spellings(dataset_folder, tmp_path)
    before = listing(tmp_path)
    for spelling, path in paths.items():
        with pytest.raises(UsageError, match=r"holds the dataset|is inside the dataset") as raised:
            COMMANDS[command](dataset, path, overwrite=True)
        assert str(dataset_folder) in str(raised.value), spelling
        assert listing(tmp_path) == before, spelling  # nothing written, nothing removed


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overwrite_replaces_what_the_same_command_wrote(client, dataset_folder: Path, tmp_path: Path, command: str):
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    output = tmp_path / "out"
    COMMANDS[command](dataset, str(output))
    manifest = json.loads((output / MANIFEST_NAME).read_text())
    assert manifest["command"] == command and manifest["dask_clip"] and manifest["written"]
    assert sorted(manifest["files"]) == sorted(listing(output).keys() - {MANIFEST_NAME})  # what it may replace
    with pytest.raises(
        UsageError, match=rf"out: is not empty: it holds the output of dask_clip's {command}, .*overwrite"
    ):
        COMMANDS[command](dataset, str(output))
    first = listing(output)
    COMMANDS[command](dataset, str(output), overwrite=True)
    assert listing(output).keys() == first.keys()
    (output / "notes.txt").write_text("someone's")  # a file the command did not write: never removed
    with pytest.raises(UsageError, match=rf"{command} wrote it, but not 1 of its files \(e\.g\. notes\.txt\)"):
        COMMANDS[command](dataset, str(output), overwrite=True)
    assert (output / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch, no lock left


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_overwrite_refuses_a_folder_the_command_did_not_write(
    client, dataset_folder: Path, tmp_path: Path, command: str
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    other = tmp_path / "other"
    testing.write_embedding_shards(other, {"a": np.ones(WIDTH), "b": np.ones(WIDTH)}, rows_per_shard=1)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").write_text("someone's")
    (notes / "drafts").mkdir()
    elsewhere = next(name for name in COMMANDS if name != command)
    written_by_other = tmp_path / "written-by-other"
    COMMANDS[elsewhere](dataset, str(written_by_other))
    before = listing(tmp_path)
    expected = {
        other: r"a dataset: 2 tars and 2 parquets; 6 entries \(6 files\), e\.g\. 00000\.parquet, 00000\.tar, ",
        notes: r"2 entries \(1 folder, 1 file\), e\.g\. drafts, plan\.txt;",
        written_by_other: rf"the output of dask_clip's {elsewhere}, dask_clip [\d.]+, written 20",
    }
    for folder, description in expected.items():
        for overwrite in (False, True):
            with pytest.raises(UsageError, match=rf"{folder.name}: is not empty: it holds {description}") as raised:
                COMMANDS[command](dataset, str(folder), overwrite=overwrite)
            assert f"nothing shows that {command} wrote it" in str(raised.value) and "another folder" in str(
                raised.value
            )
    assert listing(tmp_path) == before


def test_an_index_or_export_from_before_manifests_is_recognised_by_its_layout(
    client, dataset_folder: Path, tmp_path: Path
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    for command in ("build_index", "export_clip_retrieval"):
        output = tmp_path / command
        COMMANDS[command](dataset, str(output))
        (output / MANIFEST_NAME).unlink()  # as the previous version left it
        if command == "build_index":  # whose index was of format 1: ids.parquet (an exhaustive index: no lists)
            (output / "ids.arrow").rename(output / "ids.parquet")
        COMMANDS[command](dataset, str(output), overwrite=True)
        assert (output / MANIFEST_NAME).exists()
        (output / MANIFEST_NAME).unlink()
        (output / "notes.txt").write_text("someone's")  # the layout, and something else: not ours to remove
        with pytest.raises(UsageError, match=rf"{command}: is not empty: .*nothing shows that {command} wrote it"):
            COMMANDS[command](dataset, str(output), overwrite=True)
        assert (output / "notes.txt").exists()


def test_a_reshard_from_before_manifests_is_not_replaced(client, dataset_folder: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    output = tmp_path / "resharded"
    COMMANDS["to_webdataset"](dataset, str(output))
    (output / MANIFEST_NAME).unlink()
    with pytest.raises(UsageError, match=r"resharded: is not empty: it holds a dataset: 3 tars and 3 parquets"):
        COMMANDS["to_webdataset"](dataset, str(output), overwrite=True)
    assert len(list(output.glob("*.tar"))) == 3


def test_a_reshard_output_that_another_command_saved_into_is_not_replaced(
    client, dataset_folder: Path, tmp_path: Path
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    output = tmp_path / "resharded"
    COMMANDS["to_webdataset"](dataset, str(output))
    resharded = ImageTextPairDataset.from_webdataset(str(output))
    scored = resharded.metadata.assign(score=1.0)  # another operation's column, saved in place
    resharded.with_metadata(scored, {"score": Computed({"function": "a score"})}).save_metadata()
    saved = listing(output)
    with pytest.raises(UsageError, match=r"to_webdataset wrote it, but 3 of its files changed since \(e\.g\. 00000"):
        COMMANDS["to_webdataset"](dataset, str(output), overwrite=True)
    assert listing(output) == saved


def test_an_empty_or_missing_folder_needs_no_overwrite(client, dataset_folder: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    (tmp_path / "empty").mkdir()
    for command, run in COMMANDS.items():
        run(dataset, str(tmp_path / "empty" if command == "build_index" else tmp_path / command))
    assert (tmp_path / "empty" / "index.faiss").exists() and (tmp_path / "to_webdataset" / "00000.tar").exists()


def test_a_file_at_the_output_path_is_refused(client, dataset_folder: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="file: exists and is not a folder"):
        ImageTextPairDataset.from_webdataset(str(dataset_folder)).build_index(str(tmp_path / "file"), overwrite=True)


def test_the_scratch_of_a_killed_run_is_removed_by_the_next_run(client, dataset_folder: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    index = tmp_path / "idx"
    dataset.build_index(str(index))
    for suffix in ("new", "old"):  # a run killed while filling its folder, and one killed while removing the old
        scratch = tmp_path / f".idx.{os.urandom(16).hex()}.{suffix}"
        scratch.mkdir()
        (scratch / "index.faiss").write_bytes(b"half")
    unrelated = tmp_path / ".idx.notes.old"  # not a name replacing_folder makes: left alone
    unrelated.mkdir()
    dataset.build_index(str(index), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".idx.notes.old", "idx", "parent"]


def test_a_run_killed_mid_swap_gets_its_old_folder_back(
    client, dataset_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(dataset_folder))
    index = tmp_path / "idx"
    dataset.build_index(str(index))
    first = listing(index)
    moved = fsspec.implementations.local.LocalFileSystem.mv

    def killed_when_the_fresh_folder_moves_in(self, source, target, **kwargs):
        if str(source).endswith(".new"):
            raise KeyboardInterrupt  # as a kill between moving the old folder aside and the new one in
        return moved(self, source, target, **kwargs)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "mv", killed_when_the_fresh_folder_moves_in)
    with pytest.raises(KeyboardInterrupt):
        dataset.build_index(str(index), overwrite=True)
    monkeypatch.undo()
    assert not index.exists() and len(list(tmp_path.glob(".idx.*.old"))) == 1  # the only copy is the .old

    with pytest.raises(UsageError, match="is not empty"):  # the next run puts it back first
        dataset.build_index(str(tmp_path / "idx"))
    assert listing(index) == first and sorted(p.name for p in tmp_path.iterdir()) == ["idx", "parent"]


def test_neither_the_manifest_nor_a_lock_is_a_shard(dataset_folder: Path) -> None:
    (dataset_folder / MANIFEST_NAME).write_text("{}")
    (dataset_folder / ".dask_clip.lock").write_text("{}")
    assert [shard.stem for shard in discover_shards(str(dataset_folder))] == ["00000", "00001", "00002"]
