"""Vector columns on disk: the layouts dask_clip writes and reads, and the one conversion to and from memory.

In memory (in every operation) an embedding column is ``fixed_size_list<float32>[D]``, null where a row has
none. On disk it is, by the ``layout`` a save chooses:

- ``"list"`` (the default): ``list<float32>``, a null row empty. Every common reader opens it with its nulls
  intact (pyarrow 15 and later with pandas, Polars, DuckDB, Hugging Face ``datasets``, LanceDB); a
  ``fixed_size_list`` with null rows cannot be read back before pyarrow 26.
- ``"fixed_size_list"``: ``fixed_size_list<float32>[D]``, as dask_clip wrote every vector column before
  (for LanceDB and Hugging Face ``List(length=D)`` consumers; pyarrow 26 or later to read null rows).
- ``"float16"``: ``list<halffloat>``, half the size; the values are rounded to float16 (pyarrow 15 or later).

The width of a list layout is in the footer three times: in dask_clip's provenance document (``vectors``:
``{column: {"layout", "width"}}``, written by ``io.metadata``), under the file key ``dask_clip.widths`` (JSON
``{column: width}``, for other tools) and on the column's Arrow field (``dask_clip.width``). Reading takes it
from the first of those the file has, so a width is known from a footer alone. A list column of floats that
records no width (another tool's) stays a list.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from dask_clip.errors import ConfigurationError

LAYOUTS = ("list", "fixed_size_list", "float16")
DEFAULT_LAYOUT = "list"
WIDTHS_KEY = b"dask_clip.widths"
FIELD_WIDTH_KEY = b"dask_clip.width"


class WidthMismatch(ValueError):
    """A non-null row of a vector column holding another number of values than the column's width."""

    def __init__(self, row: int, length: int, width: int, count: int) -> None:
        super().__init__(f"row {row} holds {length} values, not {width} ({count} rows of another width)")
        self.row, self.length, self.width, self.count = row, length, width, count


def check_writable(layout: str, pyarrow_version: str = pa.__version__) -> None:
    """``ConfigurationError`` when a pyarrow of ``pyarrow_version`` cannot write ``layout`` with null rows:
    ``fixed_size_list`` needs pyarrow 26 or later, to write null rows and to read them back."""
    if layout == "fixed_size_list" and int(pyarrow_version.split(".")[0]) < 26:
        raise ConfigurationError(
            f"vector_layout='fixed_size_list' needs pyarrow 26 or later (this is {pyarrow_version}): older pyarrow "
            "can neither write nor read a fixed-size list with null rows; use the default 'list' layout "
            "(list<float32>, the width in the footer), or upgrade pyarrow"
        )


def is_vector_type(kind: pa.DataType) -> bool:
    """Whether ``kind`` is a list, large list or fixed-size list of floating-point values."""
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return lists and pa.types.is_floating(kind.value_type)


def layout_of(kind: pa.DataType) -> str | None:
    """The layout name of a vector column of on-disk type ``kind`` (None: not one dask_clip writes)."""
    if pa.types.is_fixed_size_list(kind) and pa.types.is_float32(kind.value_type):
        return "fixed_size_list"
    if pa.types.is_list(kind) and pa.types.is_float32(kind.value_type):
        return "list"
    if pa.types.is_list(kind) and pa.types.is_float16(kind.value_type):
        return "float16"
    return None


def recorded_widths(schema: pa.Schema, vectors: dict[str, dict[str, object]] | None = None) -> dict[str, int]:
    """The width of each vector column of a file, from its footer: ``vectors`` (the provenance document's entry),
    else the file's ``dask_clip.widths``, else each field's ``dask_clip.width``; a fixed-size list's from its type."""
    widths: dict[str, int] = {}
    for field in schema:
        if pa.types.is_fixed_size_list(field.type):
            widths[field.name] = field.type.list_size
        elif FIELD_WIDTH_KEY in (field.metadata or {}):
            widths[field.name] = int(field.metadata[FIELD_WIDTH_KEY])
    raw = (schema.metadata or {}).get(WIDTHS_KEY)
    widths.update({name: int(width) for name, width in (json.loads(raw) if raw else {}).items()})
    widths.update({name: int(entry["width"]) for name, entry in (vectors or {}).items() if "width" in entry})
    return {name: width for name, width in widths.items() if name in schema.names}


def in_memory_schema(schema: pa.Schema, widths: dict[str, int]) -> pa.Schema:
    """The schema a file of ``schema`` has in memory: each vector column of known width in a layout dask_clip writes
    ``fixed_size_list<float32>``; another tool's vectors in another type (float64) stay as they are."""
    return pa.schema(
        [
            field.with_type(pa.list_(pa.float32(), widths[field.name]))
            if field.name in widths and layout_of(field.type) is not None
            else field
            for field in schema
        ],
        metadata=schema.metadata,
    )


def to_memory(table: pa.Table, widths: dict[str, int]) -> pa.Table:
    """``table`` as read from a file with every vector column of known width (``widths``) as
    ``fixed_size_list<float32>[D]``, nulls kept. ``WidthMismatch`` (with ``column`` set) for a wrong row."""
    for index, field in enumerate(table.schema):
        if field.name not in widths or layout_of(field.type) is None:
            continue
        width = widths[field.name]
        if field.type == pa.list_(pa.float32(), width):
            continue
        try:
            matrix, valid = to_matrix(one_array(table.column(index)), width)
        except WidthMismatch as error:
            error.args = (f"column {field.name!r}: {error}",)
            raise
        matrix[~valid] = 0
        array = fixed_size(matrix, valid)
        table = table.set_column(index, pa.field(field.name, array.type, metadata=field.metadata), array)
    return table


def to_disk(table: pa.Table, layout: str = DEFAULT_LAYOUT) -> tuple[pa.Table, dict[str, dict[str, object]]]:
    """``table`` (in memory) with every ``fixed_size_list<float32>`` vector column (dask_clip's in memory; another
    tool's float64 vectors are written back as they were) in ``layout``, the width on its field and
    in the schema's ``dask_clip.widths``; and ``{column: {"layout", "width"}}`` for the provenance document."""
    written: dict[str, dict[str, object]] = {}
    for index, field in enumerate(table.schema):
        if not (pa.types.is_fixed_size_list(field.type) and pa.types.is_float32(field.type.value_type)):
            continue
        width = field.type.list_size
        column = one_array(table.column(index))
        if layout == "fixed_size_list":
            array = column.cast(pa.list_(pa.float32(), width))
        else:
            matrix, valid = to_matrix(column, width)
            array = variable(matrix[valid], valid, pa.float16() if layout == "float16" else pa.float32())
        metadata = {**(field.metadata or {}), FIELD_WIDTH_KEY: str(width).encode()}
        table = table.set_column(index, pa.field(field.name, array.type, metadata=metadata), array)
        written[field.name] = {"layout": layout, "width": width}
    if written:
        widths = json.dumps({name: entry["width"] for name, entry in written.items()}, sort_keys=True).encode()
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), WIDTHS_KEY: widths})
    return table, written


def fixed_size(vectors: np.ndarray, valid: np.ndarray) -> pa.FixedSizeListArray:
    """``float32 (N, D)`` and ``bool (N,)`` -> ``fixed_size_list<float32>[D]``, null where not valid."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    mask = pa.array(~np.asarray(valid, dtype=bool))
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1], mask=mask)


def variable(present: np.ndarray, valid: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.ListArray:
    """``(n, D)`` vectors of the ``n`` valid rows and ``bool (N,)`` -> ``list<value_type>``, a null row empty."""
    valid = np.asarray(valid, dtype=bool)
    width = present.shape[1] if present.ndim == 2 else 0
    offsets = np.zeros(len(valid) + 1, dtype=np.int32)
    np.cumsum(valid * width, out=offsets[1:])
    values = pa.array(np.ascontiguousarray(present, dtype=value_type.to_pandas_dtype()).reshape(-1), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(~valid))


def one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``values`` as one Arrow array (``pa.chunked_array(<ChunkedArray>)`` is not valid before pyarrow 16)."""
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def to_matrix(array: pa.Array, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A list, large list or fixed-size list array of floats -> ``float32 (N, D)`` (NaN rows where null) and the
    ``bool (N,)`` mask of non-null rows. ``D`` is ``width``, else the type's, else the first non-null row's.

    No Python loop and no ``filter``: the child values are sliced out once, by the offsets. When every null row
    is empty (as dask_clip writes lists) or the type is fixed-size, the valid rows' values are reshaped whole;
    otherwise each valid row's ``D`` values are gathered from its start offset. ``WidthMismatch`` when a
    non-null row holds another number of values.
    """
    valid = ~np.asarray(array.is_null(), dtype=bool) if array.null_count else np.ones(len(array), dtype=bool)
    if pa.types.is_fixed_size_list(array.type):
        size = array.type.list_size
        if width is not None and width != size and valid.any():
            row = int(np.flatnonzero(valid)[0])
            raise WidthMismatch(row, size, width, int(valid.sum()))
        width = size
        start = array.offset * size
        offsets = np.arange(start, start + (len(array) + 1) * size, size, dtype=np.int64)
    else:
        offsets = np.asarray(array.offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    if width is None:
        width = int(lengths[valid][0]) if valid.any() else 0
    wrong = np.flatnonzero(valid & (lengths != width))
    if len(wrong):
        raise WidthMismatch(int(wrong[0]), int(lengths[wrong[0]]), width, len(wrong))
    values = array.values
    if not valid.any() or width == 0:
        return np.full((len(array), width), np.nan, dtype=np.float32), valid
    if pa.types.is_fixed_size_list(array.type) or valid.all():  # one run of N * D values, null rows included
        flat = values.slice(offsets[0], len(array) * width).to_numpy(zero_copy_only=False)
        out = flat.reshape(len(array), width).astype(np.float32, copy=True)
        out[~valid] = np.nan
        return out, valid
    out = np.full((len(array), width), np.nan, dtype=np.float32)
    if (lengths[~valid] == 0).all():  # as dask_clip writes lists: the valid rows' values are one run
        run = values.slice(offsets[0], offsets[-1] - offsets[0])
        out[valid] = run.to_numpy(zero_copy_only=False).reshape(-1, width)
    else:
        starts = offsets[:-1][valid]
        flat = values.slice(int(starts[0])).to_numpy(zero_copy_only=False)
        out[valid] = flat[(starts - starts[0])[:, None] + np.arange(width)]
    return out, valid
