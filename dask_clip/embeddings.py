"""Embedding columns: a pandas column of pyarrow ``fixed_size_list<float32>[D]``, null where there is none.

This is also the parquet type on disk, so an embedding never passes through Python objects or
strings on its way from the model to the file and back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa


def embedding_dtype(dim: int) -> pd.ArrowDtype:
    """The pandas dtype of an embedding column of width ``dim``."""
    return pd.ArrowDtype(pa.list_(pa.float32(), dim))


def to_embedding_array(vectors: np.ndarray, valid: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``float32 (N, D)`` vectors and a ``bool (N,)`` mask -> an embedding column's array (null where not valid)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    values = pa.array(vectors.reshape(-1))
    mask = pa.array(~np.asarray(valid, dtype=bool))
    lists = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1], mask=mask)
    return pd.arrays.ArrowExtensionArray(lists)


def embeddings_to_numpy(column: pd.Series) -> np.ndarray:
    """An embedding column -> ``float32 (N, D)``; rows without an embedding are all NaN."""
    dtype = column.dtype
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_fixed_size_list(dtype.pyarrow_dtype)):
        raise TypeError(f"{column.name!r} is {dtype}, not an embedding column (fixed_size_list<float>)")
    width = dtype.pyarrow_dtype.list_size
    lists = pa.chunked_array(pa.array(column.array)).combine_chunks() if len(column) else None
    if lists is None:
        return np.zeros((0, width), dtype=np.float32)
    out = np.full((len(column), width), np.nan, dtype=np.float32)
    valid = ~np.asarray(lists.is_null(), dtype=bool)
    values = lists.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    out[valid] = values.reshape(-1, width)
    return out


def embedding_width(frame: pd.DataFrame, column: str) -> int:
    """The width ``D`` of embedding column ``column`` of ``frame`` (e.g. a Dask meta); errors name the column."""
    if column not in frame.columns:
        raise KeyError(f"no embedding column {column!r}; the columns are {list(frame.columns)}")
    dtype = frame[column].dtype
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_fixed_size_list(dtype.pyarrow_dtype)):
        raise TypeError(f"column {column!r} is {dtype}, not an embedding column (fixed_size_list<float>)")
    return dtype.pyarrow_dtype.list_size


def unit_embeddings(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """An embedding column -> ``bool (N,)`` mask of usable rows and their L2-normalised ``float32 (n, D)`` vectors.

    A row is usable when it has an embedding of finite values with a non-zero norm.
    """
    vectors = embeddings_to_numpy(column)
    norms = np.linalg.norm(vectors, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    return valid, (vectors[valid] / norms[valid, None]).astype(np.float32)
