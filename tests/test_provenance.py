"""Provenance and resume, tried as users really run things: interrupted, re-run with other options, another
operation saved in between, an output folder reused. Each test compares what is on disk with a fresh
computation, or with what the files claim."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dask_clip import (
    ClipImageEmbedder,
    ExactDeduplicator,
    ImageTextPairDataset,
    MixedProvenanceError,
    SemanticDeduplicator,
    ShardError,
    UsageError,
    embeddings_to_numpy,
    keep_by_threshold,
    testing,
)
from dask_clip.execution import ShardTask


class InterruptedEmbedder(ClipImageEmbedder):
    """``ClipImageEmbedder`` (same name, same configuration) whose run dies at one shard, as a killed run does."""

    def __init__(self, model_dir: str, dies_at: str, **options: Any) -> None:
        self.dies_at = dies_at
        super().__init__(model_dir, **options)

    def recorded_identity(self) -> dict[str, str]:
        return {"class": "ClipImageEmbedder"}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> dict[str, Any]:
        if task.shard.stem == self.dies_at:
            raise RuntimeError("the run was killed here")
        return super().process_shard(rows, task, model)


def dataset_of(folder: Path) -> ImageTextPairDataset:
    return ImageTextPairDataset.from_webdataset(str(folder))


def embed(folder: Path, model: Path, **options: Any) -> ImageTextPairDataset:
    return ClipImageEmbedder(str(model), autocast=False, **options)(dataset_of(folder))


def interrupted_embed(folder: Path, model: Path, dies_at: str, **options: Any) -> None:
    embedder = InterruptedEmbedder(str(model), dies_at, autocast=False, **options)
    with pytest.raises(ShardError, match="the run was killed here"):
        embedder(dataset_of(folder)).save_metadata(**{k: v for k, v in options.items() if k == "path"})


def vectors_by_key(folder: Path, column: str = "image_embedding") -> dict[str, np.ndarray]:
    frame = dataset_of(folder).metadata.compute()
    return dict(zip(frame["key"], embeddings_to_numpy(frame[column]), strict=True))


def records_of(parquet: Path) -> dict[str, Any]:
    return json.loads(pq.read_schema(parquet).metadata[b"dask_clip"])["columns"]


def written(summary: pd.DataFrame) -> dict[str, bool]:
    return dict(zip(summary["stem"], summary["written"], strict=True))


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second random-weight CLIP of the same shape: other weights, so other embeddings."""
    return testing.save_random_clip_model(tmp_path_factory.mktemp("other-clip"), shape="tiny", seed=1)


@pytest.fixture(scope="module")
def narrow_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight CLIP whose embeddings are 16-d instead of 32-d."""
    return testing.save_random_clip_model(tmp_path_factory.mktemp("narrow-clip"), shape="tiny", projection_dim=16)


def assert_matches_a_fresh_run(shards: Path, model: Path, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    shutil.copytree(shards, fresh)
    embed(fresh, model).save_metadata(overwrite=True)
    on_disk, expected = vectors_by_key(shards), vectors_by_key(fresh)
    assert on_disk.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_array_equal(on_disk[key], vector, err_msg=key)


# 1 -------------------------------------------------------------------------------------------------------------
def test_an_operation_saved_between_two_models_keeps_each_shards_own_record(
    shards: Path, tiny_model: Path, other_model: Path, tmp_path: Path
) -> None:
    embed(shards, tiny_model).save_metadata()
    interrupted_embed(shards, other_model, dies_at="00001")  # 00000 and 00003 now hold B, 00001 still A
    ExactDeduplicator()(dataset_of(shards)).save_metadata()  # another operation saved in between
    model_of = {p.stem: records_of(p)["image_embedding"]["operation"]["model_dir"] for p in shards.glob("*.parquet")}
    assert model_of == {"00000": str(other_model), "00001": str(tiny_model), "00003": str(other_model)}

    finishing = embed(shards, other_model).save_metadata()
    assert written(finishing) == {"00000": False, "00001": True, "00003": False}
    assert_matches_a_fresh_run(shards, other_model, tmp_path)


# 2 -------------------------------------------------------------------------------------------------------------
def test_a_shard_never_embedded_is_not_finished_because_it_holds_other_columns(
    shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    interrupted_embed(shards, tiny_model, dies_at="00001")
    ExactDeduplicator()(dataset_of(shards)).save_metadata()  # 00001 now has keep, duplicate_of, similarity
    assert records_of(shards / "00001.parquet")["image_embedding"] is None  # honest: never computed there
    again = embed(shards, tiny_model).save_metadata()
    assert written(again) == {"00000": False, "00001": True, "00003": False}
    frame = dataset_of(shards).metadata.compute()
    assert (frame["image_embedding"].notna() | frame["embedding_error"].notna()).all()
    assert_matches_a_fresh_run(shards, tiny_model, tmp_path)


# 3 -------------------------------------------------------------------------------------------------------------
def test_saving_chosen_columns_in_place_keeps_every_input_column(shards: Path, tiny_model: Path) -> None:
    input_columns = pq.read_schema(shards / "00000.parquet").names
    embed(shards, tiny_model).save_metadata(columns=["image_embedding"])
    names = pq.read_schema(shards / "00000.parquet").names
    assert names == [*input_columns, "image_embedding", "embedding_error"]  # a value goes with its reasons
    assert pq.read_table(shards / "00000.parquet").column("caption").null_count == 0
    again = embed(shards, tiny_model).save_metadata(columns=["image_embedding"])
    assert not again["written"].any()


# 4 -------------------------------------------------------------------------------------------------------------
def test_an_option_that_changes_the_output_is_recorded(shards: Path, tiny_model: Path) -> None:
    embed(shards, tiny_model, max_image_pixels=100_000).save_metadata()  # refuses the larger photos
    refused = dataset_of(shards).metadata.compute()["embedding_error"].str.contains("max_image_pixels").sum()
    assert refused > 0
    again = embed(shards, tiny_model).save_metadata()
    assert again["written"].all()
    assert not dataset_of(shards).metadata.compute()["embedding_error"].str.contains("max_image_pixels").any()


def test_options_that_do_not_change_the_output_are_not_recorded(shards: Path, tiny_model: Path) -> None:
    first = embed(shards, tiny_model, batch_size=2, decode_threads=1).save_metadata()
    before = {p.name: records_of(p) for p in shards.glob("*.parquet")}
    again = embed(shards, tiny_model, batch_size=16, decode_threads=3).save_metadata()
    assert first["written"].all() and not again["written"].any()
    assert {p.name: records_of(p) for p in shards.glob("*.parquet")} == before


# 5 -------------------------------------------------------------------------------------------------------------
def test_exact_dedup_decides_again_everywhere_when_a_shard_is_added(shards: Path, tmp_path: Path) -> None:
    first = ExactDeduplicator()(dataset_of(shards)).save_metadata()
    assert first["written"].all()
    assert dataset_of(shards).metadata.compute()["keep"].all()
    # a new shard, earlier in the order, holding a copy of one image of 00003: that row is now the duplicate
    copied = pq.read_table(shards / "00003.parquet").to_pylist()[0]
    with __import__("tarfile").open(shards / "00003.tar") as archive:
        member = archive.getmember(f"{copied['key']}.jpg")
        image = archive.extractfile(member).read()
    new_key = "000000000"  # smaller than every other id, so it is the one kept
    rows = [dict(copied, key=new_key)]
    testing.write_shard(shards, 0, rows, {new_key: {"jpg": image}}, schema=pq.read_schema(shards / "00003.parquet"))
    again = ExactDeduplicator()(dataset_of(shards)).save_metadata(overwrite=False)
    assert again["written"].all(), "a cross-shard decision was resumed per shard"
    frame = dataset_of(shards).metadata.compute().set_index("key")
    assert frame.loc[copied["key"], "duplicate_of"] == new_key


def test_semantic_dedup_decides_again_when_the_embeddings_it_read_change(
    shards: Path, tiny_model: Path, other_model: Path
) -> None:
    embed(shards, tiny_model).save_metadata()
    assert SemanticDeduplicator(n_clusters=2)(dataset_of(shards)).save_metadata()["written"].all()
    unchanged = SemanticDeduplicator(n_clusters=2)(dataset_of(shards)).save_metadata()
    assert not unchanged["written"].any()
    interrupted_embed(shards, other_model, dies_at="00003")  # a switch of model, interrupted
    with pytest.raises(MixedProvenanceError, match=r"1 shard \(00003\)"):
        SemanticDeduplicator(n_clusters=2)(dataset_of(shards))  # two vector spaces are never compared
    embed(shards, other_model).save_metadata()  # the switch finished: the embeddings the dedup read changed
    again = SemanticDeduplicator(n_clusters=2)(dataset_of(shards)).save_metadata()
    assert again["written"].all()


# 6 -------------------------------------------------------------------------------------------------------------
def test_an_output_with_missing_rows_or_other_inputs_is_not_finished(
    shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    embed(shards, tiny_model).save_metadata(str(output))
    table = pq.read_table(output / "00001.parquet")
    pq.write_table(table.slice(1), output / "00001.parquet")  # an output missing a row, its records kept
    again = embed(shards, tiny_model).save_metadata(str(output))
    assert written(again) == {"00000": False, "00001": True, "00003": False}

    other_inputs = tmp_path / "other"
    testing.make_img2dataset_shards(other_inputs, shard_numbers=(0, 1, 3), seed=7)  # same stems, other rows
    reused = embed(other_inputs, tiny_model).save_metadata(str(output))
    assert reused["written"].all()


# 7 -------------------------------------------------------------------------------------------------------------
def test_an_interrupted_change_of_width_blocks_nothing(embedded_shards: Path, narrow_model: Path) -> None:
    interrupted_embed(embedded_shards, narrow_model, dies_at="00001")  # 00000 and 00003 16-d, 00001 still 32-d
    dataset = dataset_of(embedded_shards)
    assert dataset.metadata.compute()["image_embedding"].notna().sum() == 10  # 00001's 32-d rows read as missing
    again = embed(embedded_shards, narrow_model).save_metadata()
    assert written(again) == {"00000": False, "00001": True, "00003": False}
    assert embed(embedded_shards, narrow_model).save_metadata(overwrite=True)["written"].all()
    assert {len(v) for v in vectors_by_key(embedded_shards).values() if not np.isnan(v).all()} == {16}


# 8 -------------------------------------------------------------------------------------------------------------
def test_an_export_replaces_its_folder_as_a_whole(embedded_shards: Path, tmp_path: Path) -> None:
    export = tmp_path / "export"
    dataset_of(embedded_shards).export_clip_retrieval(str(export))
    with pytest.raises(UsageError, match="is not empty"):
        dataset_of(embedded_shards).export_clip_retrieval(str(export))
    fewer = tmp_path / "fewer"
    shutil.copytree(embedded_shards, fewer)
    for suffix in ("tar", "parquet"):
        (fewer / f"00003.{suffix}").unlink()
    dataset_of(fewer).export_clip_retrieval(str(export), overwrite=True)
    assert sorted(p.name for p in (export / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]
    assert sorted(p.name for p in (export / "metadata").iterdir()) == ["metadata_0.parquet", "metadata_1.parquet"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_a_reshard_replaces_its_folder_as_a_whole(shards: Path, tmp_path: Path) -> None:
    target = tmp_path / "resharded"
    dataset_of(shards).to_webdataset(str(target), samples_per_shard=4)
    assert len(list(target.glob("*.tar"))) == 5
    with pytest.raises(UsageError, match="is not empty"):
        dataset_of(shards).to_webdataset(str(target), samples_per_shard=4)
    dataset_of(shards).to_webdataset(str(target), samples_per_shard=10, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        ".dask_clip-output.json",
        "00000.parquet",
        "00000.tar",
        "00001.parquet",
        "00001.tar",
    ]


# 12 ------------------------------------------------------------------------------------------------------------
def test_a_file_reaches_the_disk_before_its_name_and_its_name_before_the_write_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from dask_clip.io.atomic import atomic_write

    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(descriptor: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def rename(source: str, target: str, *args: Any, **kwargs: Any) -> None:
        events.append(("rename", str(target)))
        real_rename(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    target = tmp_path / "folder" / "00000.parquet"
    with atomic_write(str(target)) as file:
        file.write(b"data")
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "rename", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[1][1] == str(target) and events[2][1] == str(target.parent)
    assert target.read_bytes() == b"data"


# info ----------------------------------------------------------------------------------------------------------
def test_info_shows_a_mixed_dataset_at_a_glance(shards: Path, tiny_model: Path, other_model: Path) -> None:
    embed(shards, tiny_model).save_metadata()
    interrupted_embed(shards, other_model, dies_at="00001")
    table = dataset_of(shards).info()
    embeddings = table[table["column"] == "image_embedding"]
    assert len(embeddings) == 2
    by_model = {row.operation["model_dir"]: row for row in embeddings.itertuples()}
    assert by_model[str(other_model)].stems == ["00000", "00003"]
    assert by_model[str(tiny_model)].stems == ["00001"]
    assert (by_model[str(other_model)].with_value, by_model[str(other_model)].with_reason) == (10, 2)
    assert "embedding_error" not in set(table["column"])  # described with the column it explains


def test_a_threshold_filter_records_the_verdict_it_was_combined_with(embedded_shards: Path) -> None:
    dataset = dataset_of(embedded_shards)
    scored = dataset.with_metadata(dataset.metadata.assign(score=1.0))
    first = keep_by_threshold(scored, "score", min=0.5, keep_column="keep")
    both = keep_by_threshold(first, "score", max=2.0, keep_column="keep")
    assert set(both.provenance["keep"].reads) == {"score", "keep"}
    assert both.provenance["keep"].reads["keep"] is first.provenance["keep"]
    own = keep_by_threshold(keep_by_threshold(scored, "score", min=0.5), "score", max=2.0)  # its own column: replaced
    assert set(own.provenance["keep_by_threshold"].reads) == {"score"}


def test_old_files_without_provenance_are_recomputed(embedded_shards: Path, model_with_tokenizer: Path) -> None:
    for parquet in embedded_shards.glob("*.parquet"):  # as an older dask_clip wrote them: a list, no records
        table = pq.read_table(parquet)
        old = {"derived_columns": ["embedding_error", "image_embedding"], "configs": {}, "id_col": "key"}
        pq.write_table(table.replace_schema_metadata({b"dask_clip": json.dumps(old).encode()}), parquet)
    dataset = dataset_of(embedded_shards)
    assert set(dataset.provenance) == {"image_embedding", "embedding_error"}
    assert embed(embedded_shards, model_with_tokenizer).save_metadata()["written"].all()
