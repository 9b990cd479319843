"""Save a dataset's metadata: one parquet per shard, skipping shards whose output is already complete."""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import dask
import pandas as pd

from dask_clip.errors import ColumnError
from dask_clip.execution import STAGES, ShardTask, compute, compute_per_shard, map_shards, stage_timings
from dask_clip.io.metadata import count_rows_with_errors, finished_output_summary, write_shard_metadata

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

SUMMARY_META = pd.DataFrame(
    {"stem": [""], "path": [""], "rows": [0], "errors": [0], "written": [True], **{c: [0.0] for c in STAGES}}
).iloc[:0]
RESUME_CHECKS_PER_TASK = 64
"""Output files one task checks when deciding which shards are finished (footers only)."""


def save_metadata(
    dataset: ImageTextPairDataset,
    path: str | None = None,
    columns: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> pd.DataFrame:
    """Compute and write one parquet per shard, named like the shard (``00042.parquet``).

    Files go next to the shards (replacing the input parquet, whose every row and column is kept)
    or into ``path``; each appears atomically. ``columns`` limits the columns written (the id
    column is always kept).

    Re-runs resume: a shard whose file already holds these columns, computed with the same
    configurations, with every row either computed or given a reason, is skipped without being
    computed again. ``overwrite=True`` recomputes and rewrites every shard.

    ``progress`` shows a bar (shards done, rows per second).

    Returns one row per shard: ``stem``, ``path``, ``rows``, ``errors`` (rows with a reason
    instead of a value), ``written`` (False where skipped) and the shard's stage timings in
    seconds (``execution.STAGES``; NaN for stages that did not run).
    """
    output_root = (path or dataset.path).rstrip("/")
    selected = _columns_to_write(dataset, columns)
    derived = {c: cfg for c, cfg in dataset.derived_columns.items() if c in selected}
    info = {"derived_columns": sorted(derived), "configs": derived, "id_col": dataset.id_col}
    urls = [posixpath.join(output_root, f"{shard.stem}.parquet") for shard in dataset.shards]

    finished = _finished_outputs(urls, selected, info) if derived and not overwrite else [None] * len(urls)
    todo = [i for i, status in enumerate(finished) if status is None]
    skipped = [
        {"stem": dataset.shards[i].stem, "path": urls[i], **status, "written": False}
        for i, status in enumerate(finished)
        if status is not None
    ]
    if skipped:
        logger.info("%d of %d shards already hold complete output; skipping them", len(skipped), len(urls))
    frames = [pd.DataFrame(skipped, columns=SUMMARY_META.columns)] if skipped else [SUMMARY_META]
    if todo:
        written = map_shards(
            _write_shard,
            dataset.pandas_metadata.partitions[todo],
            [dataset.shards[i] for i in todo],
            SUMMARY_META,
            id_col=dataset.id_col,
            indices=todo,
            label="save-metadata",
            output_root=output_root,
            columns=selected,
            info=info,
        )
        frames[0:0] = [compute_per_shard(written, dict(dataset.resources), progress)]
    result = pd.concat(frames)
    order = {shard.stem: i for i, shard in enumerate(dataset.shards)}
    result = result.sort_values("stem", key=lambda stems: stems.map(order)).reset_index(drop=True)
    return result.astype(SUMMARY_META.dtypes.to_dict())


def _write_shard(
    rows: pd.DataFrame, task: ShardTask, output_root: str, columns: list[str], info: dict[str, Any]
) -> pd.DataFrame:
    """Write one shard's ``columns`` -> its summary row."""
    url = posixpath.join(output_root, f"{task.shard.stem}.parquet")
    output = rows[columns]
    started = time.perf_counter()
    write_shard_metadata(output, url, info)
    timings = {**stage_timings(rows), "write_s": time.perf_counter() - started}
    summary = {
        "stem": task.shard.stem,
        "path": url,
        "rows": len(output),
        "errors": count_rows_with_errors(output, info),
    }
    return pd.DataFrame([{**summary, "written": True, **timings}])


def _finished_outputs(urls: list[str], columns: list[str], info: dict[str, Any]) -> list[dict[str, int] | None]:
    """Per output file, its ``{"rows", "errors"}`` when it is already complete, else None.

    Read on the cluster (or this process's threads), ``RESUME_CHECKS_PER_TASK`` files a task."""
    chunks = [urls[i : i + RESUME_CHECKS_PER_TASK] for i in range(0, len(urls), RESUME_CHECKS_PER_TASK)]
    checks = [dask.delayed(_check_outputs)(chunk, columns, info) for chunk in chunks]
    return [status for chunk in compute(checks) for status in chunk]


def _check_outputs(urls: list[str], columns: list[str], info: dict[str, Any]) -> list[dict[str, int] | None]:
    return [finished_output_summary(url, columns, info) for url in urls]


def _columns_to_write(dataset: ImageTextPairDataset, columns: Sequence[str] | None) -> list[str]:
    available = list(dataset.metadata.columns)
    if columns is None:
        return available
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise ColumnError(f"unknown columns {unknown}; the dataset has {available}")
    return [dataset.id_col] + [c for c in columns if c != dataset.id_col]
