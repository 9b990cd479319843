"""What the deduplicators share: the three decision columns they write, and deciding across shards from
saved columns only as dask_clip wrote them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from dask_clip.columns import BOOL, FLOAT64, STRING, empty_column
from dask_clip.execution import ShardTask, map_shards
from dask_clip.io.metadata import check_stored_contents
from dask_clip.io.provenance import Stored
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

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """As ``Operation``'s, but each shard's saved columns it reads are first checked against the content
        digests their file records: a decision over every shard is never made from a file edited since."""
        stored = [c for c in self.input_columns(dataset) if isinstance(dataset.provenance.get(c), Stored)]
        if stored:
            checked = map_shards(
                _checked_rows,
                dataset.pandas_metadata,
                dataset.shards,
                dataset.meta,
                id_col=dataset.id_col,
                label=f"{self.name}-check-contents",
                columns=stored,
            )
            dataset = dataset.with_metadata(checked)
        return super().__call__(dataset)


def _checked_rows(rows: pd.DataFrame, task: ShardTask, columns: list[str]) -> pd.DataFrame:
    """One shard's ``rows``, unchanged, once ``columns`` are found to hold what their file's footer records."""
    check_stored_contents(rows, columns, task.shard.parquet_url)
    return rows
