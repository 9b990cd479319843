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
from dask_clip.execution import SHARD_COLUMN, ShardTask, map_shuffled
from dask_clip.io.tar_samples import RowKeys, is_image_extension, iter_tar_samples
from dask_clip.ops.deduplicator import DUPLICATE_OF, DUPLICATE_OF_SHARD, KEEP, SIMILARITY, STEM, Deduplicator

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


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
    added to the dataset. The columns it writes are named by the keyword-only options of ``Deduplicator``.
    """

    def __init__(
        self,
        *,
        hash_column: str = "sha256",
        keep_column: str = "keep",
        duplicate_of_column: str = "duplicate_of",
        duplicate_of_shard_column: str = "duplicate_of_shard",
        similarity_column: str = "similarity",
    ) -> None:
        super().__init__(
            keep_column=keep_column,
            duplicate_of_column=duplicate_of_column,
            duplicate_of_shard_column=duplicate_of_shard_column,
            similarity_column=similarity_column,
        )
        self.hash_column = hash_column

    def config(self) -> dict[str, Any]:
        return {"hash_column": self.hash_column}

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
                SHARD_COLUMN: empty_column("int64"),
                STEM: empty_column(STRING),
            }
        )
        pairs = dataset.map_shards(_hashed_rows, pairs_meta, label="hashed-rows", hash_column=self.hash_column)
        duplicates = map_shuffled(
            _duplicates_in_groups,
            pairs.shuffle(on=self.hash_column, shuffle_method="tasks"),
            _duplicates_meta(id_col, id_dtype),
            label=f"{self.name}-groups",
            id_col=id_col,
            hash_column=self.hash_column,
        )
        return self.join_decisions(dataset, duplicates, output_meta)


def _hashed_rows(rows: pd.DataFrame, task: ShardTask, hash_column: str) -> pd.DataFrame:
    """The rows with a hash: id, hash and the number and stem of the shard they come from."""
    hashed = rows.loc[rows[hash_column].notna(), [task.id_col, hash_column]]
    return hashed.assign(
        **{
            SHARD_COLUMN: np.full(len(hashed), task.shard.index, dtype="int64"),
            STEM: pd.array([task.shard.stem] * len(hashed), dtype=STRING),
        }
    )


def _duplicates_in_groups(pairs: pd.DataFrame, id_col: str, hash_column: str) -> pd.DataFrame:
    """Within complete hash groups: a decision (``ops.deduplicator``) for every row but the first by (id, shard
    number), which it duplicates with similarity 1.0."""
    ordered = pairs.sort_values([hash_column, id_col, SHARD_COLUMN], kind="stable", ignore_index=True)
    groups = ordered.groupby(hash_column, sort=False)
    removed = ordered[hash_column].duplicated(keep="first").to_numpy(dtype=bool)
    count = int(removed.sum())
    return pd.DataFrame(
        {
            SHARD_COLUMN: ordered[SHARD_COLUMN][removed].to_numpy(dtype=np.int64),
            id_col: ordered[id_col][removed].array,
            KEEP: pd.array(np.zeros(count, dtype=bool), dtype=BOOL),
            DUPLICATE_OF: groups[id_col].transform("first")[removed].array,
            DUPLICATE_OF_SHARD: groups[STEM].transform("first")[removed].array,
            SIMILARITY: pd.array(np.ones(count), dtype=FLOAT64),
        }
    )


def _duplicates_meta(id_col: str, id_dtype: object) -> pd.DataFrame:
    """The columns and types of ``_duplicates_in_groups``' result."""
    return pd.DataFrame(
        {
            SHARD_COLUMN: empty_column("int64"),
            id_col: empty_column(id_dtype),
            KEEP: empty_column(BOOL),
            DUPLICATE_OF: empty_column(id_dtype),
            DUPLICATE_OF_SHARD: empty_column(STRING),
            SIMILARITY: empty_column(FLOAT64),
        }
    )
