"""What the app shows, read once at startup: a dataset's metadata in one pandas frame (vector columns left out),
its shards by stem, and the provenance of its derived columns; the views of the pages, computed from them.

Every view returns plain lists and dicts (JSON as it is sent); rows are ``{"stem", "key", "caption", ...}``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.dataset import ImageTextPairDataset
from dask_clip.dataset.review import Decision, boundary_rows, recorded_decisions
from dask_clip.execution import compute
from dask_clip.io.shards import Shard
from dask_clip.provenance import describe_operation
from dask_clip.serve.images import ImageLocator

EMBEDDING_COLUMN = "image_embedding"
HAS_EMBEDDING = "_has_embedding"
NO_REASON = "(no reason recorded)"
DEDUP_COLUMNS = ("keep", "duplicate_of", "duplicate_of_shard", "similarity")
CHAIN_LIMIT = 64
"""Links followed from a removed row to the kept row of its group (a removed row may name another removed one)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Catalog:
    """A dataset as the app shows it: ``frame`` (one row per sample; ``stem`` of its shard; ``HAS_EMBEDDING``),
    ``shards`` by stem, ``columns`` (``dataset.info()``'s rows as dicts), the reason column, if any,
    ``positions``: each shard's row keys -> their positions in ``frame``, and ``images``: where each row's image
    lies in its tar."""

    dataset: ImageTextPairDataset
    frame: pd.DataFrame
    shards: dict[str, Shard]
    columns: list[dict[str, Any]]
    reason_column: str | None
    positions: dict[str, dict[str, int]]
    images: ImageLocator

    @classmethod
    def load(cls, dataset: ImageTextPairDataset) -> Catalog:
        """Read every shard's metadata (on the current Dask client, else threads) into memory, without vectors."""
        meta = dataset.meta
        vectors = [column for column in meta.columns if _is_vector(meta[column])]
        metadata = dataset.pandas_metadata
        if EMBEDDING_COLUMN in meta.columns:
            metadata = metadata.assign(**{HAS_EMBEDDING: ~metadata[EMBEDDING_COLUMN].isna()})
        else:
            metadata = metadata.assign(**{HAS_EMBEDDING: False})
        parts = [
            metadata.partitions[i][[c for c in metadata.columns if c not in vectors]]
            for i in range(len(dataset.shards))
        ]
        loaded = compute(parts)
        frame = pd.concat(
            [part.assign(stem=shard.stem) for part, shard in zip(loaded, dataset.shards, strict=True)],
            ignore_index=True,
        )
        frame["key"] = frame[dataset.id_col].astype(str)
        info = dataset.info()
        columns = [
            {**row, "operation": describe_operation(row["operation"]), "stems": list(row["stems"])}
            for row in info.to_dict("records")
        ]
        reason = dataset.reason_column(EMBEDDING_COLUMN) if EMBEDDING_COLUMN in meta.columns else None
        shards = {shard.stem: shard for shard in dataset.shards}
        positions: dict[str, dict[str, int]] = {stem: {} for stem in shards}
        for position, (stem, key) in enumerate(zip(frame["stem"], frame["key"], strict=True)):
            positions[stem].setdefault(key, position)
        return cls(dataset, frame, shards, columns, reason, positions, ImageLocator(shards, frame))

    # --- lookups -----------------------------------------------------------------------------------------
    def position(self, stem: str, key: str) -> int | None:
        """The position in ``frame`` of row ``key`` of shard ``stem``; None when the dataset holds no such row."""
        return self.positions.get(stem, {}).get(key)

    def found_rows(self, stems: Iterable[str], keys: Iterable[str]) -> pd.DataFrame:
        """The rows of ``frame`` at these shards' stems and keys, in their order (by position: no join over the
        whole frame). ``KeyError`` for a row the dataset does not hold."""
        return self.frame.iloc[[self.positions[stem][key] for stem, key in zip(stems, keys, strict=True)]]

    def rows(self, frame: pd.DataFrame) -> list[dict[str, Any]]:
        """``frame``'s rows as the pages show a sample: stem, key, caption, and the thumbnail's address."""
        caption = frame["caption"] if "caption" in frame.columns else pd.Series([None] * len(frame), index=frame.index)
        return [
            {
                "stem": stem,
                "key": key,
                "caption": None if pd.isna(text) else str(text),
                "thumbnail": f"/thumb/{stem}/{key}",
            }
            for stem, key, text in zip(frame["stem"], frame["key"], caption, strict=True)
        ]

    # --- pages -------------------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        """Shards, rows, columns with their provenance, and rows without an embedding counted by reason."""
        return {
            "path": self.dataset.path,
            "shards": len(self.shards),
            "rows": len(self.frame),
            "id_column": self.dataset.id_col,
            "columns": [{"name": name, "dtype": str(dtype)} for name, dtype in self.dataset.meta.dtypes.items()],
            "derived_columns": self.columns,
            "without_embedding": self.failure_counts(),
            "image_locations": self.images.summary(),
        }

    def failure_counts(self) -> dict[str, int]:
        """Rows without an embedding, by reason, most frequent first."""
        return {reason: int(count) for reason, count in self._failure_reasons().value_counts().items()}

    def failures(self, per_reason: int) -> list[dict[str, Any]]:
        """Rows without an embedding grouped by reason (most frequent first), up to ``per_reason`` rows each."""
        reasons = self._failure_reasons()
        groups = []
        for reason, count in reasons.value_counts().items():
            rows = self.rows(self.frame.loc[reasons.index[reasons == reason][:per_reason]])
            for row in rows:
                position = self.positions[row["stem"]][row["key"]]
                row["has_image"] = self.images.location(row["stem"], row["key"], position) is not None
            groups.append({"reason": reason, "count": int(count), "rows": rows})
        return groups

    def _failure_reasons(self) -> pd.Series:
        failed = self.frame[~self.frame[HAS_EMBEDDING].astype(bool)]
        if self.reason_column is None or self.reason_column not in failed.columns:
            return pd.Series(NO_REASON, index=failed.index, dtype=object)
        return failed[self.reason_column].astype(object).where(failed[self.reason_column].notna(), NO_REASON)

    def score_columns(self) -> list[str]:
        """The derived floating-point columns (aesthetic and NSFW scores, CLIP score, dedup similarity)."""
        derived = set(self.dataset.provenance)
        return [c for c in self.frame.columns if c in derived and pd.api.types.is_float_dtype(self.frame[c].dtype)]

    def scores(self, bins: int, quantiles: list[float], per_side: int) -> list[dict[str, Any]]:
        """For each score column: its histogram (``bins`` equal bins over its range), at each quantile the row
        whose value is nearest to it, and the decisions made on it (``decision``: a top fraction's, an image-based
        filter's), each with its threshold and ``per_side`` rows each side of its boundary."""
        views = []
        decisions = recorded_decisions(self.dataset)
        for column in self.score_columns():
            values = self.frame[column].astype("float64")
            present = values[np.isfinite(values.to_numpy(na_value=np.nan))]
            counts, edges = np.histogram(present.to_numpy(), bins=bins) if len(present) else (np.zeros(0), np.zeros(0))
            at_quantiles = []
            for q in quantiles if len(present) else ():
                value = float(present.quantile(q))
                nearest = (present - value).abs().idxmin()
                at_quantiles.append({"quantile": q, "value": value, "row": self.rows(self.frame.loc[[nearest]])[0]})
            views.append(
                {
                    "column": column,
                    "count": len(present),
                    "missing": len(values) - len(present),
                    "counts": [int(c) for c in counts],
                    "edges": [float(e) for e in edges],
                    "quantiles": at_quantiles,
                    "decisions": [self.decision(d, per_side) for d in decisions if d.score == column],
                }
            )
        return views

    def decision(self, decision: Decision, per_side: int) -> dict[str, Any]:
        """A decision on a score column: its column, summary, threshold (None: it has none) and side, with the
        ``per_side`` kept rows ranked last (``kept``, the last nearest the boundary) and the ``per_side`` rows not
        kept ranked first (``dropped``), each with its ``score``."""
        kept, dropped = (
            [{**row, "score": float(score)} for row, score in zip(self.rows(side), side[decision.score], strict=True)]
            for side in boundary_rows(self.frame, decision, self.dataset.id_col, per_side)
        )
        return {
            "column": decision.column,
            "summary": decision.summary,
            "threshold": decision.threshold,
            "largest": decision.largest,
            "kept": kept,
            "dropped": dropped,
        }

    def has_dedup_columns(self) -> bool:
        return all(column in self.frame.columns for column in DEDUP_COLUMNS)

    def duplicate_groups(self, sort: str, min_similarity: float | None) -> list[dict[str, Any]]:
        """The groups dedup made: each kept row with the rows removed as its duplicates (followed through chains
        of removed rows) and their similarity. ``min_similarity`` keeps the removed rows at or above it only
        (a smaller ``eps``: ``1 - eps``). ``sort``: ``"size"`` (largest first) or ``"similarity"`` (lowest first)."""
        frame = self.frame
        removed = frame[~frame["keep"].astype("boolean").fillna(True).astype(bool)]
        if min_similarity is not None:
            removed = removed[removed["similarity"].astype("float64") >= min_similarity]
        rows = zip(frame["stem"], frame["key"], strict=True)
        target = dict(zip(rows, zip(frame["duplicate_of_shard"], frame["duplicate_of"], strict=True), strict=True))
        groups: dict[tuple[str, str], list[int]] = {}
        for position, stem, key in zip(removed.index, removed["stem"], removed["key"], strict=True):
            groups.setdefault(_root(target, (stem, key)), []).append(position)
        by_key = frame.set_index(["stem", "key"]).index
        views = []
        for (stem, key), members in groups.items():
            kept = frame.iloc[by_key.get_loc((stem, key))] if (stem, key) in by_key else None
            removed_rows = [
                {**row, "similarity": float(similarity)}
                for row, similarity in zip(self.rows(frame.loc[members]), frame.loc[members, "similarity"], strict=True)
            ]
            views.append(
                {
                    "kept": self.rows(kept.to_frame().T)[0] if kept is not None else {"stem": stem, "key": key},
                    "removed": sorted(removed_rows, key=lambda row: -row["similarity"]),
                    "size": 1 + len(members),
                    "min_similarity": min(row["similarity"] for row in removed_rows),
                }
            )
        if sort == "size":
            views.sort(key=lambda group: (-group["size"], group["min_similarity"]))
        else:
            views.sort(key=lambda group: (group["min_similarity"], -group["size"]))
        return views

    def dedup_operation(self) -> dict[str, Any] | None:
        """The recorded configuration of the deduplication (``eps`` among its options), if any."""
        return self.dataset.operation_config("keep")


def _root(target: dict[tuple[str, str], tuple[Any, Any]], row: tuple[str, str]) -> tuple[str, str]:
    """The row that ``row``'s chain of duplicate-of links ends at (a kept row, or the last one within the limit)."""
    for _ in range(CHAIN_LIMIT):
        shard, key = target.get(row, (None, None))
        if shard is None or pd.isna(shard) or key is None or pd.isna(key):
            return row
        row = (str(shard), str(key))
    return row


def _is_vector(column: pd.Series) -> bool:
    """Whether ``column`` holds vectors (lists of floats, or binary-packed ones): left out of the app's frame."""
    dtype = column.dtype
    arrow = dtype.pyarrow_dtype if isinstance(dtype, pd.ArrowDtype) else None
    if arrow is None:
        return False
    return pa.types.is_list(arrow) or pa.types.is_large_list(arrow) or pa.types.is_fixed_size_list(arrow)
