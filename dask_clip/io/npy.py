"""Read rows of a ``.npy`` file (local or any fsspec URL) without loading the whole array.

Only a 2-d array of real floats (``float16``, ``float32`` or ``float64``, either byte order) is rows of
vectors; C order (``numpy.save``'s usual) and Fortran order (a transposed array saved as it is) are both read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np

from dask_clip.errors import DataError
from dask_clip.io.shards import filesystem_of

WHOLE_FILE_SHARE = 0.25
"""When more than this share of a file's rows is wanted, the whole file is read at once."""
VECTOR_DTYPES = ("float16", "float32", "float64")


@dataclass(frozen=True)
class NpyHeader:
    """The shape and dtype of a 2-d ``.npy`` array of floats, its order and where its data starts."""

    rows: int
    width: int
    dtype: np.dtype
    offset: int
    fortran: bool = False

    @property
    def data_bytes(self) -> int:
        """How many bytes of data follow the header."""
        return self.rows * self.width * self.dtype.itemsize


def read_npy_header(url: str) -> NpyHeader:
    """The header of the ``.npy`` at ``url``; ``DataError`` naming the file, its dtype and shape unless it holds
    a 2-d array of ``VECTOR_DTYPES``."""
    fs, path = filesystem_of(url)
    with fs.open(path, "rb") as file:
        try:
            version = np.lib.format.read_magic(file)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(file)
        except ValueError as error:
            raise DataError(f"{url}: not a .npy file numpy can read ({error}); write it with numpy.save") from error
        offset = file.tell()
    dtype = np.dtype(dtype)
    if len(shape) != 2 or dtype.kind != "f" or dtype.name not in VECTOR_DTYPES:
        raise DataError(
            f"{url}: holds an array of {dtype} with shape {tuple(shape)}, not rows of vectors (a 2-d "
            f"array of {', '.join(VECTOR_DTYPES[:-1])} or {VECTOR_DTYPES[-1]}, one row per vector); "
            "save it as numpy.save(path, vectors.astype(numpy.float32).reshape(rows, width))"
        )
    return NpyHeader(int(shape[0]), int(shape[1]), dtype, offset, bool(fortran))


def read_npy_rows(url: str, header: NpyHeader, rows: Sequence[int]) -> np.ndarray:
    """Rows ``rows`` of the ``.npy`` file at ``url``, in that order, as ``float32 (len(rows), width)``. A
    Fortran-order file is read whole (its rows are not contiguous)."""
    fs, path = filesystem_of(url)
    rows = np.asarray(rows, dtype=np.int64)
    row_bytes = header.width * header.dtype.itemsize
    out = np.empty((len(rows), header.width), dtype=np.float32)
    with fs.open(path, "rb") as file:
        if header.fortran or len(rows) > WHOLE_FILE_SHARE * header.rows:
            file.seek(header.offset)
            data = np.frombuffer(_read_exactly(file, header.data_bytes, url), dtype=header.dtype)
            whole = data.reshape(header.width, header.rows).T if header.fortran else data.reshape(-1, header.width)
            out[:] = whole[rows]
            return out
        for position, row in enumerate(rows):
            file.seek(header.offset + int(row) * row_bytes)
            out[position] = np.frombuffer(_read_exactly(file, row_bytes, url), dtype=header.dtype)
    return out


def _read_exactly(file: IO[bytes], size: int, url: str) -> bytes:
    data = file.read(size)
    if len(data) != size:
        raise DataError(f"{url}: ends {size - len(data)} bytes early: it changed since it was checked; run again")
    return data
