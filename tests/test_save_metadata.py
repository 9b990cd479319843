"""save_metadata: one parquet per shard, every row and column, embeddings as a float32 list on disk (the width in
the footer) and a fixed-size float32 list in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy


@pytest.fixture
def embedded(client, shards: Path, tiny_model: Path) -> ImageTextPairDataset:
    return ClipImageEmbedder(str(tiny_model), autocast=False)(ImageTextPairDataset.from_webdataset(str(shards)))


def test_round_trip_keeps_every_row_column_and_dtype(embedded: ImageTextPairDataset, shards: Path) -> None:
    original = {stem: pq.read_table(shards / f"{stem}.parquet") for stem in ("00000", "00001", "00003")}
    expected = embedded.metadata.compute()
    summary = embedded.save_metadata()
    assert summary["stem"].tolist() == ["00000", "00001", "00003"]
    assert summary["rows"].tolist() == [6, 6, 6] and summary["errors"].tolist() == [1, 1, 1]

    for stem, before in original.items():
        after = pq.read_table(shards / f"{stem}.parquet")
        assert after.schema.field("image_embedding").type == pa.list_(pa.float32())
        assert after.schema.field("image_embedding").metadata == {b"dask_clip.width": b"32"}
        assert after.select(before.column_names).equals(before)  # originals untouched, same order
    assert not list(shards.glob(".*.tmp")), "no temporary file is left behind"
    plain = pd.read_parquet(shards / "00001.parquet")  # readable by plain pandas, no dask_clip needed
    assert plain["image_embedding"].dropna().map(len).eq(32).all() and len(plain) == 6

    back = ImageTextPairDataset.from_webdataset(str(shards))
    assert back.metadata.dtypes.equals(embedded.metadata.dtypes)
    frame = back.metadata.compute()
    np.testing.assert_array_equal(
        embeddings_to_numpy(frame["image_embedding"]), embeddings_to_numpy(expected["image_embedding"])
    )
    pd.testing.assert_series_equal(frame["embedding_error"], expected["embedding_error"])
    assert back.operation_config("image_embedding")["model_dir"].endswith("tiny-clip0")


def test_save_into_another_folder_with_selected_columns(
    embedded: ImageTextPairDataset, shards: Path, tmp_path: Path
) -> None:
    output = tmp_path / "embeddings"
    embedded.save_metadata(str(output), columns=["image_embedding", "embedding_error"])
    assert sorted(p.name for p in output.iterdir()) == ["00000.parquet", "00001.parquet", "00003.parquet"]
    table = pq.read_table(output / "00003.parquet")
    assert table.column_names == ["key", "image_embedding", "embedding_error"]
    assert "image_embedding" not in pq.read_schema(shards / "00003.parquet").names  # inputs untouched
    with pytest.raises(ValueError, match=r"unknown columns \['nope'\]"):
        embedded.save_metadata(str(output), columns=["nope"])


def test_reembedding_saved_shards_replaces_the_column(
    embedded: ImageTextPairDataset, shards: Path, tiny_model: Path
) -> None:
    embedded.save_metadata()
    again = ClipImageEmbedder(str(tiny_model), autocast=False)(ImageTextPairDataset.from_webdataset(str(shards)))
    assert list(again.metadata.columns).count("image_embedding") == 1
    again.save_metadata()
    assert pq.read_table(shards / "00000.parquet").num_rows == 6


def test_shards_of_an_interrupted_run_read_with_null_embeddings(embedded: ImageTextPairDataset, shards: Path) -> None:
    untouched = pq.read_table(shards / "00003.parquet")
    embedded.save_metadata()
    pq.write_table(untouched, shards / "00003.parquet")  # as if the run died before this shard
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    assert len(frame) == 18
    assert frame.loc[frame["key"].str.startswith("00003"), "image_embedding"].isna().all()


def test_progress_bar_counts_shards_and_rows(
    embedded: ImageTextPairDataset, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    embedded.save_metadata(str(tmp_path / "out"), progress=True)
    bar = capsys.readouterr().err
    assert "3/3" in bar and "rows=18" in bar and "rows_per_s=" in bar


def test_summary_reports_stage_timings(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    summary = embedded.save_metadata(str(tmp_path / "out"))
    for stage in ("load_s", "wait_s", "decode_s", "infer_s", "write_s"):
        assert (summary[stage] >= 0).all(), stage
    assert (summary["infer_s"] > 0).all() and (summary["decode_s"] > 0).all() and (summary["write_s"] > 0).all()

    plain = ImageTextPairDataset.from_webdataset(embedded.path).save_metadata(str(tmp_path / "plain"))
    assert plain["infer_s"].isna().all() and (plain["write_s"] > 0).all()
