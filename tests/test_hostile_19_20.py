"""Defects found by a hostile pass over issues 19 (vector layouts) and 20 (structure): each test failed before
its fix (or is marked xfail where the defect is still open)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, SemanticDeduplicator
from dask_clip.errors import UsageError
from dask_clip.testing import write_embedding_shards, write_shard

WIDTH = 8


def other_tools_shards(folder: Path, kind: pa.DataType | None, all_null_shard: int | None = None) -> Path:
    """Three shards of 6 rows (empty tars) whose ``image_embedding`` column another tool wrote, without any
    width in the footer: pandas' ``list<double>`` (``kind`` None), else cast to ``kind``. Row 2 of each shard
    has no vector; every row of ``all_null_shard`` has none (pandas then writes Arrow's ``null`` type)."""
    rng = np.random.default_rng(0)
    for shard in range(3):
        keys = [f"{shard:05d}{i:04d}" for i in range(6)]
        vectors = rng.normal(size=(6, WIDTH))
        column = [None if shard == all_null_shard or i == 2 else vectors[i] for i in range(6)]
        table = pa.Table.from_pandas(pd.DataFrame({"key": keys, "image_embedding": column}), preserve_index=False)
        if kind is not None:
            table = table.set_column(1, "image_embedding", table.column(1).cast(kind))
        write_shard(folder, shard, [], {})
        pq.write_table(table, folder / f"{shard:05d}.parquet")
    return folder


def test_semantic_dedup_of_another_tools_list_column_with_a_shard_without_any_vector(tmp_path: Path) -> None:
    """Every download of one shard failed: its vectors are 0 wide (no width in the footer, no row to learn it
    from). Sampling that shard divided by the 0-byte row size (ZeroDivisionError in vectors_to_binary)."""
    folder = other_tools_shards(tmp_path / "shards", pa.list_(pa.float32()), all_null_shard=1)
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    frame = SemanticDeduplicator(n_clusters=2, eps=0.5)(dataset).metadata.compute()
    assert len(frame) == 18 and frame["keep"].notna().all()


@pytest.mark.parametrize("kind", [pa.list_(pa.float32(), WIDTH), pa.list_(pa.float64(), WIDTH)])
def test_decisions_over_another_tools_fixed_size_column_are_current_after_an_in_place_save(
    tmp_path: Path, kind: pa.DataType
) -> None:
    """A Polars/pyarrow ``fixed_size_list`` embedding column came with the shards, so a dedup records the digest
    of its values. The in-place save writes it as ``list<float32>``, and that digest was of Arrow's buffers (type
    and null slots included): it changed, and every consumer refused the decisions just written
    (MixedProvenanceError)."""
    folder = other_tools_shards(tmp_path / "shards", kind)
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    SemanticDeduplicator(n_clusters=2, eps=0.5)(dataset).save_metadata()
    written = ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(
        str(tmp_path / "out"), filter_column="keep"
    )
    kept = ImageTextPairDataset.from_webdataset(str(folder)).metadata.compute()["keep"].sum()
    assert written["rows"].sum() == kept > 0


def test_a_shard_whose_plain_column_pandas_wrote_as_null_type_is_not_stale_after_a_save(tmp_path: Path) -> None:
    """pandas writes an all-None column as Arrow's ``null`` type; the dataset reads it as the first shard's type and
    a save writes it so. The digest of the values the dedup read (type included) then changed, and the decisions
    just saved were refused: "decided for other inputs than the shards hold now (1 shard (00001))"."""
    folder = other_tools_shards(tmp_path / "shards", None, all_null_shard=1)
    assert pq.read_schema(folder / "00001.parquet").field("image_embedding").type == pa.null()
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    SemanticDeduplicator(n_clusters=2, eps=0.5)(dataset).save_metadata()
    written = ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(
        str(tmp_path / "out"), filter_column="keep"
    )
    kept = ImageTextPairDataset.from_webdataset(str(folder)).metadata.compute()["keep"].sum()
    assert written["rows"].sum() == kept > 0


def test_float16_never_rounds_embeddings_another_written_column_was_computed_from(tmp_path: Path) -> None:
    """``dask-clip dedup --vector-layout float16`` on float32 embeddings used to round the embeddings under the
    decisions just computed from them: every consumer then refused those decisions. Such a save is refused, before
    anything is written, whether the decisions are computed now or carried from the files."""
    rng = np.random.default_rng(0)
    vectors = {f"{i:09d}": rng.normal(size=WIDTH) for i in range(12)}
    write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=4)
    before = {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.parquet")}
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    with pytest.raises(UsageError, match=r"would round \['image_embedding'\], from which 'keep'"):
        SemanticDeduplicator(n_clusters=2, eps=0.5)(dataset).save_metadata(vector_layout="float16")
    assert {p.name: p.read_bytes() for p in (tmp_path / "shards").glob("*.parquet")} == before, "nothing written"

    SemanticDeduplicator(n_clusters=2, eps=0.5)(dataset).save_metadata()
    saved = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    with pytest.raises(UsageError, match=r"would round \['image_embedding'\], from which 'keep'"):
        saved.save_metadata(str(tmp_path / "half"), vector_layout="float16")
    saved.save_metadata(str(tmp_path / "half"), columns=["image_embedding"], vector_layout="float16")
    assert pq.read_schema(tmp_path / "half" / "00000.parquet").field("image_embedding").type == pa.list_(pa.float16())
    written = saved.to_webdataset(str(tmp_path / "out"), filter_column="keep")
    assert written["rows"].sum() == saved.metadata.compute()["keep"].sum() > 0


def test_float16_refuses_to_round_embeddings_a_dedup_of_the_same_save_read(
    client, shards: Path, tiny_model: Path
) -> None:
    before = {p.name: p.read_bytes() for p in shards.glob("*.parquet")}
    dataset = ClipImageEmbedder(str(tiny_model), autocast=False)(ImageTextPairDataset.from_webdataset(str(shards)))
    with pytest.raises(UsageError, match=r"would round \['image_embedding'\], from which 'keep'"):
        SemanticDeduplicator(n_clusters=1)(dataset).save_metadata(vector_layout="float16")
    assert {p.name: p.read_bytes() for p in shards.glob("*.parquet")} == before, "nothing is written"
    dataset.save_metadata(vector_layout="float16")  # the embeddings alone: computed here, so rounded
    assert pq.read_schema(shards / "00000.parquet").field("image_embedding").type == pa.list_(pa.float16())


@pytest.mark.parametrize("kind", [pa.list_(pa.float64(), WIDTH), pa.list_(pa.float64())])
def test_an_input_column_of_float64_vectors_keeps_its_type_and_values_through_an_in_place_save(
    tmp_path: Path, kind: pa.DataType
) -> None:
    """Another tool's float64 vectors are an input column: an in-place save keeps every original column as it is,
    so it must not write them back as float32."""
    folder = other_tools_shards(tmp_path / "shards", kind)
    before = pq.read_table(folder / "00000.parquet").column("image_embedding")
    SemanticDeduplicator(n_clusters=2, eps=0.5)(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
    after = pq.read_table(folder / "00000.parquet").column("image_embedding")
    assert after.type == before.type
    assert after.to_pylist() == before.to_pylist()
