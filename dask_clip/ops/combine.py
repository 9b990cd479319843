"""Combine decisions: a row is kept when every decision column keeps it (``keep = a & b``).

Each curation step writes its own decision column (the deduplicators ``keep``, ``keep_by_threshold``,
``keep_top_fraction``), so every decision stays visible; this step ANDs those named into one column, with
provenance that names what it combined, for ``to_webdataset(filter_column=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.columns import BOOL, empty_column
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import ShardTask
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


class CombineDecisions(Operation):
    """Sets ``keep_column`` (``bool``) to True where every one of ``columns`` (boolean decisions) is True; a null
    decision counts as False, as ``to_webdataset`` counts it."""

    function_name = "combine_decisions"

    def __init__(self, columns: Sequence[str], *, keep_column: str = "curated") -> None:
        if isinstance(columns, str) or not columns:
            raise UsageError(f"columns must be a list of decision columns to combine, not {columns!r}")
        if keep_column in columns:
            raise UsageError(f"keep_column {keep_column!r} is one of the decisions combined: name another column")
        self.columns = list(columns)
        self.keep_column = keep_column

    def config(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return self.columns

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        for column in self.columns:
            dtype = dataset.meta[column].dtype
            if not pd.api.types.is_bool_dtype(dtype):
                raise ColumnError(f"column {column!r} is {dtype}, not a boolean decision")

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.keep_column: empty_column(BOOL)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        kept = np.ones(len(rows), dtype=bool)
        for column in self.columns:
            kept &= np.asarray(rows[column].astype("boolean").fillna(False), dtype=bool)
        return {self.keep_column: pd.array(kept, dtype=BOOL)}


def combine_decisions(
    dataset: ImageTextPairDataset, columns: Sequence[str], keep_column: str = "curated"
) -> ImageTextPairDataset:
    """A new dataset whose ``keep_column`` is True where every decision in ``columns`` keeps the row
    (``CombineDecisions``)."""
    return CombineDecisions(columns, keep_column=keep_column)(dataset)
