"""What the deduplicators share: the decision columns they write, and how decisions reach each shard's rows.

A deduplicator decides across shards, then hands ``join_decisions`` a Dask frame of decisions: one row per
decided row (rows without one are kept), with its shard's position (``execution.SHARD_COLUMN``), its id (under
the id column's name) and ``KEEP``, ``DUPLICATE_OF``, ``DUPLICATE_OF_SHARD`` and ``SIMILARITY``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_clip.columns import BOOL, FLOAT64, STRING, empty_column
from dask_clip.execution import SHARD_COLUMN, ShardTask, shuffle_on_disk
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

KEEP = "_dask_clip_keep"
DUPLICATE_OF = "_dask_clip_duplicate_of"
DUPLICATE_OF_SHARD = "_dask_clip_duplicate_of_shard"
SIMILARITY = "_dask_clip_similarity"
STEM = "_dask_clip_stem"
"""The stem of a row's shard, while decisions are made across shards."""


class Deduplicator(Operation):
    """Base of the deduplicators: for every row, ``keep_column`` (``bool``: False for a removed duplicate),
    ``duplicate_of_column`` (the id of the row it duplicates, typed like the id column; null when kept),
    ``duplicate_of_shard_column`` (``string``: the stem of that row's shard, which tells it apart when ids
    repeat across shards; null when kept) and ``similarity_column`` (``float64``: the cosine to that row, 1.0
    for identical bytes; null when kept). Columns of those names (an earlier deduplication) are replaced."""

    cross_shard = True

    def __init__(
        self,
        *,
        keep_column: str = "keep",
        duplicate_of_column: str = "duplicate_of",
        duplicate_of_shard_column: str = "duplicate_of_shard",
        similarity_column: str = "similarity",
    ) -> None:
        self.keep_column = keep_column
        self.duplicate_of_column = duplicate_of_column
        self.duplicate_of_shard_column = duplicate_of_shard_column
        self.similarity_column = similarity_column

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {
            self.keep_column: empty_column(BOOL),
            self.duplicate_of_column: empty_column(dataset.meta[dataset.id_col].dtype),
            self.duplicate_of_shard_column: empty_column(STRING),
            self.similarity_column: empty_column(FLOAT64),
        }

    def join_decisions(
        self, dataset: ImageTextPairDataset, decisions: dd.DataFrame, output_meta: pd.DataFrame
    ) -> dd.DataFrame:
        """Each shard's rows of ``dataset`` with the ``decisions`` made for them, joined by id, as this
        deduplicator's columns; rows without a decision are kept.

        The decisions move to their shard's partition with ``execution.shuffle_on_disk`` (Dask's P2P shuffle on
        a client: a task per partition on each side, so the graph grows linearly with the shard count, where the
        tasks shuffle's grows faster), then each shard's task reads its own partition of them only.
        """
        by_shard = shuffle_on_disk(decisions, SHARD_COLUMN, len(dataset.shards))
        return dataset.map_shards(self._decided, output_meta, by_shard, label=self.name)

    def _decided(self, rows: pd.DataFrame, task: ShardTask, decisions: pd.DataFrame) -> pd.DataFrame:
        ids = rows[task.id_col]
        positions = pd.Index(decisions[task.id_col]).get_indexer(ids) if len(decisions) else np.full(len(rows), -1)
        columns = {
            self.keep_column: (KEEP, BOOL),
            self.duplicate_of_column: (DUPLICATE_OF, ids.dtype),
            self.duplicate_of_shard_column: (DUPLICATE_OF_SHARD, STRING),
            self.similarity_column: (SIMILARITY, FLOAT64),
        }
        joined = {
            name: pd.Series(decisions[column].array.take(positions, allow_fill=True), index=rows.index).astype(dtype)
            for name, (column, dtype) in columns.items()
        }
        joined[self.keep_column] = joined[self.keep_column].fillna(True)
        return rows.assign(**joined)
