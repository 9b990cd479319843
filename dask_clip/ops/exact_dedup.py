"""Exact deduplication: rows whose image bytes are identical (same hash) keep one row per group.

The hash column (img2dataset's ``sha256`` of the image bytes) is used when the dataset has it, else
computed from each shard's tar. Rows are grouped across shards by a Dask shuffle on the hash; the
duplicates found are shuffled back to their shard (one partition per shard) and joined by id.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.io.tar_samples import iter_tar_samples

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

SHARD_NUMBER_COLUMN = "_dask_clip_shard"
STRING = pd.ArrowDtype(pa.string())


def image_sha256(rows: pd.DataFrame, tar_url: str, id_col: str, hash_column: str) -> pd.DataFrame:
    """``rows`` plus ``hash_column``: the hex sha256 of each row's image member in the tar, null without one."""
    from dask_clip.embedders.base import IMAGE_EXTENSIONS

    positions = {str(key): position for position, key in enumerate(rows[id_col])}
    hashes: list[str | None] = [None] * len(rows)
    for sample in iter_tar_samples(tar_url):
        position = positions.get(sample.key)
        extension = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
        if position is not None and extension is not None:
            hashes[position] = hashlib.sha256(sample.members[extension]).hexdigest()
    return rows.assign(**{hash_column: pd.array(hashes, dtype=STRING)})


class ExactDeduplicator:
    """``deduplicator(dataset)`` -> a new dataset flagging rows whose image bytes another row has.

    Adds ``keep_column`` (``bool``: False for a removed duplicate), ``duplicate_of_column`` (the id
    kept in its group, like the id column; null when kept) and ``similarity_column`` (``float64``:
    1.0 for a removed duplicate, null when kept). In each group of equal hashes the smallest id is
    kept. Rows without a hash (no image) are always kept. When the dataset has no ``hash_column``,
    it is computed (hex sha256 of the image member) from the tars and added to the dataset.
    Columns already named like the output columns (an earlier deduplication) are replaced.
    """

    def __init__(
        self,
        hash_column: str = "sha256",
        keep_column: str = "keep",
        duplicate_of_column: str = "duplicate_of",
        similarity_column: str = "similarity",
    ) -> None:
        self.hash_column = hash_column
        self.keep_column = keep_column
        self.duplicate_of_column = duplicate_of_column
        self.similarity_column = similarity_column

    def config(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "hash_column": self.hash_column}

    def __call__(self, dataset: "ImageTextPairDataset") -> "ImageTextPairDataset":
        id_col = dataset.id_col
        outputs = [self.keep_column, self.duplicate_of_column, self.similarity_column]
        metadata = dataset.pandas_metadata.drop(columns=[c for c in outputs if c in dataset.pandas_metadata.columns])
        columns = list(metadata.columns)
        derived: dict[str, Any] = {}
        if self.hash_column not in columns:
            meta = metadata._meta.assign(**{self.hash_column: pd.Series([], dtype=STRING)})
            metadata = dataset.with_metadata(metadata).map_shards(image_sha256, meta=meta, hash_column=self.hash_column)
            derived[self.hash_column] = self.config()

        id_dtype = metadata.dtypes[id_col]
        pairs_meta = pd.DataFrame(
            {
                id_col: pd.Series([], dtype=id_dtype),
                self.hash_column: pd.Series([], dtype=metadata.dtypes[self.hash_column]),
                SHARD_NUMBER_COLUMN: pd.Series([], dtype="int64"),
            }
        )
        pairs = metadata.map_partitions(_hashed_rows, id_col, self.hash_column, meta=pairs_meta)
        duplicates_meta = pd.DataFrame(
            {
                id_col: pd.Series([], dtype=id_dtype),
                self.duplicate_of_column: pd.Series([], dtype=id_dtype),
                SHARD_NUMBER_COLUMN: pd.Series([], dtype="int64"),
            }
        )
        duplicates = pairs.shuffle(on=self.hash_column, shuffle_method="tasks").map_partitions(
            _duplicates_in_groups, id_col, self.hash_column, self.duplicate_of_column, meta=duplicates_meta
        )
        shard_count = metadata.npartitions
        by_shard = duplicates.set_index(
            SHARD_NUMBER_COLUMN, divisions=list(range(shard_count + 1)), shuffle_method="tasks"
        )

        flagged_meta = metadata._meta.assign(**self._flag_columns(pd.Series([], dtype=id_dtype), {}))
        flagged = dd.map_partitions(
            self._flag_rows, metadata, by_shard, id_col, meta=flagged_meta, align_dataframes=False,
            enforce_metadata=False,
        )
        derived.update({column: self.config() for column in outputs})
        return dataset.with_metadata(flagged, derived_columns=derived)

    def _flag_rows(self, rows: pd.DataFrame, duplicates: pd.DataFrame, id_col: str) -> pd.DataFrame:
        """One shard's rows plus the flag columns, from the duplicates found in this shard."""
        kept_ids = dict(zip(duplicates[id_col], duplicates[self.duplicate_of_column]))
        return rows.assign(**self._flag_columns(rows[id_col], kept_ids))

    def _flag_columns(self, ids: pd.Series, kept_ids: dict[Any, Any]) -> dict[str, pd.Series]:
        duplicate_of = pd.Series(pd.array([kept_ids.get(i) for i in ids], dtype=ids.dtype), index=ids.index)
        removed = duplicate_of.notna().to_numpy(dtype=bool)
        similarity = pd.array([1.0 if r else None for r in removed], dtype=pd.ArrowDtype(pa.float64()))
        return {
            self.keep_column: pd.Series(pd.array(~removed, dtype=pd.ArrowDtype(pa.bool_())), index=ids.index),
            self.duplicate_of_column: duplicate_of,
            self.similarity_column: pd.Series(similarity, index=ids.index),
        }


def _hashed_rows(rows: pd.DataFrame, id_col: str, hash_column: str, partition_info: dict | None = None) -> pd.DataFrame:
    """The rows with a hash: id, hash and the number of the shard (partition) they come from."""
    hashed = rows.loc[rows[hash_column].notna(), [id_col, hash_column]]
    number = partition_info["number"] if partition_info else 0
    return hashed.assign(**{SHARD_NUMBER_COLUMN: np.full(len(hashed), number, dtype="int64")})


def _duplicates_in_groups(pairs: pd.DataFrame, id_col: str, hash_column: str, duplicate_of_column: str) -> pd.DataFrame:
    """Within complete hash groups: every row but the smallest id, with that id as ``duplicate_of_column``."""
    smallest = pairs.groupby(hash_column, sort=False)[id_col].transform("min")
    removed = (pairs[id_col] != smallest).to_numpy(dtype=bool)
    return pd.DataFrame(
        {
            id_col: pairs[id_col][removed],
            duplicate_of_column: smallest[removed],
            SHARD_NUMBER_COLUMN: pairs[SHARD_NUMBER_COLUMN][removed],
        }
    )
