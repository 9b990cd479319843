"""Fraction filters: mark the top (or bottom) share of rows by a score, ranked over every shard.

``keep_top_fraction`` finds the global threshold exactly. When it is applied, one pass over the score column
brings each scored row's score, id and shard position to the client (about 20 bytes a row plus the id), where
the threshold is found by selection (``numpy.partition``) and only the rows tied with it are sorted. Above
``MAX_EXACT_ROWS`` rows it refuses rather than approximate: no sketch mode is built yet.

The rows are ranked by score, then by id, then by shard stem (ids are unique within a shard, so this is a total
order), so exactly ``ceil(fraction * n)`` of the ``n`` rows with a score are kept, whatever the shards' number or
order. The threshold and the last row kept at it become part of the operation's configuration (``fitted``), which
provenance records: a re-run over other data ranks every shard again and records another configuration.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.arguments import share
from dask_clip.columns import BOOL, empty_column
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import ShardTask, compute, compute_in_batches, failures_named
from dask_clip.io.shards import filesystem_of
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

MAX_EXACT_ROWS = 50_000_000
"""The most rows (scored or not, by the shards' parquet footers) an exact fit ranks on the client."""

SCORE, ID, SHARD = "_dask_clip_score", "_dask_clip_id", "_dask_clip_shard"
"""The columns of the rows a fit collects: score (``float64``), id (the id column's type), shard position."""


@dataclass(frozen=True)
class Cut:
    """Where a fraction of the scored rows ends: rows ranked before it (better score, or equal score and a smaller
    ``(id, shard stem)``) are kept, the row at ``(threshold, last_id, last_shard)`` included. ``threshold`` is
    None when no row is kept (no row has a score)."""

    threshold: float | None
    last_id: Any
    last_shard: str | None
    scored_rows: int
    kept_rows: int

    def recorded(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "last_tied_id": self.last_id,
            "last_tied_shard": self.last_shard,
            "scored_rows": self.scored_rows,
            "kept_rows": self.kept_rows,
        }


class TopFractionFilter(Operation):
    """Sets ``keep_column`` (``bool``) to True for the ``fraction`` of rows with a score that rank first by
    ``column`` (largest scores first, or smallest with ``largest=False``), over every shard.

    Exactly ``ceil(fraction * n)`` of the ``n`` rows with a score are True (``fraction`` taken as the decimal it
    is written as: 0.3 of 10 rows is 3); ties at the threshold go to the smaller id, then the shard whose stem
    sorts first. A null (or NaN) score is True when ``keep_missing``, else False, and is not counted in ``n``.
    The column is this step's own decision: one of its name is replaced, never combined with (combine decisions
    yourself: ``combine_decisions``). Applying it ranks the scores at once (``fitted``: it computes ``column`` when
    it is not saved yet); ``UsageError`` above ``MAX_EXACT_ROWS`` rows. ``cut`` is what ``fitted`` found (None:
    found when the filter is applied).
    """

    function_name = "keep_top_fraction"
    cross_shard = True

    def __init__(
        self,
        column: str,
        fraction: float,
        *,
        largest: bool = True,
        keep_missing: bool = False,
        keep_column: str = "keep_top_fraction",
        cut: Cut | None = None,
    ) -> None:
        self.column = column
        self.fraction = share("fraction", fraction)
        self.largest = bool(largest)
        self.keep_missing = bool(keep_missing)
        self.keep_column = keep_column
        self.cut = cut

    def config(self) -> dict[str, Any]:
        found = self.cut.recorded() if self.cut is not None else {}
        return {
            "column": self.column,
            "fraction": self.fraction,
            "largest": self.largest,
            "keep_missing": self.keep_missing,
            **found,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        dtype = dataset.meta[self.column].dtype
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            raise ColumnError(f"column {self.column!r} is {dtype}, not a numeric score")

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.keep_column: empty_column(BOOL)}

    def fitted(self, dataset: ImageTextPairDataset) -> TopFractionFilter:
        """This filter with the ``Cut`` of ``dataset``'s scores: one pass over the score column, ranked here."""
        rows = sum(compute_in_batches(_parquet_rows, [shard.parquet_url for shard in dataset.shards]))
        if rows > MAX_EXACT_ROWS:
            raise UsageError(
                f"keep_top_fraction ranks at most {MAX_EXACT_ROWS:,} rows exactly, and {dataset.path} has {rows:,}; "
                "no approximate (sketch) mode is built yet: filter by an absolute threshold (keep_by_threshold), "
                "or rank a part of the dataset at a time"
            )
        meta = pd.DataFrame(
            {SCORE: empty_column("float64"), ID: dataset.meta[dataset.id_col], SHARD: empty_column("int64")}
        )
        scored = compute(dataset.map_shards(_scored_rows, meta, label=f"{self.label}-rank", column=self.column))
        stems = [shard.stem for shard in dataset.shards]
        cut = find_cut(scored, self.fraction, self.largest, stems)
        fitted = copy.copy(self)
        fitted.cut = cut
        return fitted

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        if self.cut is None:
            raise RuntimeError("TopFractionFilter applied before it was fitted: apply it to the dataset")
        scores = rows[self.column].astype("float64").to_numpy(dtype="float64", na_value=np.nan)
        present = ~np.isnan(scores)
        keep = np.zeros(len(rows), dtype=bool)
        if self.cut.threshold is not None:
            threshold = self.cut.threshold
            beats = scores > threshold if self.largest else scores < threshold
            ids = rows[task.id_col]
            earlier = (ids < self.cut.last_id) | ((ids == self.cut.last_id) & (task.shard.stem <= self.cut.last_shard))
            keep = beats | ((scores == threshold) & np.asarray(earlier.fillna(False), dtype=bool))
        keep = np.where(present, keep, self.keep_missing)
        return {self.keep_column: pd.array(keep, dtype=BOOL)}


def find_cut(scored: pd.DataFrame, fraction: float, largest: bool, stems: list[str]) -> Cut:
    """The ``Cut`` keeping ``ceil(fraction * n)`` of the ``n`` rows of ``scored`` (``SCORE`` float64 without NaN,
    ``ID``, ``SHARD`` positions into ``stems``), largest or smallest scores first, ties by id then stem."""
    n = len(scored)
    k = math.ceil(Fraction(str(fraction)) * n)  # the decimal as written: 0.1 of 10 rows is 1, not 2
    if k == 0:
        return Cut(None, None, None, n, 0)
    scores = scored[SCORE].to_numpy(dtype="float64")
    ranked = scores if not largest else -scores  # ascending rank order either way
    threshold = float(np.partition(ranked, k - 1)[k - 1])
    before = int(np.count_nonzero(ranked < threshold))  # rows ranked before every tied row, all kept
    stem_rank = np.argsort(np.argsort(np.asarray(stems, dtype=object)))  # shard position -> rank of its stem
    tied = scored[ranked == threshold]
    tied = tied.assign(_stem_rank=stem_rank[tied[SHARD].to_numpy(dtype="int64")])
    last = tied.sort_values([ID, "_stem_rank"], kind="stable").iloc[k - before - 1]
    last_id = last[ID].item() if isinstance(last[ID], np.generic) else last[ID]
    found = (-threshold if largest else threshold) + 0.0  # never -0.0
    return Cut(found, last_id, stems[int(last[SHARD])], n, k)


def _scored_rows(rows: pd.DataFrame, task: ShardTask, column: str) -> pd.DataFrame:
    """The score, id and shard position of one shard's rows with a (non-NaN) score."""
    scores = rows[column].astype("float64").to_numpy(dtype="float64", na_value=np.nan)
    present = ~np.isnan(scores)
    return pd.DataFrame(
        {
            SCORE: scores[present],
            ID: rows[task.id_col].array[present],
            SHARD: np.full(int(present.sum()), task.shard.index, dtype="int64"),
        }
    )


def _parquet_rows(url: str) -> int:
    """The rows the parquet at ``url`` holds, from its footer."""
    with failures_named(url):
        fs, path = filesystem_of(url)
        with fs.open(path, "rb") as file:
            return pq.ParquetFile(file).metadata.num_rows


def keep_top_fraction(
    dataset: ImageTextPairDataset,
    column: str,
    fraction: float,
    largest: bool = True,
    keep_missing: bool = False,
    keep_column: str = "keep_top_fraction",
) -> ImageTextPairDataset:
    """A new dataset whose ``keep_column`` is True for the ``fraction`` of scored rows ranking first by ``column``
    (``TopFractionFilter``: its threshold is found now, over every shard)."""
    operation = TopFractionFilter(column, fraction, largest=largest, keep_missing=keep_missing, keep_column=keep_column)
    return operation(dataset)
