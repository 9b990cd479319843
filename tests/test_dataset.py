"""ImageTextPairDataset.from_webdataset: pairing by stem, partitions, and errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ImageTextPairDataset
from dask_clip.errors import ShardMetadataError


def test_one_partition_per_shard_paired_by_stem(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    assert [s.stem for s in dataset.shards] == ["00000", "00001", "00003"]
    assert dataset.metadata.npartitions == 3
    assert dataset.tar_files == [str(shards / f"{stem}.tar") for stem in ("00000", "00001", "00003")]
    frames = [dataset.metadata.get_partition(i).compute() for i in range(3)]
    for frame, stem in zip(frames, ("00000", "00001", "00003"), strict=True):
        assert len(frame) == 6
        assert all(key.startswith(stem) for key in frame["key"])


def test_extra_columns_pass_through_with_stable_dtypes(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    frame = dataset.metadata.compute()
    assert list(frame.columns) == pq.read_schema(shards / "00000.parquet").names
    assert frame.dtypes.equals(dataset.metadata.dtypes)  # nulls in width (failed rows) change nothing
    assert frame["width"].isna().sum() == 3


def test_tar_without_parquet_is_named(shards: Path) -> None:
    os.remove(shards / "00001.parquet")
    with pytest.raises(ValueError, match=r"00001\.tar has no 00001\.parquet"):
        ImageTextPairDataset.from_webdataset(str(shards))


def test_parquet_without_tar_is_named(shards: Path) -> None:
    os.remove(shards / "00003.tar")
    with pytest.raises(ValueError, match=r"00003\.parquet has no 00003\.tar"):
        ImageTextPairDataset.from_webdataset(str(shards))


def test_empty_and_missing_directories(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no shards found"):
        ImageTextPairDataset.from_webdataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        ImageTextPairDataset.from_webdataset(str(tmp_path / "nowhere"))


def test_missing_id_column_names_the_file(shards: Path) -> None:
    with pytest.raises(ValueError, match=r"00000\.parquet: no id column 'sample_id'"):
        ImageTextPairDataset.from_webdataset(str(shards), id_col="sample_id")


def _rewrite(path: Path, transform) -> None:
    table = pq.read_table(path)
    pq.write_table(transform(table), path)


def test_duplicate_ids_name_the_file(shards: Path) -> None:
    def duplicate_first_key(table: pa.Table) -> pa.Table:
        keys = table["key"].to_pylist()
        keys[1] = keys[0]
        return table.set_column(table.schema.get_field_index("key"), "key", pa.array(keys))

    _rewrite(shards / "00001.parquet", duplicate_first_key)
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ShardMetadataError, match=r"00001\.parquet: 1 duplicate ids in 'key', e\.g\. \['000010000'\]"):
        dataset.metadata.compute()


def test_a_shard_with_different_columns_is_named(shards: Path) -> None:
    _rewrite(shards / "00003.parquet", lambda table: table.drop_columns(["exif"]))
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ShardMetadataError, match=r"00003\.parquet: columns differ .*missing \['exif'\]"):
        dataset.metadata.compute()


def test_operations_must_keep_one_partition_per_shard(shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ValueError, match="3 shards"):
        dataset.with_metadata(dataset.metadata.repartition(npartitions=1))


def test_backend_selection(shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    dataset = ImageTextPairDataset.from_webdataset(str(shards), backend="pandas")
    assert dataset.backend == "pandas" and dataset.pandas_metadata is dataset.metadata
    with pytest.raises(ValueError, match=r"backend must be one of \('pandas', 'cudf'\), not 'polars'"):
        ImageTextPairDataset.from_webdataset(str(shards), backend="polars")
    monkeypatch.setitem(sys.modules, "cudf", None)  # as if the GPU extra were not installed
    with pytest.raises(ImportError, match=r'backend="cudf" needs cudf: pip install "dask_clip\[gpu\]"'):
        ImageTextPairDataset.from_webdataset(str(shards), backend="cudf")
