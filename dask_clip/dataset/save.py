"""Save a dataset's metadata: one parquet per shard, each recording the provenance of its derived columns,
skipping shards whose file already holds exactly what this run would write (``dataset.plan``)."""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from dask_clip.arguments import one_of
from dask_clip.dataset.plan import plan_save
from dask_clip.errors import ColumnError, DaskClipError, ShardError, UsageError
from dask_clip.execution import STAGES, ShardTask, compute_in_batches, compute_per_shard, stage_timings
from dask_clip.io.locks import LOCK_NAME, writer_lock
from dask_clip.io.metadata import read_parquet_schema, rows_with_reasons, shard_identity, write_shard_metadata
from dask_clip.io.shards import filesystem_of, resolved_url
from dask_clip.io.vectors import DEFAULT_LAYOUT, LAYOUTS, check_writable, is_vector_type
from dask_clip.provenance import METADATA_KEY, Computed, FileRecords, Stored

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

SUMMARY_META = pd.DataFrame(
    {"stem": [""], "path": [""], "rows": [0], "errors": [0], "written": [True], **{c: [0.0] for c in STAGES}}
).iloc[:0]


def save_metadata(
    dataset: ImageTextPairDataset,
    path: str | None = None,
    columns: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool = False,
    vector_layout: str = DEFAULT_LAYOUT,
) -> pd.DataFrame:
    """Compute and write one parquet per shard, named like the shard (``00042.parquet``).

    Files go next to the shards (replacing the input parquet) or into ``path``; each appears atomically
    and records, for every derived column, the configuration and the inputs that produced it.
    ``columns`` limits the columns written: into ``path``, to those columns, the columns holding their
    reasons and the id column; in place, every column that came with the shards is kept too (an in-place
    save never loses an input column).

    Re-runs resume: a shard whose file already holds these columns, for the same rows, each recorded
    as produced by what this run would produce and complete (a value, or a reason where the column
    records reasons), is skipped without being computed; a column that decides across shards is
    finished in every shard or in none. ``overwrite=True`` recomputes and rewrites every shard.

    ``vector_layout`` is how the files hold embedding columns (``io.vectors``): ``"list"`` (``list<float32>``,
    the width in the footer: every common reader opens it, null rows included), ``"fixed_size_list"``
    (``fixed_size_list<float32>[D]``, for LanceDB and Hugging Face ``List(length=D)``; null rows need pyarrow
    26 to read back) or ``"float16"`` (``list<halffloat>``: half the size, values rounded to float16). Each file
    names it in its footer. A layout is not part of a column's provenance: a shard finished in another layout
    stays finished (its file is not rewritten); to convert, save a dataset read from the files with
    ``overwrite=True``, which rewrites them without computing anything.

    ``progress`` shows a bar (shards done, rows per second). The run holds the output folder's lock file
    (``io.locks``) from before it reads the files there until the last is written: ``FolderLockedError`` when
    another run holds it.

    Returns one row per shard: ``stem``, ``path``, ``rows``, ``errors`` (rows with a reason
    instead of a value), ``written`` (False where skipped) and the shard's stage timings in
    seconds (``execution.STAGES``; NaN for stages that did not run).
    """
    one_of("vector_layout", vector_layout, LAYOUTS)
    check_writable(vector_layout)
    in_place = path is None or resolved_url(path) == resolved_url(dataset.path)  # the dataset's folder, however spelled
    output_root = (dataset.path if in_place else path).rstrip("/")
    selected = _columns_to_write(dataset, columns, in_place=in_place)
    urls = [posixpath.join(output_root, f"{shard.stem}.parquet") for shard in dataset.shards]
    with writer_lock(posixpath.join(output_root, LOCK_NAME), "save_metadata"):
        if not in_place:
            _check_no_other_shards(dataset, output_root)
        check_rounding(dataset, selected, vector_layout)
        return _plan_and_write(dataset, output_root, urls, selected, overwrite, progress, vector_layout)


def _check_no_other_shards(dataset: ImageTextPairDataset, output_root: str) -> None:
    """``UsageError`` when folder ``output_root`` holds files this save would replace but dask_clip did not write:
    shards of another dataset (a tar beside a parquet to write: that parquet is the shard's own metadata), or a
    parquet whose footer holds no dask_clip record (a user's file). The footers are read on the cluster."""
    fs, root = filesystem_of(output_root)
    fs.invalidate_cache(root)
    if not fs.isdir(root):
        return
    present = {posixpath.basename(entry.rstrip("/")) for entry in fs.ls(root, detail=False)}
    clashing = [s.stem for s in dataset.shards if {f"{s.stem}.tar", f"{s.stem}.parquet"} <= present]
    if clashing:
        raise UsageError(
            f"{output_root}: holds shards of another dataset: {len(clashing)} of the {len(dataset.shards)} parquets "
            f"to write would replace a shard's own metadata (e.g. {clashing[0]}.parquet beside {clashing[0]}.tar); "
            "save into a folder without shards, or in place (no path) to add the columns to that dataset's own files"
        )
    existing = [
        posixpath.join(output_root, f"{s.stem}.parquet") for s in dataset.shards if f"{s.stem}.parquet" in present
    ]
    foreign = [
        url for url, ours in zip(existing, compute_in_batches(_written_by_dask_clip, existing), strict=True) if not ours
    ]
    if foreign:
        raise UsageError(
            f"{output_root}: holds {len(foreign)} parquets that this save would replace but dask_clip did not write "
            f"(no dask_clip record in their footer), e.g. {foreign[0]}; save into another folder, or move them away"
        )


def _written_by_dask_clip(url: str) -> bool:
    """Whether the parquet footer at ``url`` holds a dask_clip record (False for a file that is no parquet)."""
    try:
        return METADATA_KEY in (read_parquet_schema(url).metadata or {})
    except DaskClipError:
        return False


def check_rounding(dataset: ImageTextPairDataset, columns: Sequence[str], vector_layout: str) -> None:
    """``UsageError`` when ``vector_layout`` is ``"float16"`` (it rounds every vector column written) and another
    column written with them was computed from one of them: its record would name values the file no longer holds,
    and every step that reads it would refuse it. Carried columns are judged by their first shard's record."""
    if vector_layout != "float16":
        return
    rounded = {c for c in columns if _is_vector(dataset.meta[c].dtype)}
    first = FileRecords.from_schema(read_parquet_schema(dataset.shards[0].parquet_url)) if dataset.shards else None
    for column in (c for c in columns if c not in rounded):
        source = dataset.provenance.get(column)
        if isinstance(source, Computed):
            read = set(source.reads)
        elif isinstance(source, Stored) and first is not None:
            read = set((first.columns.get(column) or {}).get("reads") or {})
        else:
            read = set()
        if rounded & read:
            raise UsageError(
                f"vector_layout='float16' would round {sorted(rounded & read)}, from which {column!r} (also written "
                f"by this save) was computed: its record would name values the files no longer hold. Save the "
                f"embeddings in float16 before computing {column!r}, leave {column!r} out (columns=...), or save in "
                "the default layout"
            )


def _is_vector(dtype: object) -> bool:
    return isinstance(dtype, pd.ArrowDtype) and is_vector_type(dtype.pyarrow_dtype)


def _plan_and_write(
    dataset: ImageTextPairDataset,
    output_root: str,
    urls: list[str],
    selected: list[str],
    overwrite: bool,
    progress: bool,
    vector_layout: str,
) -> pd.DataFrame:
    """Plan the save into ``urls``, then write the shards that are not finished -> ``save_metadata``'s summary."""
    plan = plan_save(dataset, urls, selected, overwrite)
    todo = [i for i, finished in enumerate(plan.finished) if not finished]
    skipped = [
        {"stem": dataset.shards[i].stem, "path": urls[i], **plan.summaries[i], "written": False}
        for i, finished in enumerate(plan.finished)
        if finished
    ]
    if skipped:
        logger.info("%d of %d shards already hold what this run would write; skipping them", len(skipped), len(urls))
    frames = [pd.DataFrame(skipped, columns=SUMMARY_META.columns)] if skipped else [SUMMARY_META]
    if todo:
        written = dataset.map_shards(
            _write_shard,
            SUMMARY_META,
            positions=todo,
            payloads=[plan.records[i].to_json().decode() for i in todo],
            label="save-metadata",
            output_root=output_root,
            columns=selected,
            vector_layout=vector_layout,
        )
        frames[0:0] = [compute_per_shard(written, progress)]
    result = pd.concat(frames)
    order = {shard.stem: i for i, shard in enumerate(dataset.shards)}
    result = result.sort_values("stem", key=lambda stems: stems.map(order)).reset_index(drop=True)
    return result.astype(SUMMARY_META.dtypes.to_dict())


def _write_shard(
    rows: pd.DataFrame, task: ShardTask, output_root: str, columns: list[str], vector_layout: str
) -> pd.DataFrame:
    """Write one shard's ``columns`` with its planned records (the task's payload) -> its summary row.

    The rows must be those the plan saw (same count, same ids in order): a file never records inputs
    other than those it was computed from.
    """
    url = posixpath.join(output_root, f"{task.shard.stem}.parquet")
    shard_records = FileRecords.from_json(task.payload)
    identity = shard_identity(rows, task.id_col)
    if identity != shard_records.shard:
        raise ShardError(
            f"{task.shard.parquet_url}: the shard's rows changed while saving ({shard_records.shard} when planned, "
            f"{identity} when written); run the save again"
        )
    output = rows[columns]
    started = time.perf_counter()
    write_shard_metadata(output, url, shard_records, vector_layout)
    timings = {**stage_timings(rows), "write_s": time.perf_counter() - started}
    summary = {
        "stem": task.shard.stem,
        "path": url,
        "rows": len(output),
        "errors": rows_with_reasons(output, shard_records),
    }
    return pd.DataFrame([{**summary, "written": True, **timings}])


def _columns_to_write(dataset: ImageTextPairDataset, columns: Sequence[str] | None, in_place: bool) -> list[str]:
    """The columns to write, in the dataset's order: ``columns``, the columns holding their reasons and the id
    column (all by default), and in place every column that is not derived as well."""
    available = list(dataset.meta.columns)
    if columns is None:
        return available
    unknown = [c for c in columns if c not in available]
    if unknown:
        raise ColumnError(f"unknown columns {unknown}; the dataset has {available}")
    reasons = {dataset.reason_column(c) for c in columns} - {None}  # a value never goes without its reasons
    return [
        c
        for c in available
        if c in columns or c in reasons or c == dataset.id_col or (in_place and c not in dataset.provenance)
    ]
