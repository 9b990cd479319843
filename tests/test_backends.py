"""The pandas <-> cudf boundary: embeddings are fixed-size float32 lists on the pandas side and ``list<float32>``
on the cudf side. Checked at the Arrow level on the CPU (cudf's side simulated by the Arrow tables cudf
produces: plain lists, large strings), and end to end on a GPU under the ``gpu`` marker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy
from dask_clip.backends import arrow_for_cudf, arrow_from_cudf, cudf_to_pandas
from dask_clip.columns import STRING, to_embedding_array
from dask_clip.errors import DataError


def pandas_partition(rows: int = 5, width: int = 4) -> pd.DataFrame:
    """A partition as dask_clip's operations see it: Arrow-backed columns, an embedding with null rows."""
    rng = np.random.default_rng(0)
    valid = np.arange(rows) % 3 != 1
    return pd.DataFrame(
        {
            "key": pd.array([f"{i:09d}" for i in range(rows)], dtype=STRING),
            "caption": pd.array(["a cat", None, "a dog", "ünïcode", ""][:rows], dtype=STRING),
            "image_embedding": to_embedding_array(rng.standard_normal((rows, width)).astype(np.float32), valid),
        }
    ).set_index(pd.RangeIndex(10, 10 + rows))


def as_cudf_writes_it(table: pa.Table) -> pa.Table:
    """What ``cudf.DataFrame.to_arrow`` gives for a frame made from ``table``: strings as large strings."""
    fields = [f.with_type(pa.large_string()) if pa.types.is_string(f.type) else f for f in table.schema]
    return table.cast(pa.schema(fields))


def test_embeddings_cross_to_cudf_as_plain_lists_and_come_back_fixed_size() -> None:
    frame = pandas_partition()
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for_cudf = arrow_for_cudf(table)
    assert for_cudf.schema.field("image_embedding").type == pa.list_(pa.float32())
    assert for_cudf.column("image_embedding").null_count == table.column("image_embedding").null_count == 2
    assert for_cudf.column("image_embedding").to_pylist() == table.column("image_embedding").to_pylist()

    back = arrow_from_cudf(as_cudf_writes_it(for_cudf), table.schema)
    assert back.equals(table)


def test_a_cudf_partition_becomes_the_pandas_frame_it_came_from() -> None:
    frame = pandas_partition()

    class CudfLike:
        """The two things ``cudf_to_pandas`` asks of a cudf frame, answered as cudf answers them."""

        def __init__(self, table: pa.Table, index: pd.Index) -> None:
            self.table, self.index = table, type("Index", (), {"to_pandas": lambda _: index})()

        def to_arrow(self, preserve_index: bool) -> pa.Table:
            return self.table

    table = as_cudf_writes_it(arrow_for_cudf(pa.Table.from_pandas(frame, preserve_index=False)))
    extra = table.append_column("score", pa.array(np.linspace(0, 1, len(frame)), pa.float64()))
    back = cudf_to_pandas(CudfLike(extra, frame.index), frame)
    pd.testing.assert_frame_equal(back.drop(columns="score"), frame)
    assert back["score"].dtype == pd.ArrowDtype(pa.float64())  # a column the user added keeps cudf's type

    like = frame.assign(score=pd.array(range(len(frame)), dtype=pd.ArrowDtype(pa.int64())))
    replaced = cudf_to_pandas(CudfLike(extra, frame.index), like)  # a float score where an int one was
    assert replaced["score"].tolist() == np.linspace(0, 1, len(frame)).tolist()
    np.testing.assert_array_equal(
        embeddings_to_numpy(back["image_embedding"]), embeddings_to_numpy(frame["image_embedding"])
    )


def test_a_list_of_the_wrong_width_from_cudf_names_the_column_and_row() -> None:
    frame = pandas_partition()
    table = arrow_for_cudf(pa.Table.from_pandas(frame, preserve_index=False))
    vectors = table.column("image_embedding").to_pylist()
    vectors[3] = vectors[3][:3]
    changed = table.set_column(2, "image_embedding", pa.array(vectors, pa.list_(pa.float32())))
    with pytest.raises(DataError, match=r"column 'image_embedding', row 3: 3 values where an embedding of width 4"):
        arrow_from_cudf(changed, pa.Table.from_pandas(frame, preserve_index=False).schema)


def test_float64_lists_from_cudf_come_back_as_float32() -> None:
    frame = pandas_partition()
    table = arrow_for_cudf(pa.Table.from_pandas(frame, preserve_index=False))
    doubled = table.set_column(2, "image_embedding", table.column("image_embedding").cast(pa.list_(pa.float64())))
    back = arrow_from_cudf(doubled, pa.Table.from_pandas(frame, preserve_index=False).schema)
    assert back.schema.field("image_embedding").type == pa.list_(pa.float32(), 4)


@pytest.mark.gpu
def test_cudf_backend_embeds_filters_and_saves_as_pandas_does(client, shards: Path, tiny_model: Path, tmp_path) -> None:
    pytest.importorskip("dask_cudf", reason="cudf cannot travel to the offline GPU machine (ci/gpu_check.sh)")
    dataset = ImageTextPairDataset.from_webdataset(str(shards), backend="cudf")
    assert type(dataset.metadata._meta).__module__.startswith("cudf")
    embedded = ClipImageEmbedder(str(tiny_model), device="cpu")(dataset)
    on_cudf = embedded.metadata.compute()
    assert type(on_cudf).__module__.startswith("cudf")
    reference = ClipImageEmbedder(str(tiny_model), device="cpu")(ImageTextPairDataset.from_webdataset(str(shards)))
    expected = reference.metadata.compute().sort_values("key")
    back = cudf_to_pandas(on_cudf, embedded.meta).sort_values("key")
    np.testing.assert_allclose(
        embeddings_to_numpy(back["image_embedding"]), embeddings_to_numpy(expected["image_embedding"]), atol=1e-6
    )
    kept = embedded.with_metadata(embedded.metadata[embedded.metadata.status == "success"])  # a cudf frame back
    summary = kept.save_metadata(str(tmp_path / "out"))
    assert summary["rows"].sum() == (expected.status == "success").sum()
