"""Null embeddings (rows without one) written and read back: by dask_clip, pyarrow and pandas.

dask_clip writes an embedding column as ``list<float32>`` (a null row empty), its width in the footer: a
fixed-size list with null rows, as it wrote them before, needs pyarrow >= 26 to read back (15-25 fail with
``ArrowInvalid``). CI also runs this file in a second environment on the lowest pyarrow that
``pyproject.toml`` allows (``ci/floor.sh``); it needs no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip import ImageTextPairDataset, SemanticDeduplicator, embeddings_to_numpy, testing

VECTORS = {
    "a": np.array([1.0, 0.0, 0.0], dtype=np.float32),
    "b": None,
    "c": np.array([0.0, 1.0, 0.0], dtype=np.float32),
    "d": None,
    "e": np.array([0.0, 0.6, 0.8], dtype=np.float32),
}


def test_null_embeddings_round_trip_through_every_reader(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "in", VECTORS, rows_per_shard=3)
    dataset = SemanticDeduplicator(n_clusters=1)(ImageTextPairDataset.from_webdataset(str(tmp_path / "in")))
    summary = dataset.save_metadata(str(tmp_path / "out"))
    assert summary["written"].all()

    table = pa.concat_tables(pq.read_table(path) for path in sorted((tmp_path / "out").glob("*.parquet")))
    column = table.column("image_embedding")
    assert pa.types.is_list(column.type) and pa.types.is_float32(column.type.value_type)
    assert column.null_count == 2
    assert json.loads(table.schema.metadata[b"dask_clip.widths"]) == {"image_embedding": 3}
    footer = json.loads(table.schema.metadata[b"dask_clip"])
    assert footer["vectors"] == {"image_embedding": {"layout": "list", "width": 3}}
    assert [v is None for v in column.to_pylist()] == [v is None for v in VECTORS.values()]

    frame = pd.concat(pd.read_parquet(path) for path in sorted((tmp_path / "out").glob("*.parquet")))
    assert frame["image_embedding"].isna().tolist() == [v is None for v in VECTORS.values()]

    for tar in (tmp_path / "in").glob("*.tar"):  # the parquets alone were saved elsewhere: pair them again
        (tmp_path / "out" / tar.name).write_bytes(tar.read_bytes())
    back = ImageTextPairDataset.from_webdataset(str(tmp_path / "out")).metadata.compute(scheduler="threads")
    vectors = embeddings_to_numpy(back["image_embedding"])
    for row, (key, expected) in enumerate(VECTORS.items()):
        if expected is None:
            assert np.isnan(vectors[row]).all(), key
        else:
            np.testing.assert_array_equal(vectors[row], expected, err_msg=key)
    assert back["keep"].tolist() == [True] * 5
