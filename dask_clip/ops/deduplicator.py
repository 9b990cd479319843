"""What the deduplicators share: the decision columns they write."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from dask_clip.columns import BOOL, FLOAT64, STRING, empty_column
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


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
