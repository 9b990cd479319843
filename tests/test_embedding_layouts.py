"""Embedding columns that other tools wrote: lists and large lists (pandas, NeMo Curator), fixed-size lists of
any float width, and pandas object columns of arrays. Every operation takes them, computes in float32, and
names the shard, row and widths when a row does not fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dask_clip import (
    AestheticClassifier,
    ImageTextPairDataset,
    SemanticDeduplicator,
    ShardError,
    clip_score,
    testing,
)
from dask_clip.models.classifiers import AestheticMlp

RNG = np.random.default_rng(0)
KEYS = [f"{i:09d}" for i in range(8)]
VECTORS = RNG.standard_normal((8, 4)).astype(np.float32)
VECTORS[1] = VECTORS[0] * 2  # a near duplicate of row 0 (same direction)
CAPTIONS = RNG.standard_normal((8, 4)).astype(np.float32)


def write(folder: Path, value_type: pa.DataType, layout: str) -> ImageTextPairDataset:
    """Two shards of four rows whose ``image_embedding`` and ``text_embedding`` are written as ``layout``."""

    def column(vectors: np.ndarray) -> pa.Array:
        items = [None if i == 3 else v.tolist() for i, v in enumerate(vectors)]
        if layout == "list":
            return pa.array(items, type=pa.list_(value_type))
        if layout == "large_list":
            return pa.array(items, type=pa.large_list(value_type))
        return pa.array(items, type=pa.list_(value_type, 4))

    for shard in range(2):
        rows = slice(4 * shard, 4 * shard + 4)
        table = pa.table(
            {"key": KEYS[rows], "image_embedding": column(VECTORS)[rows], "text_embedding": column(CAPTIONS)[rows]}
        )
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        testing.write_shard(folder, shard, [], {})  # an empty tar next to it
        pq.write_table(table, folder / f"{shard:05d}.parquet")
    return ImageTextPairDataset.from_webdataset(str(folder))


def results(dataset: ImageTextPairDataset, tmp_path: Path, checkpoint: Path) -> dict[str, object]:
    deduplicated = SemanticDeduplicator(n_clusters=1, eps=0.01)(dataset).metadata.compute()  # see README: P2P
    scored = AestheticClassifier(str(checkpoint), embedding_dim=4)(dataset).metadata.compute(scheduler="threads")
    matched = clip_score(dataset).metadata.compute(scheduler="threads")
    hits = dataset.search(image=VECTORS[5], k=3)
    exported = dataset.export_clip_retrieval(str(tmp_path / "export"), overwrite=True)
    return {
        "duplicate_of": deduplicated["duplicate_of"].tolist(),
        "aesthetic": scored["aesthetic_score"].astype("float64").round(3).tolist(),
        "clip_score": matched["clip_score"].astype("float64").round(3).tolist(),
        "hits": hits["key"].tolist(),
        "exported": exported["rows"].tolist(),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aesthetic") / "aesthetic.pth"
    torch.manual_seed(0)
    torch.save(AestheticMlp(4).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("baseline")
    return results(write(folder / "shards", pa.float32(), "fixed"), folder, checkpoint)


@pytest.mark.parametrize(
    ("layout", "value_type"),
    [
        ("list", pa.float64()),  # a pandas column of numpy arrays, written by pyarrow
        ("list", pa.float32()),  # NeMo Curator's list column
        ("large_list", pa.float32()),
        ("fixed", pa.float64()),
        ("fixed", pa.float16()),
    ],
)
def test_every_operation_takes_every_layout(
    tmp_path: Path, checkpoint: Path, baseline: dict[str, object], layout: str, value_type: pa.DataType
) -> None:
    got = results(write(tmp_path / "shards", value_type, layout), tmp_path, checkpoint)
    assert got["duplicate_of"] == baseline["duplicate_of"] and got["duplicate_of"][1] == KEYS[0]
    assert got["hits"] == baseline["hits"] and got["exported"] == baseline["exported"]
    tolerance = 2e-2 if value_type == pa.float16() else 1e-3
    np.testing.assert_allclose(
        np.array(got["clip_score"], dtype=float), np.array(baseline["clip_score"], dtype=float), atol=tolerance
    )
    np.testing.assert_allclose(
        np.array(got["aesthetic"], dtype=float), np.array(baseline["aesthetic"], dtype=float), atol=tolerance
    )


def test_a_pandas_object_column_of_arrays_is_an_embedding_column(tmp_path: Path, baseline: dict[str, object]) -> None:
    dataset = write(tmp_path / "shards", pa.float32(), "fixed")

    def as_objects(rows: pd.DataFrame) -> pd.DataFrame:
        arrays = [None if v is None or v is pd.NA else np.asarray(v) for v in rows["image_embedding"].tolist()]
        return rows.assign(image_embedding=pd.Series(arrays, index=rows.index, dtype=object))

    meta = dataset.meta.assign(image_embedding=pd.Series([], dtype=object))
    objects = dataset.with_metadata(dataset.metadata.map_partitions(as_objects, meta=meta))
    frame = SemanticDeduplicator(n_clusters=1, eps=0.01)(objects).metadata.compute()
    assert frame["duplicate_of"].tolist() == baseline["duplicate_of"]
    assert objects.search(image=VECTORS[5], k=3)["key"].tolist() == baseline["hits"]


def test_a_row_of_another_width_names_the_shard_the_row_and_both_widths(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    dataset = write(folder, pa.float32(), "list")
    table = pq.read_table(folder / "00001.parquet").to_pydict()
    table["image_embedding"][2] = [1.0, 2.0, 3.0]
    pq.write_table(pa.table(table, schema=pq.read_schema(folder / "00001.parquet")), folder / "00001.parquet")
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    expected = (
        r"00001\.tar: ValueError: row '000000006' of 'image_embedding' holds 3 values where the other embeddings hold 4"
    )
    with pytest.raises(ShardError, match=expected):
        SemanticDeduplicator(n_clusters=1)(dataset).metadata.compute(scheduler="threads")
    with pytest.raises(ShardError, match=expected):
        dataset.export_clip_retrieval(str(tmp_path / "export"))
