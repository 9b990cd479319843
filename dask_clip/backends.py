"""Dataframe backends of a dataset's metadata: pandas (CPU) or cudf (GPU extra), converted at one boundary.

dask_clip's operations always compute on pandas partitions whose columns are Arrow-backed, embeddings as
``fixed_size_list<float32>[D]``. cudf cannot hold fixed-size lists (it maps them through pandas dtypes and
refuses them), so on the cudf side an embedding is a ``list<float32>``. The two functions on Arrow tables,
``arrow_for_cudf`` and ``arrow_from_cudf``, are that boundary; the per-partition converters around them only
move tables between the libraries. Importing this module imports no GPU library.
"""

from __future__ import annotations

from typing import Any

import dask.dataframe as dd
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dask_clip.arguments import one_of
from dask_clip.errors import DataError
from dask_clip.io.metadata import arrow_to_pandas
from dask_clip.optional import require

BACKENDS = ("pandas", "cudf")


def check_backend(backend: str) -> None:
    """``UsageError`` for an unknown backend, ``MissingDependencyError`` naming the extra when cudf is missing."""
    one_of("backend", backend, BACKENDS)
    if backend == "cudf":
        require("cudf", "gpu", 'backend="cudf"')
        require("dask_cudf", "gpu", 'backend="cudf"')


def is_cudf(frame: dd.DataFrame) -> bool:
    """Whether ``frame``'s partitions are cudf frames."""
    return type(frame._meta).__module__.startswith("cudf")


def arrow_for_cudf(table: pa.Table) -> pa.Table:
    """``table`` with every ``fixed_size_list<T>[D]`` column as ``list<T>`` (same values, same nulls)."""
    for index, field in enumerate(table.schema):
        if pa.types.is_fixed_size_list(field.type):
            as_list = table.column(index).cast(pa.list_(field.type.value_type))
            table = table.set_column(index, field.with_type(as_list.type), as_list)
    return table


def arrow_from_cudf(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` (as cudf wrote it: ``list`` for fixed-size lists, perhaps ``large_string`` for strings) in the
    types of ``schema``. ``DataError`` naming the column and the first row when a list does not have the
    width its fixed-size type says (a null row is a null embedding, never padded)."""
    columns = []
    for field in schema:
        column = table.column(field.name)
        if pa.types.is_fixed_size_list(field.type):
            _check_widths(column, field)
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _check_widths(column: pa.ChunkedArray, field: pa.Field) -> None:
    lengths = pc.list_value_length(column)
    wrong = pc.and_(pc.is_valid(lengths), pc.not_equal(lengths, field.type.list_size))
    if pc.any(wrong).as_py():
        row = pc.index(wrong, True).as_py()
        raise DataError(
            f"column {field.name!r}, row {row}: {lengths[row].as_py()} values where an embedding of width "
            f"{field.type.list_size} was expected (it came back from cudf changed)"
        )


def pandas_to_cudf(frame: pd.DataFrame) -> Any:
    """A pandas partition (Arrow-backed columns) -> the cudf frame of the same rows and index."""
    cudf = require("cudf", "gpu", 'backend="cudf"')
    result = cudf.DataFrame.from_arrow(arrow_for_cudf(pa.Table.from_pandas(frame, preserve_index=False)))
    result.index = cudf.from_pandas(frame.index)
    return result


def cudf_to_pandas(frame: Any, like: pd.DataFrame) -> pd.DataFrame:
    """A cudf partition -> a pandas frame of the same rows and index, its columns in the Arrow types ``like``
    gives them (embeddings fixed-size again); columns ``like`` does not have keep the types cudf gives."""
    table = frame.to_arrow(preserve_index=False)
    pandas = arrow_to_pandas(arrow_from_cudf(table, target_schema(table.schema, like)))
    pandas.index = frame.index.to_pandas()
    return pandas


def target_schema(schema: pa.Schema, like: pd.DataFrame) -> pa.Schema:
    """``schema`` (a cudf partition's) with the types that only cudf changed restored from ``like``: a
    ``list`` that is a fixed-size list there (of any width: a wrong one is reported by ``arrow_from_cudf``),
    a large string that is a string there. Every other column keeps the type cudf gives it."""
    arrow_types = {name: dtype.pyarrow_dtype for name, dtype in like.dtypes.items() if isinstance(dtype, pd.ArrowDtype)}
    fields = []
    for field in schema:
        old = arrow_types.get(field.name)
        restore = old is not None and (
            (pa.types.is_fixed_size_list(old) and pa.types.is_list(field.type))
            or (pa.types.is_string(old) and pa.types.is_large_string(field.type))
        )
        fields.append(field.with_type(old) if restore else field)
    return pa.schema(fields)


def to_backend(frame: dd.DataFrame, backend: str) -> dd.DataFrame:
    """A pandas-backed ``frame`` on ``backend`` (lazily, partition by partition)."""
    if backend == "pandas":
        return frame
    return frame.map_partitions(pandas_to_cudf, meta=pandas_to_cudf(frame._meta), enforce_metadata=False)


def to_pandas(frame: dd.DataFrame, like: pd.DataFrame) -> dd.DataFrame:
    """``frame`` (pandas or cudf) on pandas, its columns in the dtypes of ``like`` (lazily, partition by partition)."""
    if not is_cudf(frame):
        return frame
    meta = cudf_to_pandas(frame._meta, like)
    return frame.map_partitions(cudf_to_pandas, like, meta=meta, enforce_metadata=False)
