"""A dataset's review as one self-contained HTML file: overview, the largest duplicate groups, decontamination's
matches, a histogram of each score column (a recorded threshold marked), the rows each side of each decision's
boundary (a top fraction's, an image-based filter's: ``review.recorded_decisions``) and the rows without an
embedding, thumbnails inline (base64), no script and no link to fetch.

Its size is bounded by the thumbnails it holds: at most ``groups * (1 + removed_per_group)`` for the duplicates,
``2 * matches`` for decontamination's matches (each training image beside the evaluation image it matched, lowest
similarity first), ``2 * per_side`` per decision and ``reasons * per_reason`` for the failures, each at most
``max_side`` px (2-11 KB as base64 at 128 px for the test photos): with the defaults and no decision at most 200
thumbnails, under 2.5 MB.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from dask_clip.dataset.review import (
    CONTAMINATION_COLUMNS,
    DEDUP_COLUMNS,
    ERRORS,
    STEM,
    contamination_matches,
    decision_boundary,
    duplicate_groups,
    is_float,
    recorded_decisions,
    shard_rows,
    show,
)
from dask_clip.errors import UsageError
from dask_clip.images.thumbnails import ThumbnailCache
from dask_clip.io.atomic import atomic_write
from dask_clip.provenance import describe_operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

BINS = 30
GENERATOR = '<meta name="generator" content="dask_clip report">'
"""Marks a file this module wrote: only such a file is replaced, and only with ``overwrite``."""
STYLE = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left}"


def write_report(
    dataset: ImageTextPairDataset,
    path: str | Path,
    *,
    groups: int = 10,
    removed_per_group: int = 7,
    matches: int = 20,
    reasons: int = 10,
    per_reason: int = 8,
    per_side: int = 6,
    max_side: int = 128,
    cache: ThumbnailCache | None = None,
    overwrite: bool = False,
) -> int:
    """Write the report of ``dataset`` to ``path`` (a local file); returns its size in bytes. An existing file is
    replaced only with ``overwrite`` and only when it is a report this function wrote (``UsageError`` otherwise),
    checked before any work; the file appears whole or not at all."""
    _check_replaceable(Path(path), overwrite)
    score_columns = [
        column
        for column, dtype in dataset.meta.dtypes.items()
        if column not in (dataset.id_col, "image_offset", "image_size") and is_float(dtype)
    ]
    error_column = next((column for column in ERRORS if column in dataset.meta.columns), None)
    decisions = recorded_decisions(dataset)
    decided = [d.column for d in decisions] + [d.score for d in decisions if d.score not in score_columns]
    errors = [error_column] if error_column else []
    rows = shard_rows(dataset, [dataset.id_col, *score_columns, *dict.fromkeys(decided), *errors])
    sections = [_overview(dataset, rows, error_column)]
    if all(column in dataset.meta.columns for column in DEDUP_COLUMNS):
        found = duplicate_groups(dataset, groups, max_removed=removed_per_group, max_side=max_side, cache=cache)
        sections.append(f"<h2>Largest duplicate groups</h2>{found._repr_html_()}")
    if all(column in dataset.meta.columns for column in CONTAMINATION_COLUMNS):
        matched = contamination_matches(dataset, matches, max_side=max_side, cache=cache)
        sections.append(f"<h2>Evaluation-set matches (decontamination)</h2>{matched._repr_html_()}")
    thresholds = {d.score: d.threshold for d in decisions if d.threshold is not None}
    histograms = (_histogram(column, rows[column], thresholds.get(column)) for column in score_columns)
    sections.append("<h2>Scores</h2>" + "".join(histograms))
    if decisions:
        boundaries = (
            decision_boundary(dataset, d.column, per_side, rows=rows, max_side=max_side, cache=cache) for d in decisions
        )
        sections.append("<h2>Decisions at their boundary</h2>" + "".join(b._repr_html_() for b in boundaries))
    if error_column:
        sections.append(_failures(dataset, rows, error_column, reasons, per_reason, max_side, cache))
    title = html.escape(f"dask_clip report: {dataset.path}")
    document = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8">{GENERATOR}<title>{title}</title><style>{STYLE}</style>'
        f"</head><body><h1>{title}</h1>{''.join(sections)}</body></html>"
    ).encode()
    with atomic_write(str(path)) as file:
        file.write(document)
    return len(document)


def _check_replaceable(path: Path, overwrite: bool) -> None:
    """``UsageError`` when ``path`` exists and may not be replaced: without ``overwrite``, or not a report."""
    if not path.exists():
        return
    if not overwrite:
        raise UsageError(f"{path}: exists; pass overwrite=True (--overwrite) to replace a report written before")
    with path.open("rb") as file:
        head = file.read(4096)
    if GENERATOR.encode() not in head:
        raise UsageError(f"{path}: exists and is not a dask_clip report; it is never replaced: write elsewhere")


def _overview(dataset: ImageTextPairDataset, rows: pd.DataFrame, error_column: str | None) -> str:
    recorded = "".join(
        f"<tr><td>{html.escape(str(column))}</td>"
        f"<td>{html.escape(describe_operation(dataset.operation_config(column) or {}))}</td></tr>"
        for column in dataset.provenance
    )
    reasons = rows[error_column].dropna().value_counts() if error_column else pd.Series(dtype="int64")
    counted = f", {int(reasons.sum())} with a reason in {html.escape(error_column)}" if error_column else ""
    failures = "".join(f"<tr><td>{html.escape(str(r))}</td><td>{n}</td></tr>" for r, n in reasons.items())
    return (
        f"<h2>Overview</h2><p>{len(dataset.shards)} shards, {len(rows)} rows{counted}</p>"
        f"<table><tr><th>column</th><th>recorded provenance</th></tr>{recorded}</table>"
        f"<table><tr><th>reason</th><th>rows</th></tr>{failures}</table>"
    )


def _histogram(
    column: str, values: pd.Series, threshold: float | None = None, width: int = 360, height: int = 120
) -> str:
    """An inline SVG histogram of ``values`` (nulls and non-finite values left out), ``threshold`` (a decision's,
    when one was recorded on them) marked by a red line."""
    finite = values.astype("float64").to_numpy(na_value=np.nan)
    finite = finite[np.isfinite(finite)]
    if not len(finite):
        return f"<h3>{html.escape(column)}</h3><p>no values</p>"
    counts, edges = np.histogram(finite, bins=BINS)
    bar = width / BINS
    bars = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * c / counts.max():.1f}" width="{bar - 1:.1f}" '
        f'height="{height * c / counts.max():.1f}" fill="#4a7"><title>{edges[i]:.4g}-{edges[i + 1]:.4g}: {c}</title>'
        "</rect>"
        for i, c in enumerate(counts)
    )
    if threshold is not None:
        x = width * (threshold - edges[0]) / ((edges[-1] - edges[0]) or 1)
        bars += (
            f'<line class="threshold" x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{height}" stroke="#c00" stroke-width="2">'
            f"<title>threshold {threshold:.6g}</title></line>"
        )
    return (
        f'<h3>{html.escape(column)}</h3><svg class="histogram" width="{width}" height="{height + 14}">{bars}'
        f'<text x="0" y="{height + 12}" font-size="10">{edges[0]:.4g}</text>'
        f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">{edges[-1]:.4g}</text></svg>'
        f"<p>{len(finite)} values, median {np.median(finite):.4g}</p>"
    )


def _failures(
    dataset: ImageTextPairDataset,
    rows: pd.DataFrame,
    error_column: str,
    reasons: int,
    per_reason: int,
    max_side: int,
    cache: ThumbnailCache | None,
) -> str:
    failed = rows[rows[error_column].notna()]
    parts = ["<h2>Failures</h2>"]
    for reason, count in failed[error_column].value_counts().head(reasons).items():
        sample = failed[failed[error_column] == reason].head(per_reason)[[dataset.id_col, STEM]]
        grid = show(sample, dataset, [dataset.id_col, STEM], max_side, cache=cache)
        parts.append(f"<h3>{html.escape(str(reason))}: {count} rows</h3>{grid._repr_html_()}")
    return "".join(parts)
