"""Files edited behind dask_clip's back, as a user does with pyarrow (which keeps the ``dask_clip`` footer):
an index, a re-run and a deduplication notice the edit instead of trusting the record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import (
    ClipImageEmbedder,
    DataError,
    ImageTextPairDataset,
    SemanticDeduplicator,
    StaleIndexError,
    embeddings_to_numpy,
    testing,
)
from dask_clip.columns import FLOAT64, empty_column
from dask_clip.execution import ShardTask
from dask_clip.io.vectors import variable
from dask_clip.operation import Operation
from dask_clip.provenance import Computed, content_digest

WIDTH = 16


def dataset_of(folder: Path) -> ImageTextPairDataset:
    return ImageTextPairDataset.from_webdataset(str(folder))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """3 shards of 50 rows whose embeddings dask_clip saved (so their footers record them)."""
    rng = np.random.default_rng(0)
    vectors = {f"k{i:05d}": rng.standard_normal(WIDTH).astype(np.float32) for i in range(150)}
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, vectors, rows_per_shard=50)
    dataset = dataset_of(folder)
    computed = dataset.with_metadata(dataset.metadata, {"image_embedding": Computed({"function": "test vectors"})})
    computed.save_metadata()
    return folder


def edit_embeddings(parquet: Path, edit: Any) -> None:
    """Rewrite ``parquet`` with ``edit(vectors)`` applied to its embeddings, keeping its schema metadata and the
    column's layout (``list<float32>``, as dask_clip writes it, or ``fixed_size_list``)."""
    table = pq.read_table(parquet)
    column = table.column("image_embedding")
    vectors = embeddings_to_numpy(column.to_pandas(types_mapper=pd.ArrowDtype))
    valid = ~np.isnan(vectors).all(axis=1)
    edit(vectors, valid)
    position = table.schema.get_field_index("image_embedding")
    if pa.types.is_fixed_size_list(table.schema.field(position).type):
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        edited = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1], mask=pa.array(~valid))
    else:
        edited = variable(vectors[valid], valid)
    table = table.set_column(position, table.schema.field(position), edited)
    assert b"dask_clip" in table.schema.metadata  # pyarrow keeps the footer's record
    pq.write_table(table, parquet)


def null_row(row: int):
    def edit(vectors: np.ndarray, valid: np.ndarray) -> None:
        valid[row] = False

    return edit


def swap_rows(a: int, b: int):
    def edit(vectors: np.ndarray, valid: np.ndarray) -> None:
        vectors[[a, b]] = vectors[[b, a]]

    return edit


# the content digest ---------------------------------------------------------------------------------------------
def test_the_content_digest_ignores_chunking_and_the_list_layout() -> None:
    values = np.arange(12, dtype=np.float32)
    fixed = pa.FixedSizeListArray.from_arrays(pa.array(values), 3, mask=pa.array([False, True, False, False]))
    variable = pa.array([[0, 1, 2], None, [6, 7, 8], [9, 10, 11]], type=pa.list_(pa.float32()))
    chunked = pa.chunked_array([fixed.slice(0, 1), fixed.slice(1, 3)])
    assert content_digest(fixed) == content_digest(variable) == content_digest(chunked)
    swapped = pa.array([[9, 10, 11], None, [6, 7, 8], [0, 1, 2]], type=pa.list_(pa.float32()))
    assert content_digest(swapped) != content_digest(variable)
    assert content_digest(pa.array([[0, 1, 2], None, None, [9, 10, 11]], type=pa.list_(pa.float32()))) != (
        content_digest(variable)
    )
    assert content_digest(pa.array(["a", None, "b"])) == content_digest(pa.array(["a", None, "b"], pa.large_string()))
    assert content_digest(pa.array([True, None, False])) != content_digest(pa.array([True, False, None]))


def test_every_saved_file_records_the_digest_of_its_derived_columns(saved: Path) -> None:
    for parquet in sorted(saved.glob("*.parquet")):
        document = json.loads(pq.read_schema(parquet).metadata[b"dask_clip"])
        table = pq.read_table(parquet)
        assert document["contents"] == {"image_embedding": content_digest(table.column("image_embedding"))}
        assert "contents" not in document["columns"]["image_embedding"]


# the index ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit", [null_row(3), swap_rows(3, 7)], ids=["nulled", "swapped"])
def test_an_index_over_edited_embeddings_is_stale(client, saved: Path, tmp_path: Path, edit: Any) -> None:
    index = str(tmp_path / "index")
    dataset_of(saved).build_index(index)
    query = np.ones(WIDTH, dtype=np.float32)
    assert len(dataset_of(saved).search(image=query, k=3, index=index)) == 3
    edit_embeddings(saved / "00001.parquet", edit)
    with pytest.raises(StaleIndexError, match=r"00001\.parquet.*'image_embedding'.*changed since dask_clip wrote"):
        dataset_of(saved).search(image=query, k=3, index=index)


def test_an_in_place_dedup_after_the_index_keeps_it_current(client, saved: Path, tmp_path: Path) -> None:
    index = str(tmp_path / "index")
    dataset_of(saved).build_index(index)
    SemanticDeduplicator(n_clusters=2, kmeans_sample_size=100)(dataset_of(saved)).save_metadata()
    assert "keep" in pq.read_schema(saved / "00000.parquet").names  # every file was rewritten
    dataset = dataset_of(saved)
    assert dataset.open_index(index).index.ntotal == 150
    edit_embeddings(saved / "00002.parquet", swap_rows(0, 1))  # the embeddings themselves edited afterwards
    with pytest.raises(StaleIndexError, match=r"00002\.parquet"):
        dataset_of(saved).open_index(index)


def test_an_index_is_not_built_from_edited_embeddings(client, saved: Path, tmp_path: Path) -> None:
    edit_embeddings(saved / "00000.parquet", swap_rows(0, 1))
    with pytest.raises(DataError, match=r"00000\.parquet: column 'image_embedding' was changed since dask_clip"):
        dataset_of(saved).build_index(str(tmp_path / "index"))
    assert not (tmp_path / "index").exists()


# deduplication --------------------------------------------------------------------------------------------------
def test_a_dedup_over_edited_embeddings_is_refused(client, saved: Path) -> None:
    edit_embeddings(saved / "00002.parquet", null_row(5))
    with pytest.raises(DataError, match=r"00002\.parquet: column 'image_embedding' was changed since dask_clip"):
        SemanticDeduplicator(n_clusters=2, kmeans_sample_size=100)(dataset_of(saved)).save_metadata()


def test_a_dedup_is_no_longer_current_once_its_embeddings_were_edited(client, saved: Path) -> None:
    dedup = SemanticDeduplicator(n_clusters=2, kmeans_sample_size=100)
    assert dedup(dataset_of(saved)).save_metadata()["written"].all()
    assert not dedup(dataset_of(saved)).save_metadata()["written"].any()
    edit_embeddings(saved / "00001.parquet", swap_rows(0, 1))
    with pytest.raises(DataError, match=r"00001\.parquet: column 'image_embedding' was changed since dask_clip"):
        dedup(dataset_of(saved)).save_metadata()


# resume ---------------------------------------------------------------------------------------------------------
def test_a_re_run_recomputes_the_shard_whose_embeddings_were_edited(client, shards: Path, tiny_model: Path) -> None:
    def embed() -> Any:
        return ClipImageEmbedder(str(tiny_model), autocast=False)(dataset_of(shards)).save_metadata()

    assert embed()["written"].all()
    before = pq.read_table(shards / "00001.parquet")
    vectors = embeddings_to_numpy(before.column("image_embedding").to_pandas(types_mapper=pd.ArrowDtype))
    first, second = np.flatnonzero(~np.isnan(vectors).all(axis=1))[:2]
    edit_embeddings(shards / "00001.parquet", swap_rows(first, second))
    again = embed()
    assert dict(zip(again["stem"], again["written"], strict=True)) == {"00000": False, "00001": True, "00003": False}
    after = pq.read_table(shards / "00001.parquet")
    assert after.column("image_embedding").equals(before.column("image_embedding"))


def test_files_without_a_content_digest_are_trusted_as_before(
    client, embedded_shards: Path, model_with_tokenizer: Path
) -> None:
    def embed() -> Any:
        return ClipImageEmbedder(str(model_with_tokenizer), autocast=False)(dataset_of(embedded_shards)).save_metadata()

    for parquet in embedded_shards.glob("*.parquet"):  # as the previous dask_clip wrote them: records, no digests
        table = pq.read_table(parquet)
        document = json.loads(table.schema.metadata[b"dask_clip"])
        del document["contents"]
        pq.write_table(table.replace_schema_metadata({b"dask_clip": json.dumps(document).encode()}), parquet)
    assert not embed()["written"].any()


def test_a_reshard_does_not_launder_edited_embeddings(client, saved: Path, tmp_path: Path) -> None:
    """New shards record fresh digests: written from edited values, they would hide the edit."""
    edit_embeddings(saved / "00001.parquet", swap_rows(0, 1))
    with pytest.raises(DataError, match=r"00001\.parquet: column 'image_embedding' was changed since dask_clip"):
        dataset_of(saved).to_webdataset(str(tmp_path / "resharded"), samples_per_shard=40)
    assert not (tmp_path / "resharded").exists()


# every other consumer -------------------------------------------------------------------------------------------
class VectorNorms(Operation):
    """A per-shard operation that reads the saved embeddings: the Euclidean norm of each row's vector."""

    def config(self) -> dict[str, Any]:
        return {}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return ["image_embedding"]

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {"norm": empty_column(FLOAT64)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> dict[str, Any]:
        return {"norm": np.linalg.norm(embeddings_to_numpy(rows["image_embedding"]), axis=1)}


CONSUMERS = {
    "per-shard operation": lambda dataset, tmp_path: VectorNorms()(dataset).metadata.compute(),
    "exact search": lambda dataset, tmp_path: dataset.search(image=np.ones(WIDTH, dtype=np.float32)),
    "export": lambda dataset, tmp_path: dataset.export_clip_retrieval(str(tmp_path / "export")),
}


@pytest.mark.parametrize("consumer", sorted(CONSUMERS))
def test_no_consumer_reads_edited_embeddings(client, saved: Path, tmp_path: Path, consumer: str) -> None:
    CONSUMERS[consumer](dataset_of(saved), tmp_path)  # the files as dask_clip wrote them are read
    edit_embeddings(saved / "00001.parquet", swap_rows(0, 1))
    with pytest.raises(DataError, match=r"00001\.parquet: column 'image_embedding' was changed since dask_clip"):
        CONSUMERS[consumer](dataset_of(saved), tmp_path / "again")
