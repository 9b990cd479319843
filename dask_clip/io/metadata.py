"""Read and write a shard's metadata parquet.

Every column is read as a pyarrow-backed pandas dtype (``pd.ArrowDtype``): dtypes then do not
depend on whether a shard happens to hold nulls, Dask's string conversion leaves them alone, and
an embedding column stays a fixed-size list of float32 all the way to disk and back.

Columns that dask_clip added (embeddings, error reasons) are listed in the parquet's key-value
metadata under ``dask_clip``, together with the configuration that produced them.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.errors import ShardMetadataError
from dask_clip.io.atomic import atomic_write
from dask_clip.io.shards import filesystem_of

DASK_CLIP_METADATA_KEY = b"dask_clip"


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


def dask_clip_info(schema: pa.Schema) -> dict[str, Any]:
    """What dask_clip recorded in a parquet's key-value metadata (``{}`` when nothing)."""
    raw = (schema.metadata or {}).get(DASK_CLIP_METADATA_KEY)
    return json.loads(raw) if raw else {}


def empty_frame(schema: pa.Schema) -> pd.DataFrame:
    """An empty frame with the dtypes ``read_shard_metadata`` gives for this schema (a Dask meta)."""
    return arrow_to_pandas(schema.empty_table())


def read_shard_metadata(
    url: str, id_col: str, meta: pd.DataFrame, derived_columns: frozenset[str] = frozenset()
) -> pd.DataFrame:
    """Read one shard's parquet into a frame whose columns and dtypes are exactly ``meta``'s.

    ``derived_columns`` (columns an earlier dask_clip run added) may be absent from a shard, which
    happens after an interrupted run: they are then filled with nulls. Any other difference in
    columns, a missing ``id_col``, or null or duplicate ids is a ``ShardMetadataError`` naming the file.
    """
    fs, path = filesystem_of(url)
    try:
        with fs.open(path, "rb") as file:
            table = pq.read_table(file)
    except (OSError, pa.ArrowException) as error:
        raise ShardMetadataError(f"{url}: cannot read parquet: {error}") from error
    frame = arrow_to_pandas(table)
    check_ids(frame, id_col, url)

    written_by_us = set(dask_clip_info(table.schema).get("derived_columns", ()))
    frame = frame.drop(columns=[c for c in frame.columns if c in written_by_us and c not in meta])
    missing = [c for c in meta.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in meta.columns]
    if extra or any(c not in derived_columns for c in missing):
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


def check_ids(frame: pd.DataFrame, id_col: str, url: str) -> None:
    """Raise ``ShardMetadataError`` naming ``url`` unless ``id_col`` exists and is unique and non-null."""
    if id_col not in frame.columns:
        raise ShardMetadataError(f"{url}: no id column {id_col!r}; columns are {list(frame.columns)}")
    ids = frame[id_col]
    if ids.isna().any():
        rows = list(ids.index[ids.isna()][:5])
        raise ShardMetadataError(f"{url}: {int(ids.isna().sum())} null ids in {id_col!r} (rows {rows})")
    duplicated = ids[ids.duplicated()]
    if len(duplicated):
        examples = [str(v) for v in duplicated.unique()[:5]]
        raise ShardMetadataError(f"{url}: {len(duplicated)} duplicate ids in {id_col!r}, e.g. {examples}")


def write_shard_metadata(frame: pd.DataFrame, url: str, info: dict[str, Any]) -> None:
    """Write ``frame`` as a parquet at ``url`` atomically (``io.atomic``), with ``info`` in its key-value metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    # pandas' own metadata would name dtypes such as "fixed_size_list<...>[768][pyarrow]", which
    # pd.read_parquet cannot parse back: without it, plain pandas reads the file as well as we do.
    metadata.pop(b"pandas", None)
    metadata[DASK_CLIP_METADATA_KEY] = json.dumps(info, sort_keys=True).encode()
    with atomic_write(url) as file:
        pq.write_table(table.replace_schema_metadata(metadata), file)


def count_rows_with_errors(frame: pd.DataFrame, info: dict[str, Any]) -> int:
    """Rows with a reason in any derived ``*_error`` column (rows that got no value)."""
    error_columns = [c for c in info.get("derived_columns", ()) if c.endswith("_error") and c in frame.columns]
    return int(frame[error_columns].notna().any(axis=1).sum()) if error_columns else 0


def finished_output_summary(url: str, columns: list[str], info: dict[str, Any]) -> dict[str, int] | None:
    """``{"rows", "errors"}`` of the parquet at ``url`` when it is a finished output, else None.

    Finished: it exists and is readable, has exactly ``columns``, its dask_clip configurations
    equal ``info``'s, and, where the derived columns include an ``*_error`` column (which holds a
    reason for every row without a value), no row has every derived column null (a row never
    reached). Without one, a null is a legitimate result (a text embedding of a null caption).
    """
    fs, path = filesystem_of(url)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as file:
            schema = pq.read_schema(file)
            if schema.names != columns or dask_clip_info(schema).get("configs") != _json_normalised(info["configs"]):
                return None
            file.seek(0)
            derived = pq.read_table(file, columns=list(info["derived_columns"]))
    except (OSError, pa.ArrowException):
        return None
    frame = arrow_to_pandas(derived)
    has_error_column = any(column.endswith("_error") for column in frame.columns)
    if has_error_column and frame.isna().all(axis=1).any():
        return None
    return {"rows": len(frame), "errors": count_rows_with_errors(frame, info)}


def _json_normalised(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))
