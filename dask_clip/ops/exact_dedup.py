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

from dask_clip.columns import BOOL, FLOAT64, STRING, empty_column
from dask_clip.execution import ShardTask, map_shuffled, shuffle_to_shards
from dask_clip.io.tar_samples import RowKeys, is_image_extension, iter_tar_samples
from dask_clip.ops.deduplicator import Deduplicator

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

SHARD_NUMBER_COLUMN = "_dask_clip_shard"
STEM_COLUMN = "_dask_clip_stem"


def image_sha256(rows: pd.DataFrame, task: ShardTask, hash_column: str) -> pd.DataFrame:
    """``rows`` plus ``hash_column``: the hex sha256 of each row's image member in the tar, null without one.

    Keys are matched to rows as the embedder matches them; a key no row has is an error naming the tar.
    """
    keys = RowKeys(rows[task.id_col], task.shard.tar_url)
    hashes: list[str | None] = [None] * len(rows)
    unknown: list[str] = []
    for sample in iter_tar_samples(task.shard.tar_url, wanted=is_image_extension):
        position = keys.position(sample.key)
        extension = sample.image_member()
        if position is None:
            unknown.append(sample.key)
        elif extension in sample.members:
            hashes[position] = hashlib.sha256(sample.members[extension]).hexdigest()
    if unknown:
        raise keys.unknown_keys_error(unknown, task.id_col)
    return rows.assign(**{hash_column: pd.array(hashes, dtype=STRING)})


class ExactDeduplicator(Deduplicator):
    """``deduplicator(dataset)`` -> a new dataset flagging rows whose image bytes another row has.

    Writes the ``Deduplicator`` columns: in each group of equal hashes the row with the smallest id is kept
    (of rows with the same id, the one in the first shard), and the others name it (id and shard), with
    similarity 1.0. Rows without a hash (no image) are always kept. When the
    dataset has no ``hash_column``, it is computed (hex sha256 of the image member) from the tars and
    added to the dataset. The column names are keyword-only options, as in ``Deduplicator``.
    """

    def __init__(self, *, hash_column: str = "sha256", **columns: str) -> None:
        super().__init__(**columns)
        self.hash_column = hash_column

    def config(self) -> dict[str, Any]:
        return {"class": self.name, "hash_column": self.hash_column}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.hash_column] if self.hash_column in dataset.meta.columns else []  # else the tars' images

    def reads_tar(self, dataset: ImageTextPairDataset) -> bool:
        return self.hash_column not in dataset.meta.columns

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        hashes = {} if self.hash_column in dataset.meta.columns else {self.hash_column: empty_column(STRING)}
        return {**hashes, **super().output_columns(dataset)}

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        id_col = dataset.id_col
        if self.hash_column not in dataset.meta.columns:
            hashed_meta = dataset.meta.assign(**{self.hash_column: empty_column(STRING)})
            hashes = dataset.map_shards(image_sha256, hashed_meta, label="image-sha256", hash_column=self.hash_column)
            dataset = dataset.with_metadata(hashes)
        id_dtype = dataset.meta.dtypes[id_col]
        pairs_meta = pd.DataFrame(
            {
                id_col: empty_column(id_dtype),
                self.hash_column: empty_column(dataset.meta.dtypes[self.hash_column]),
                SHARD_NUMBER_COLUMN: empty_column("int64"),
                STEM_COLUMN: empty_column(STRING),
            }
        )
        pairs = dataset.map_shards(_hashed_rows, pairs_meta, label="hashed-rows", hash_column=self.hash_column)
        duplicates_meta = pd.DataFrame(
            {
                id_col: empty_column(id_dtype),
                self.duplicate_of_column: empty_column(id_dtype),
                self.duplicate_of_shard_column: empty_column(STRING),
                SHARD_NUMBER_COLUMN: empty_column("int64"),
            }
        )
        duplicates = map_shuffled(
            _duplicates_in_groups,
            pairs.shuffle(on=self.hash_column, shuffle_method="tasks"),
            duplicates_meta,
            label=f"{self.name}-groups",
            id_col=id_col,
            hash_column=self.hash_column,
            outputs=(self.duplicate_of_column, self.duplicate_of_shard_column),
        )
        by_shard = shuffle_to_shards(duplicates, SHARD_NUMBER_COLUMN, len(dataset.shards))
        return dataset.map_shards(self._flag_rows, output_meta, by_shard, label=self.name)

    def _flag_rows(self, rows: pd.DataFrame, task: ShardTask, duplicates: pd.DataFrame) -> pd.DataFrame:
        """One shard's rows plus the flag columns, from the duplicates found in this shard."""
        ids = rows[task.id_col]
        positions = pd.Index(duplicates[task.id_col]).get_indexer(ids) if len(duplicates) else np.full(len(rows), -1)
        removed = positions >= 0

        def of_kept_row(column: str) -> pd.Series:
            return pd.Series(duplicates[column].array.take(positions, allow_fill=True), index=rows.index)

        return rows.assign(
            **{
                self.keep_column: pd.Series(pd.array(~removed, dtype=BOOL), index=rows.index),
                self.duplicate_of_column: of_kept_row(self.duplicate_of_column).astype(ids.dtype),
                self.duplicate_of_shard_column: of_kept_row(self.duplicate_of_shard_column).astype(STRING),
                self.similarity_column: pd.Series(
                    pd.array([1.0 if r else None for r in removed], dtype=FLOAT64), index=rows.index
                ),
            }
        )


def _hashed_rows(rows: pd.DataFrame, task: ShardTask, hash_column: str) -> pd.DataFrame:
    """The rows with a hash: id, hash and the number and stem of the shard they come from."""
    hashed = rows.loc[rows[hash_column].notna(), [task.id_col, hash_column]]
    return hashed.assign(
        **{
            SHARD_NUMBER_COLUMN: np.full(len(hashed), task.shard.index, dtype="int64"),
            STEM_COLUMN: pd.array([task.shard.stem] * len(hashed), dtype=STRING),
        }
    )


def _duplicates_in_groups(pairs: pd.DataFrame, id_col: str, hash_column: str, outputs: tuple[str, str]) -> pd.DataFrame:
    """Within complete hash groups: every row but the first by (id, shard number), with that row's id and shard
    stem as ``outputs`` (duplicate-of, duplicate-of-shard columns), and its own shard number."""
    ordered = pairs.sort_values([hash_column, id_col, SHARD_NUMBER_COLUMN], kind="stable", ignore_index=True)
    groups = ordered.groupby(hash_column, sort=False)
    removed = ordered[hash_column].duplicated(keep="first").to_numpy(dtype=bool)
    return pd.DataFrame(
        {
            id_col: ordered[id_col][removed],
            outputs[0]: groups[id_col].transform("first")[removed],
            outputs[1]: groups[STEM_COLUMN].transform("first")[removed],
            SHARD_NUMBER_COLUMN: ordered[SHARD_NUMBER_COLUMN][removed],
        }
    )
