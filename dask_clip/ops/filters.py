"""Threshold filters on a score column: mark rows to keep, never drop them.

Rows stay in every shard (each parquet keeps one row per input row, as the tar pairs with it);
the verdict is a boolean column. Select the kept rows with ``dataset.metadata[dataset.metadata["keep"]]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import pyarrow as pa

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


def keep_by_threshold(
    dataset: "ImageTextPairDataset",
    column: str,
    min: float | None = None,
    max: float | None = None,
    keep_column: str = "keep",
    keep_missing: bool = False,
) -> "ImageTextPairDataset":
    """A new dataset whose ``keep_column`` (``bool``) is False where ``column`` is outside ``[min, max]``.

    Both bounds are inclusive; ``None`` leaves that side open. A null score counts as inside when
    ``keep_missing``, else outside. When ``keep_column`` exists already (a deduplication or another
    filter), the verdicts combine with AND, so filters chain: a row is kept only when every step keeps
    it. Deduplicators replace ``keep_column``: run them before the filters.
    """
    if min is None and max is None:
        raise ValueError("give min=, max= or both")
    meta = dataset.pandas_metadata._meta
    if column not in meta.columns:
        raise KeyError(f"no column {column!r} to filter on; the columns are {list(meta.columns)}")
    if not pd.api.types.is_numeric_dtype(meta[column].dtype):
        raise TypeError(f"column {column!r} is {meta[column].dtype}, not a numeric score")

    def mark(rows: pd.DataFrame) -> pd.DataFrame:
        scores = rows[column].astype("float64")
        inside = pd.Series(True, index=rows.index)
        if min is not None:
            inside &= scores >= min
        if max is not None:
            inside &= scores <= max
        inside = inside.where(scores.notna(), keep_missing).astype(bool)
        if keep_column in rows.columns:
            inside &= rows[keep_column].fillna(True).astype(bool)
        return rows.assign(**{keep_column: pd.Series(inside.to_numpy(), index=rows.index, dtype=pd.ArrowDtype(pa.bool_()))})

    output_meta = meta.assign(**{keep_column: pd.Series([], dtype=pd.ArrowDtype(pa.bool_()))})
    metadata = dataset.pandas_metadata.map_partitions(mark, meta=output_meta, enforce_metadata=False)
    config = {
        "function": "keep_by_threshold", "column": column, "min": min, "max": max, "keep_missing": keep_missing,
        "after": dataset.derived_columns.get(keep_column),
    }
    return dataset.with_metadata(metadata, derived_columns={keep_column: config})
