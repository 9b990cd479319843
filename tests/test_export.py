"""dataset.export_clip_retrieval: img_emb/*.npy + metadata/*.parquet pairs, one per shard, rows in matching order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ColumnError, ImageTextPairDataset, embeddings_to_numpy
from dask_clip.provenance import Computed


@pytest.fixture(scope="module")
def embedded(client, pristine_embedded: Path) -> ImageTextPairDataset:
    return ImageTextPairDataset.from_webdataset(str(pristine_embedded))


def test_pairs_hold_the_embedded_rows_in_the_same_order(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    summary = embedded.export_clip_retrieval(str(tmp_path / "index"))

    assert summary[["stem", "index", "rows"]].values.tolist() == [["00000", 0, 5], ["00001", 1, 5], ["00003", 2, 5]]
    assert sorted(p.name for p in (tmp_path / "index" / "img_emb").iterdir()) == [
        "img_emb_0.npy",
        "img_emb_1.npy",
        "img_emb_2.npy",
    ]
    frame = embedded.metadata.compute()
    by_key = dict(zip(frame["key"], embeddings_to_numpy(frame["image_embedding"]), strict=True))
    for i, stem in enumerate(("00000", "00001", "00003")):
        vectors = np.load(tmp_path / "index" / "img_emb" / f"img_emb_{i}.npy")
        metadata = pd.read_parquet(tmp_path / "index" / "metadata" / f"metadata_{i}.parquet")
        assert vectors.dtype == np.float16 and vectors.shape == (5, 32)
        assert list(metadata.columns) == ["key", "caption", "url"]
        shard_rows = frame[frame["key"].str.startswith(stem) & frame["image_embedding"].notna()]
        assert metadata["key"].tolist() == shard_rows["key"].tolist()  # failed downloads left out of both files
        assert metadata["caption"].tolist() == shard_rows["caption"].tolist()
        expected = np.stack([by_key[key] for key in metadata["key"]])
        np.testing.assert_allclose(vectors.astype(np.float32), expected, atol=1e-3)


def test_a_shard_without_embeddings_writes_no_pair(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    def drop_shard_one(rows: pd.DataFrame) -> pd.DataFrame:
        column = rows["image_embedding"]
        nulls = pd.Series(
            pa.nulls(len(rows), column.dtype.pyarrow_dtype).to_pandas(types_mapper=pd.ArrowDtype), index=rows.index
        )
        return rows.assign(image_embedding=column.where(~rows["key"].str.startswith("00001"), nulls))

    dropped = embedded.metadata.map_partitions(drop_shard_one, meta=embedded.metadata._meta)
    # values changed in memory are another source than the files' (whose content digests they no longer match)
    dataset = embedded.with_metadata(dropped, {"image_embedding": Computed({"function": "drop shard 00001"})})
    summary = dataset.export_clip_retrieval(str(tmp_path / "index"), metadata_columns=["url"])
    assert summary["rows"].tolist() == [5, 0, 5] and summary["embeddings_path"].iloc[1] == ""
    assert sorted(p.name for p in (tmp_path / "index" / "metadata").iterdir()) == [
        "metadata_0.parquet",
        "metadata_2.parquet",
    ]
    assert pq.read_schema(tmp_path / "index" / "metadata" / "metadata_2.parquet").names == ["key", "url"]


def test_unknown_columns_are_named(embedded: ImageTextPairDataset, tmp_path: Path) -> None:
    with pytest.raises(ColumnError, match=r"export_clip_retrieval reads columns \['clip'\]"):
        embedded.export_clip_retrieval(str(tmp_path), embedding_column="clip")
    with pytest.raises(ColumnError, match=r"unknown metadata columns \['title'\]"):
        embedded.export_clip_retrieval(str(tmp_path), metadata_columns=["title"])
