"""Cases found by trying issue 18's rules as a hostile user would: saves that name the dataset's folder under
another spelling, or another dataset's folder as their output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ImageTextPairDataset, SemanticDeduplicator, testing
from dask_clip.errors import UsageError


def vectors(prefix: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(prefix))
    return {f"{prefix}{i}": rng.standard_normal(8) for i in range(8)}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("spelling", ["{folder}/", "{folder}", "{folder}/../{name}"])
def test_a_save_into_the_dataset_under_another_spelling_keeps_its_input_columns(tmp_path: Path, spelling: str) -> None:
    folder = tmp_path / "shards"
    testing.write_embedding_shards(folder, vectors("a"), rows_per_shard=4)
    deduplicated = SemanticDeduplicator(n_clusters=1)(ImageTextPairDataset.from_webdataset(str(folder)))
    deduplicated.save_metadata(spelling.format(folder=folder, name=folder.name), columns=["keep"])
    names = pq.read_schema(folder / "00000.parquet").names
    assert "image_embedding" in names and "keep" in names, names  # an in-place save never drops an input column


def test_a_save_never_replaces_the_metadata_of_another_datasets_shards(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "mine", vectors("a"), rows_per_shard=4)
    other = tmp_path / "other"
    testing.write_embedding_shards(other, vectors("bb"), rows_per_shard=4)
    before = digests(other)
    deduplicated = SemanticDeduplicator(n_clusters=1)(ImageTextPairDataset.from_webdataset(str(tmp_path / "mine")))
    with pytest.raises(UsageError, match=r"holds shards of another dataset: 2 of the 2 parquets .* 00000\.parquet"):
        deduplicated.save_metadata(str(other))
    assert digests(other) == before


def test_a_save_never_replaces_a_users_parquet_in_its_output_folder(tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "mine", vectors("a"), rows_per_shard=4)
    output = tmp_path / "output"
    output.mkdir()
    pq.write_table(pa.table({"note": ["precious"]}), output / "00001.parquet")  # pyarrow's file, not dask_clip's
    before = digests(output)
    deduplicated = SemanticDeduplicator(n_clusters=1)(ImageTextPairDataset.from_webdataset(str(tmp_path / "mine")))
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"holds 1 parquets .* dask_clip did not write .*00001\.parquet"):
            deduplicated.save_metadata(str(output), overwrite=overwrite)
        assert digests(output) == before
    (output / "00001.parquet").unlink()
    deduplicated.save_metadata(str(output))
    deduplicated.save_metadata(str(output), overwrite=True)  # its own files it replaces
    assert sorted(p.name for p in output.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
