"""Read and write a shard's metadata parquet.

Every column is read as a pyarrow-backed pandas dtype (``pd.ArrowDtype``): dtypes then do not
depend on whether a shard happens to hold nulls, and Dask's string conversion leaves them alone. An
embedding column is a fixed-size list of float32 in memory, whatever layout its file holds it in
(``io.vectors``: ``list<float32>`` by default, the width in the footer): files of every layout dask_clip
ever wrote read the same, so a dataset half in one layout and half in another is one dataset.

Columns that dask_clip derived (embeddings, error reasons, decisions) are recorded in the parquet's
key-value metadata with their provenance (``provenance``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.errors import ShardMetadataError
from dask_clip.io.atomic import atomic_write
from dask_clip.io.shards import filesystem_of
from dask_clip.io.vectors import DEFAULT_LAYOUT, WidthMismatch, in_memory_schema, recorded_widths, to_disk, to_memory
from dask_clip.provenance import METADATA_KEY, FileRecords, content_digest, ids_digest

logger = logging.getLogger(__name__)


def arrow_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Convert with every column as ``pd.ArrowDtype`` and a fresh ``RangeIndex``."""
    return table.to_pandas(types_mapper=pd.ArrowDtype, ignore_metadata=True)


def read_parquet_schema(url: str) -> pa.Schema:
    """The schema in the footer of the parquet at ``url`` (reads the footer only)."""
    fs, path = filesystem_of(url)
    try:
        with fs.open(path, "rb") as file:
            return pq.read_schema(file)
    except (OSError, pa.ArrowException) as error:
        raise ShardMetadataError(f"{url}: cannot read parquet footer: {error}") from error


def file_widths(schema: pa.Schema) -> dict[str, int]:
    """The width of each vector column of a parquet whose footer has ``schema`` (``io.vectors.recorded_widths``)."""
    return recorded_widths(schema, FileRecords.from_schema(schema).vectors)


def memory_schema(schema: pa.Schema) -> pa.Schema:
    """The schema in memory of a parquet whose footer has ``schema``: vector columns as fixed-size lists."""
    return in_memory_schema(schema, file_widths(schema))


def table_in_memory(table: pa.Table, url: str) -> pa.Table:
    """A table read whole from the parquet ``url`` with its vector columns as in memory (fixed-size lists);
    ``ShardMetadataError`` naming the file when a row does not hold the width its footer records."""
    try:
        return to_memory(table, file_widths(table.schema))
    except WidthMismatch as error:
        raise ShardMetadataError(f"{url}: {error}") from error


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty frame with the dtypes ``read_shard_metadata`` gives for this schema (a Dask meta)."""
    return arrow_to_pandas(memory_schema(schema).empty_table())


def carried_columns(schema: pa.Schema, meta: pd.DataFrame, derived: Iterable[str]) -> set[str]:
    """The derived columns of a file that a dataset whose meta is ``meta`` carries over: present in the file
    with the dataset's type. One of another type (a re-embedding with a wider model, interrupted) is not."""
    schema = memory_schema(schema)
    names = set(schema.names)
    return {
        column
        for column in derived
        if column in names and column in meta.columns and schema.field(column).type == _arrow_type(meta[column])
    }


def _arrow_type(column: pd.Series) -> pa.DataType | None:
    return column.dtype.pyarrow_dtype if isinstance(column.dtype, pd.ArrowDtype) else None


def read_shard_metadata(
    url: str, id_col: str, meta: pd.DataFrame, derived_columns: frozenset[str] = frozenset()
) -> pd.DataFrame:
    """Read one shard's parquet into a frame whose columns and dtypes are exactly ``meta``'s.

    Derived columns (``derived_columns`` of the dataset, and those this file records) may differ from the
    dataset's after an interrupted run or a change of model: one the shard lacks, or holds with another
    type, is filled with nulls; one only this shard has is left out. Any other difference in columns, a
    missing ``id_col``, or null or duplicate ids is a ``ShardMetadataError`` naming the file.
    """
    fs, path = filesystem_of(url)
    try:
        with fs.open(path, "rb") as file:
            table = pq.read_table(file)
    except (OSError, pa.ArrowException) as error:
        raise ShardMetadataError(f"{url}: cannot read parquet: {error}") from error
    table = table_in_memory(table, url)
    check_ids(table, id_col, url)
    derived = set(derived_columns) | set(FileRecords.from_schema(table.schema).columns)
    carried = carried_columns(table.schema, meta, derived)
    stale = [c for c in table.column_names if c in derived and c not in carried]
    if stale:
        logger.info(
            "%s: derived columns %s are not carried over (absent from the dataset or of another type)", url, stale
        )
    frame = arrow_to_pandas(table.drop_columns(stale))
    missing = [c for c in meta.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in meta.columns]
    if extra or any(c not in derived for c in missing):
        raise ShardMetadataError(
            f"{url}: columns differ from the dataset's first shard: "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    for column in missing:
        frame[column] = pd.Series(pd.NA, index=frame.index, dtype=meta[column].dtype)
    try:
        return frame[list(meta.columns)].astype(meta.dtypes.to_dict())
    except (TypeError, ValueError, pa.ArrowException) as error:
        raise ShardMetadataError(f"{url}: column types differ from the dataset's first shard: {error}") from error


def check_ids(table: pa.Table, id_col: str, url: str) -> None:
    """Raise ``ShardMetadataError`` naming ``url`` unless ``id_col`` exists and is unique and non-null."""
    if id_col not in table.column_names:
        raise ShardMetadataError(f"{url}: no id column {id_col!r}; columns are {table.column_names}")
    ids = table.column(id_col).to_pandas(types_mapper=pd.ArrowDtype)
    if ids.isna().any():
        rows = list(ids.index[ids.isna()][:5])
        raise ShardMetadataError(f"{url}: {int(ids.isna().sum())} null ids in {id_col!r} (rows {rows})")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        examples = [str(v) for v in duplicated.unique()[:5]]
        raise ShardMetadataError(f"{url}: {len(duplicated)} duplicate ids in {id_col!r}, e.g. {examples}")


def shard_identity(frame: pd.DataFrame, id_col: str) -> dict[str, object]:
    """The identity of a shard's rows: how many, and a digest of their ids in order."""
    return {"rows": len(frame), "ids": ids_digest(pa.array(frame[id_col].array))}


def write_shard_metadata(frame: pd.DataFrame, url: str, records: FileRecords, layout: str = DEFAULT_LAYOUT) -> None:
    """Write ``frame`` as a parquet at ``url`` atomically (``io.atomic``), ``records`` in its key-value metadata,
    its vector columns in ``layout`` (``io.vectors``), which the footer names with their widths.

    The content digest of each derived column is the one ``records.contents`` carries over (a column copied
    from another file keeps that file's, matching or not), else computed from the values written. A column
    that the float16 layout rounds gets the digest of its rounded values when the carried one was its own.
    """
    memory = pa.Table.from_pandas(frame, preserve_index=False)
    table, vectors = to_disk(memory, layout)
    contents = {}
    for column in (c for c in records.columns if c in table.column_names):
        carried = records.contents.get(column)
        rounded = vectors.get(column, {}).get("layout") == "float16"
        if column not in records.contents or (rounded and carried == content_digest(memory.column(column))):
            carried = content_digest(table.column(column))
        contents[column] = carried
    metadata = dict(table.schema.metadata or {})
    # pandas' own metadata would name dtypes such as "fixed_size_list<...>[768][pyarrow]", which
    # pd.read_parquet cannot parse back: without it, plain pandas reads the file as well as we do.
    metadata.pop(b"pandas", None)
    metadata[METADATA_KEY] = replace(records, contents=contents, vectors=vectors).to_json()
    with atomic_write(url) as file:
        pq.write_table(table.replace_schema_metadata(metadata), file)


def changed_columns(values: Mapping[str, pa.Array | pa.ChunkedArray], recorded: Mapping[str, str | None]) -> list[str]:
    """The columns of ``values`` whose content digest differs from the one ``recorded`` for them (where known)."""
    return [
        column
        for column, array in values.items()
        if recorded.get(column) is not None and content_digest(array) != recorded[column]
    ]


def check_contents(frame: pd.DataFrame, recorded: Mapping[str, str | None], url: str) -> None:
    """``ShardMetadataError`` naming ``url`` unless every column of ``frame`` with a content digest in ``recorded``
    (those its file ``url`` records) still holds those values: a file edited since dask_clip wrote it."""
    present = {column: pa.array(frame[column].array) for column in recorded if column in frame.columns}
    changed = changed_columns(present, recorded)
    if changed:
        raise changed_since_written(url, changed[0])


def changed_since_written(url: str, column: str) -> ShardMetadataError:
    """The error for ``column`` of the parquet ``url``, whose values no longer match its recorded content digest."""
    return ShardMetadataError(
        f"{url}: column {column!r} was changed since dask_clip wrote it (its values no longer match the "
        "content digest its footer records, as after an edit with pyarrow). Run the command that wrote it "
        "again: a re-run recomputes the files whose values changed (--overwrite recomputes every file)"
    )


def check_stored_contents(frame: pd.DataFrame, columns: Iterable[str], url: str) -> None:
    """``check_contents`` for ``columns`` of one shard's rows, read from its parquet ``url`` (its footer says
    their digests; a column the file holds with another type was not read from it, and is not checked)."""
    schema = read_parquet_schema(url)
    recorded = FileRecords.from_schema(schema).contents
    check_contents(frame, {column: recorded.get(column) for column in carried_columns(schema, frame, columns)}, url)


def rows_with_reasons(frame: pd.DataFrame, records: FileRecords) -> int:
    """Rows that got a reason instead of a value in any derived column that records reasons."""
    reason_columns = {
        reason
        for record in records.columns.values()
        if record
        for reason in record.get("reasons", {}).values()
        if reason in frame.columns
    }
    return int(frame[sorted(reason_columns)].notna().any(axis=1).sum()) if reason_columns else 0
