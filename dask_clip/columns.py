"""Column types dask_clip writes, and the one place that checks and converts embedding columns.

An embedding column is a pandas column of pyarrow ``fixed_size_list<float32>[D]``, null where a row has
no embedding. That is also its parquet type, so an embedding never passes through Python objects or
strings on its way from the model to the file and back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.errors import ColumnError

STRING = pd.ArrowDtype(pa.string())
BOOL = pd.ArrowDtype(pa.bool_())
FLOAT32 = pd.ArrowDtype(pa.float32())
FLOAT64 = pd.ArrowDtype(pa.float64())


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
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    values = pa.array(vectors.reshape(-1))
    mask = pa.array(~np.asarray(valid, dtype=bool))
    lists = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=mask)
    return pd.arrays.ArrowExtensionArray(lists)


def require_columns(frame: pd.DataFrame, columns: list[str], purpose: str) -> None:
    """``ColumnError`` naming ``purpose`` and the missing columns unless ``frame`` (e.g. a Dask meta) has them all."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ColumnError(
            f"{purpose} reads columns {missing}, which the dataset lacks; its columns are {list(frame.columns)}"
        )


def embedding_width(frame: pd.DataFrame, column: str, purpose: str = "this operation") -> int:
    """The width ``D`` of embedding column ``column`` of ``frame`` (e.g. a Dask meta).

    ``ColumnError`` naming ``purpose`` and the column when it is missing or not an embedding column.
    """
    require_columns(frame, [column], purpose)
    return _width_of(frame[column])


def embeddings_to_numpy(column: pd.Series) -> np.ndarray:
    """An embedding column -> ``float32 (N, D)``; rows without an embedding are all NaN."""
    width = _width_of(column)
    if not len(column):
        return np.zeros((0, width), dtype=np.float32)
    lists = pa.chunked_array(pa.array(column.array)).combine_chunks()
    out = np.full((len(column), width), np.nan, dtype=np.float32)
    valid = ~np.asarray(lists.is_null(), dtype=bool)
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    out[valid] = values.reshape(-1, width)
    return out


def _width_of(column: pd.Series) -> int:
    dtype = column.dtype
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_fixed_size_list(dtype.pyarrow_dtype)):
        raise ColumnError(f"column {column.name!r} is {dtype}, not an embedding column (fixed_size_list<float>)")
    return dtype.pyarrow_dtype.list_size


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero): ``float32 (B, D)`` -> same."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


def unit_embeddings(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An embedding column -> ``bool (N,)`` mask of usable rows and their L2-normalised ``float32 (n, D)`` vectors.

    A row is usable when it has an embedding of finite values with a non-zero norm.
    """
    vectors = embeddings_to_numpy(column)
    norms = np.linalg.norm(vectors, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    return valid, (vectors[valid] / norms[valid, None]).astype(np.float32)
