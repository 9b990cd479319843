"""Threshold filters on a score column: mark rows to keep, never drop them.

Rows stay in every shard (each parquet keeps one row per input row, as the tar pairs with it);
the verdict is a boolean column, ``keep_by_threshold`` unless named. Select the kept rows with
``dataset.metadata[dataset.metadata["keep_by_threshold"]]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.columns import BOOL, empty_column
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import ShardTask
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

OWN_COLUMN = "keep_by_threshold"
"""The column a threshold filter writes its verdict to unless told another."""


class ThresholdFilter(Operation):
    """Sets ``keep_column`` (``bool``) to False where ``column`` is outside ``[min, max]``.

    Both bounds are inclusive; ``None`` leaves that side open. A null score counts as inside when
    ``keep_missing``, else outside. By default the verdict is this step's own column, ``keep_by_threshold``
    (replaced by a re-run, never combined). A ``keep_column`` you name that exists already (``"keep"`` of a
    deduplication, or another filter's) is combined with AND, so filters chain: a row is kept only when every
    step keeps it. Deduplicators replace their ``keep_column``: run them before the filters.
    """

    function_name = "keep_by_threshold"

    def __init__(
        self,
        column: str,
        *,
        min: float | None = None,
        max: float | None = None,
        keep_column: str | None = None,
        keep_missing: bool = False,
    ) -> None:
        if min is None and max is None:
            raise UsageError("give min=, max= or both")
        self.column = column
        self.min = min
        self.max = max
        self.keep_column = keep_column or OWN_COLUMN
        self.chains = keep_column is not None
        self.keep_missing = keep_missing

    def config(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "min": self.min,
            "max": self.max,
            "keep_missing": self.keep_missing,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.column] + ([self.keep_column] if self._combines(dataset.meta.columns) else [])

    def _combines(self, columns: pd.Index) -> bool:
        """Whether the verdict is ANDed with an existing column: one the user named, not this step's own."""
        return self.chains and self.keep_column in columns

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        dtype = dataset.meta[self.column].dtype
        if not pd.api.types.is_numeric_dtype(dtype):
            raise ColumnError(f"column {self.column!r} is {dtype}, not a numeric score")

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.keep_column: empty_column(BOOL)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        scores = rows[self.column].astype("float64")
        inside = pd.Series(True, index=rows.index)
        if self.min is not None:
            inside &= scores >= self.min
        if self.max is not None:
            inside &= scores <= self.max
        inside = inside.where(scores.notna(), self.keep_missing).astype(bool)
        if self._combines(rows.columns):
            inside &= rows[self.keep_column].fillna(True).astype(bool)
        return {self.keep_column: pd.array(np.asarray(inside, dtype=bool), dtype=BOOL)}


def keep_by_threshold(
    dataset: ImageTextPairDataset,
    column: str,
    min: float | None = None,
    max: float | None = None,
    keep_column: str | None = None,
    keep_missing: bool = False,
) -> ImageTextPairDataset:
    """A new dataset whose ``keep_column`` (``keep_by_threshold`` unless named; a named one that exists is ANDed
    with) is False where ``column`` is outside ``[min, max]`` (``ThresholdFilter``)."""
    return ThresholdFilter(column, min=min, max=max, keep_column=keep_column, keep_missing=keep_missing)(dataset)
