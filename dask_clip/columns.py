"""Column types dask_clip writes, and the one place that checks and converts embedding columns.

An embedding column that dask_clip computes on is a pandas column of pyarrow ``fixed_size_list<float32>[D]``,
null where a row has no embedding. Its file holds it as ``list<float32>`` by default, the width in the footer
(``io.vectors``: the layout every common reader opens), so an embedding never passes through Python objects or
strings on its way from the model to the file and back. Columns that other tools wrote
are read too: lists or large lists of float16, float32 or float64 (as pandas writes a column of arrays,
or NeMo Curator a list column), and pandas object columns of arrays; they are computed on in float32.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from dask_clip.errors import ColumnError
from dask_clip.io.vectors import WidthMismatch, fixed_size, one_array, to_matrix

STRING = pd.ArrowDtype(pa.string())
BOOL = pd.ArrowDtype(pa.bool_())
FLOAT32 = pd.ArrowDtype(pa.float32())
FLOAT64 = pd.ArrowDtype(pa.float64())
INT64 = pd.ArrowDtype(pa.int64())


def embedding_dtype(dim: int) -> pd.ArrowDtype:
    """The pandas dtype of an embedding column of width ``dim``."""
    return pd.ArrowDtype(pa.list_(pa.float32(), dim))


def empty_column(dtype: object) -> pd.Series:
    """An empty column of ``dtype``, for building a Dask ``meta``."""
    return pd.Series([], dtype=dtype)


def nullable(values: np.ndarray, valid: np.ndarray, dtype: pd.ArrowDtype) -> pd.api.extensions.ExtensionArray:
    """A pyarrow-backed array of ``values`` (N,), null where ``valid`` (bool (N,)) is False."""
    return pd.arrays.ArrowExtensionArray(pa.array(values, type=dtype.pyarrow_dtype, mask=~np.asarray(valid, bool)))


def to_embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``float32 (N, D)`` vectors and a ``bool (N,)`` mask -> an embedding column's array (null where not valid)."""
    return pd.arrays.ArrowExtensionArray(fixed_size(vectors, valid))


def require_columns(frame: pd.DataFrame, columns: list[str], purpose: str) -> None:
    """``ColumnError`` naming ``purpose`` and the missing columns unless ``frame`` (e.g. a Dask meta) has them all."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ColumnError(
            f"{purpose} reads columns {missing}, which the dataset lacks; its columns are {list(frame.columns)}"
        )


def embedding_width(frame: pd.DataFrame, column: str, purpose: str = "this operation") -> int | None:
    """The width ``D`` of embedding column ``column`` of ``frame`` (e.g. a Dask meta) when its type says it (a
    fixed-size list); None when only the values can (a list column, or a pandas object column of arrays).

    ``ColumnError`` naming ``purpose`` and the column when it is missing or cannot hold embeddings.
    """
    require_columns(frame, [column], purpose)
    return _width_of(frame[column])


def _width_of(column: pd.Series) -> int | None:
    dtype = column.dtype
    if pd.api.types.is_object_dtype(dtype):
        return None  # arrays in a pandas object column: only their values tell their width
    arrow = dtype.pyarrow_dtype if isinstance(dtype, pd.ArrowDtype) else None
    is_list = arrow is not None and (
        pa.types.is_fixed_size_list(arrow) or pa.types.is_list(arrow) or pa.types.is_large_list(arrow)
    )
    if not (is_list and pa.types.is_floating(arrow.value_type)):
        raise ColumnError(
            f"column {column.name!r} is {dtype}, not an embedding column (a list, large list or fixed-size list of "
            "float16, float32 or float64, or a pandas object column of arrays)"
        )
    return arrow.list_size if pa.types.is_fixed_size_list(arrow) else None


def embeddings_to_numpy(column: pd.Series, width: int | None = None, ids: pd.Series | None = None) -> np.ndarray:
    """An embedding column of any accepted layout -> ``float32 (N, D)``; rows without an embedding are NaN.

    Every non-null row must hold ``width`` values (by default: as many as the column's type says, or as
    its first non-null row holds); ``ValueError`` otherwise, naming the row (by its id in ``ids`` when
    given) and both widths.
    """
    declared = _width_of(column)
    if declared is not None and width is not None and declared != width:
        raise ValueError(f"column {column.name!r} holds {declared}-d embeddings, not {width}-d ones")
    try:
        vectors, _ = to_matrix(_as_arrow_lists(column), width)
    except WidthMismatch as error:
        name = repr(ids.iloc[error.row]) if ids is not None else f"at position {error.row}"
        raise ValueError(
            f"row {name} of {column.name!r} holds {error.length} values where the other embeddings hold "
            f"{error.width} ({error.count} rows of another width)"
        ) from None
    return vectors


def _as_arrow_lists(column: pd.Series) -> pa.Array:
    """An embedding column as one Arrow list array (fixed-size or not), nulls kept."""
    if pd.api.types.is_object_dtype(column.dtype):
        values = [None if _is_missing(v) else np.asarray(v, dtype=np.float64).reshape(-1) for v in column]
        return pa.array(values, type=pa.large_list(pa.float64()))
    return one_array(pa.array(column.array))


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero): ``float32 (B, D)`` -> same."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


def unit_embeddings(
    column: pd.Series, width: int | None = None, ids: pd.Series | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """An embedding column -> ``bool (N,)`` mask of usable rows and their L2-normalised ``float32 (n, D)`` vectors.

    A row is usable when it has an embedding of finite values with a non-zero norm; ``width`` and ``ids``
    are as for ``embeddings_to_numpy``.
    """
    vectors = embeddings_to_numpy(column, width, ids)
    norms = np.linalg.norm(vectors, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    return valid, (vectors[valid] / norms[valid, None]).astype(np.float32)


def vectors_to_binary(vectors: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``float32 (N, D)`` vectors -> a pyarrow ``binary`` array of ``N`` values of ``4 * D`` bytes each.

    Dask's P2P shuffle moves flat Arrow columns, not fixed-size lists: vectors travel through it like this.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    row_bytes = vectors.shape[1] * 4
    offsets = np.arange(len(vectors) + 1, dtype=np.int64) * row_bytes  # a step of 0 bytes: no rows, or 0-d
    array = pa.Array.from_buffers(pa.large_binary(), len(vectors), [None, pa.py_buffer(offsets), pa.py_buffer(vectors)])
    return pd.arrays.ArrowExtensionArray(array)


def binary_to_vectors(column: pd.Series, width: int) -> np.ndarray:
    """A column made by ``vectors_to_binary`` -> ``float32 (N, width)``; ``ValueError`` when a value is not
    ``4 * width`` bytes long."""
    array = one_array(pa.array(column.array)).cast(pa.large_binary())
    if array.null_count:
        raise ValueError(f"column {column.name!r} holds {array.null_count} null vectors")
    lengths = np.asarray(pc.binary_length(array), dtype=np.int64)
    if len(lengths) and (lengths != width * 4).any():
        raise ValueError(f"column {column.name!r} holds values of {sorted(set(lengths))[:5]} bytes, not {width * 4}")
    _, offsets, data = array.buffers()
    start = np.frombuffer(offsets, dtype=np.int64)[array.offset]
    return (
        np.frombuffer(data, dtype=np.uint8)[start : start + len(array) * width * 4].view(np.float32).reshape(-1, width)
    )
