"""Read rows of a ``.npy`` file (local or any fsspec URL) without loading the whole array."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dask_clip.io.shards import filesystem_of

WHOLE_FILE_SHARE = 0.25
"""When more than this share of a file's rows is wanted, the whole file is read at once."""


@dataclass(frozen=True)
class NpyHeader:
    """The shape and dtype of a 2-d ``.npy`` array and where its data starts."""

    rows: int
    width: int
    dtype: np.dtype
    offset: int


def read_npy_header(url: str) -> NpyHeader:
    """The header of the ``.npy`` at ``url``; ``ValueError`` naming the file unless it holds a 2-d C-order array."""
    fs, path = filesystem_of(url)
    with fs.open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    if len(shape) != 2 or fortran:
        raise ValueError(f"{url}: holds an array of shape {shape} (Fortran order: {fortran}), not rows of vectors")
    return NpyHeader(int(shape[0]), int(shape[1]), np.dtype(dtype), offset)


def read_npy_rows(url: str, header: NpyHeader, rows: Sequence[int]) -> np.ndarray:
    """Rows ``rows`` of the ``.npy`` file at ``url``, in that order, as ``float32 (len(rows), width)``."""
    fs, path = filesystem_of(url)
    rows = np.asarray(rows, dtype=np.int64)
    row_bytes = header.width * header.dtype.itemsize
    out = np.empty((len(rows), header.width), dtype=np.float32)
    with fs.open(path, "rb") as file:
        if len(rows) > WHOLE_FILE_SHARE * header.rows:
            file.seek(header.offset)
            data = np.frombuffer(file.read(header.rows * row_bytes), dtype=header.dtype)
            out[:] = data.reshape(header.rows, header.width)[rows]
            return out
        for position, row in enumerate(rows):
            file.seek(header.offset + int(row) * row_bytes)
            out[position] = np.frombuffer(file.read(row_bytes), dtype=header.dtype)
    return out
