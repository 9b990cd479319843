"""Attach embeddings computed elsewhere, in clip-retrieval's layout, to a dataset's rows.

LAION published its CLIP embeddings as ``img_emb/img_emb_{i}.npy`` (rows of vectors) with
``metadata/metadata_{i}.parquet`` (one row per vector, in the same order), and ``export_clip_retrieval``
writes the same layout. ``AttachEmbeddings`` (``dataset.attach_embeddings``) joins those vectors to the shards'
rows by id (or by url, where the ids differ), without embedding anything:

1. each metadata parquet's task lists its join keys with their file and row; each shard's task lists its
   rows' keys with their shard and position;
2. a Dask shuffle joins the two lists on the key, and the matches go back to their shard;
3. each shard's task reads its rows' vectors from the ``.npy`` files (only those rows) and joins them.

Before any of that (so before anything is written), one task per file pair reads both files whole: it checks
that the ``.npy`` holds a 2-d array of floats with exactly as many rows as its metadata parquet, and takes
the sha256 of every byte of both. A row without a vector gets a reason; a key with two vectors is an error
naming both files. The columns' provenance records the folder's resolved path, a digest of those hashes
(a file rewritten with its size and modification time kept is noticed), both join columns, and the
join column's values.
"""

from __future__ import annotations

import copy
import posixpath
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.columns import STRING, embedding_dtype, empty_column, to_embedding_array
from dask_clip.errors import ColumnError, DataError, DatasetLayoutError
from dask_clip.execution import SHARD_COLUMN, ShardTask, compute, failures_named
from dask_clip.io.npy import NpyHeader, read_npy_header, read_npy_rows
from dask_clip.io.shards import as_url, content_sha256, filesystem_of, protocol_of, resolved_url
from dask_clip.operation import Operation
from dask_clip.provenance import digest

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

_KEY, _POSITION, _FILE, _ROW = "_dask_clip_key", "_dask_clip_position", "_file", "_row"

ID_COLUMNS = ("key", "image_path")
"""Where clip-retrieval's metadata holds a sample's id when it lacks the id column's own name: ``key`` (an
export, or its inference with ``enable_metadata`` over img2dataset's shards) and ``image_path`` (its
inference over a WebDataset: the sample's ``__key__``; over a folder of files it is the file's path)."""


def embedding_files(path: str) -> list[tuple[str, str]]:
    """The ``(img_emb/img_emb_{i}.npy, metadata/metadata_{i}.parquet)`` pairs under ``path``, paired by ``i``;
    ``DatasetLayoutError`` naming what is unpaired or missing."""
    fs, root = filesystem_of(path)
    protocol = protocol_of(fs)

    def listed(folder: str, prefix: str, suffix: str) -> dict[str, str]:
        found = fs.ls(posixpath.join(root, folder), detail=False) if fs.isdir(posixpath.join(root, folder)) else []
        names = (posixpath.basename(entry) for entry in found)
        return {n[len(prefix) : -len(suffix)]: n for n in names if n.startswith(prefix) and n.endswith(suffix)}

    vectors = listed("img_emb", "img_emb_", ".npy")
    metadata = listed("metadata", "metadata_", ".parquet")
    if not vectors:
        raise DatasetLayoutError(f"{path}: no img_emb/img_emb_*.npy files (clip-retrieval's layout)")
    unpaired = sorted(vectors.keys() ^ metadata.keys())
    if unpaired:
        raise DatasetLayoutError(f"{path}: embedding files without their metadata, or the reverse: {unpaired[:10]}")
    return [
        (
            as_url(protocol, posixpath.join(root, "img_emb", vectors[i])),
            as_url(protocol, posixpath.join(root, "metadata", metadata[i])),
        )
        for i in sorted(vectors, key=lambda name: (len(name), name))
    ]


class AttachEmbeddings(Operation):
    """``AttachEmbeddings(path)(dataset)`` -> a new dataset whose ``embedding_column`` holds the vectors found
    under ``path`` (clip-retrieval's layout), joined to rows by column ``on`` (the id column by default; ``"url"``
    where the ids differ) matched against ``source_column`` of the metadata parquets (by default the same name;
    the id column is also found under ``ID_COLUMNS``, clip-retrieval's names). Keys are compared as NFC-normalised
    text. Vectors are stored as ``float32``; a row without one gets a null and a reason in ``error_column``
    (``embedding_error`` for ``image_embedding``, else ``<embedding_column>_error``), which this replaces too.

    Building it reads every file under ``path`` whole (one task per file pair) and raises, before anything can be
    written: ``DataError`` naming the file where a ``.npy`` is not a complete 2-d array of float16, float32 or
    float64, where its rows differ from its metadata parquet's, or where widths differ; ``ColumnError`` where
    the metadata lacks the join column."""

    function_name = "attach_embeddings"

    def __init__(
        self,
        path: str,
        *,
        on: str | None = None,
        source_column: str | None = None,
        embedding_column: str = "image_embedding",
        error_column: str | None = None,
    ) -> None:
        self.path = resolved_url(path)
        self.files = embedding_files(self.path)
        self.parts = _checked_parts(self.path, self.files)
        self.on = on
        self.source_column = source_column and _join_column(self.parts, [source_column])
        self.embedding_column = embedding_column
        self.error_column = error_column or (
            "embedding_error" if embedding_column == "image_embedding" else f"{embedding_column}_error"
        )

    def __call__(self, dataset: ImageTextPairDataset) -> ImageTextPairDataset:
        """The vectors attached to ``dataset``'s rows, joined on its id column unless ``on`` names another."""
        if self.on is None or self.source_column is None:
            return self.joined_on(self.on or dataset.id_col, dataset.id_col)(dataset)
        return super().__call__(dataset)

    def joined_on(self, on: str, id_col: str) -> AttachEmbeddings:
        """This operation joining on column ``on`` of a dataset whose id column is ``id_col``, with the metadata
        column it matches (``source_column``, or the first of ``on`` and, for the id column, ``ID_COLUMNS``)."""
        joined = copy.copy(self)
        joined.on = on
        joined.source_column = self.source_column or _join_column(self.parts, _candidates(on, id_col))
        return joined

    def config(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "content": digest([part.sha256 for part in self.parts]),
            "on": self.on,
            "source_column": self.source_column,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.on or dataset.id_col]

    def reasons(self) -> dict[str, str]:
        return {self.embedding_column: self.error_column}

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {
            self.embedding_column: empty_column(embedding_dtype(self.parts[0].header.width)),
            self.error_column: empty_column(STRING),
        }

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """Match the files' keys to the shards' rows (a shuffle on the key), then read each shard's vectors."""
        numbered = [(index, metadata, self.source_column) for index, (_, metadata) in enumerate(self.files)]
        keys = dd.from_map(_file_keys, numbered, meta=_KEYS_META, label="embedding-keys", enforce_metadata=False)
        rows_meta = pd.DataFrame(
            {_KEY: empty_column(STRING), SHARD_COLUMN: empty_column("int64"), _POSITION: empty_column("int64")}
        )
        rows = dataset.map_shards(_row_keys, rows_meta, on=self.on)
        matches = rows.merge(keys, on=_KEY, how="inner", shuffle_method="tasks")
        return dataset.map_shards_with_results(
            _join_vectors,
            output_meta,
            matches,
            label="attach-embeddings",
            files=self.files,
            headers=[part.header for part in self.parts],
            columns=(self.embedding_column, self.error_column),
            path=self.path,
        )


_KEYS_META = pd.DataFrame({_KEY: empty_column(STRING), _FILE: empty_column("int64"), _ROW: empty_column("int64")})


@dataclass(frozen=True)
class _Part:
    """One checked file pair: its ``.npy`` and its header, its metadata parquet and that file's columns, and
    both files' sha256."""

    vectors: str
    header: NpyHeader
    metadata: str
    columns: list[str]
    sha256: tuple[str, str]


def _checked_parts(path: str, files: list[tuple[str, str]]) -> list[_Part]:
    """Each file pair checked and hashed by ``_checked_part``, one task each; ``DataError`` naming two ``.npy``
    files whose vectors' widths differ."""
    parts: list[_Part] = compute([dask.delayed(_checked_part)(vectors, metadata) for vectors, metadata in files])
    first = parts[0]
    other = next((part for part in parts if part.header.width != first.header.width), None)
    if other is not None:
        raise DataError(
            f"{path}: its .npy files hold vectors of different widths ({first.vectors}: {first.header.width}, "
            f"{other.vectors}: {other.header.width}); attach one model's vectors at a time"
        )
    return parts


def _checked_part(vectors: str, metadata: str) -> _Part:
    """Read one file pair whole (a task on the cluster): ``DataError`` naming the file unless the ``.npy`` holds
    a complete 2-d array of floats with one row per row of the metadata parquet."""
    with failures_named(vectors):
        header = read_npy_header(vectors)
    with failures_named(metadata):
        fs, file_path = filesystem_of(metadata)
        with fs.open(file_path, "rb") as file:
            parquet = pq.ParquetFile(file)
            rows, columns = parquet.metadata.num_rows, parquet.schema_arrow.names
    if rows != header.rows:
        raise DataError(
            f"{vectors}: holds {header.rows} vectors but {metadata} has {rows} rows: the pair must hold one vector "
            "per metadata row, in the same order; write both from the same run (clip-retrieval's inference, "
            "or export_clip_retrieval)"
        )
    with failures_named(vectors):
        vectors_sha256, size = content_sha256(vectors)
    if size != header.offset + header.data_bytes:
        raise DataError(
            f"{vectors}: its header says {header.rows} rows of {header.width} {header.dtype} "
            f"({header.data_bytes} bytes) but {size - header.offset} bytes follow it: the file is truncated or was "
            "written by something other than numpy.save; write it again"
        )
    with failures_named(metadata):
        metadata_sha256, _ = content_sha256(metadata)
    return _Part(vectors, header, metadata, columns, (vectors_sha256, metadata_sha256))


def _candidates(on: str, id_col: str) -> list[str]:
    """The metadata columns that may hold the values of column ``on``, in order of preference."""
    return list(dict.fromkeys([on, *ID_COLUMNS])) if on == id_col else [on]


def _join_column(parts: list[_Part], candidates: list[str]) -> str:
    """The first of ``candidates`` that every metadata parquet holds; ``ColumnError`` naming a file without it."""
    for name in candidates:
        if all(name in part.columns for part in parts):
            return name
    lacking = next((p for p in parts if not set(candidates) & set(p.columns)), None)
    lacking = lacking or next(p for p in parts if candidates[0] not in p.columns)
    raise ColumnError(
        f"{lacking.metadata}: no column {' or '.join(map(repr, candidates))} to join on; its columns are "
        f"{lacking.columns}: name the one that holds the join values with source_column= (--source-column)"
    )


def normalized(values: pd.Series) -> pd.Series:
    """Join keys as NFC-normalised text (an integer id ``1`` is ``"1"``)."""
    text = [unicodedata.normalize("NFC", str(value)) for value in values]
    return pd.Series(pd.array(text, dtype=STRING), index=values.index)


def _file_keys(numbered: tuple[int, str, str]) -> pd.DataFrame:
    """One metadata parquet's join keys, with the number of its file and each key's row."""
    index, metadata, column = numbered
    with failures_named(metadata):
        fs, path = filesystem_of(metadata)
        with fs.open(path, "rb") as file:
            keys = pq.read_table(file, columns=[column]).column(0).to_pandas()
    present = keys.notna().to_numpy()
    return pd.DataFrame(
        {
            _KEY: normalized(keys[present]).array,
            _FILE: np.full(int(present.sum()), index, dtype=np.int64),
            _ROW: np.flatnonzero(present).astype(np.int64),
        }
    )


def _row_keys(rows: pd.DataFrame, task: ShardTask, on: str) -> pd.DataFrame:
    """One shard's join keys, with the shard's number and each key's row."""
    present = rows[on].notna().to_numpy()
    return pd.DataFrame(
        {
            _KEY: normalized(rows[on][present]).array,
            SHARD_COLUMN: np.full(int(present.sum()), task.shard.index, dtype=np.int64),
            _POSITION: np.flatnonzero(present).astype(np.int64),
        }
    )


def _join_vectors(
    rows: pd.DataFrame,
    task: ShardTask,
    matches: pd.DataFrame,
    files: list[tuple[str, str]],
    headers: list[NpyHeader],
    columns: tuple[str, str],
    path: str,
) -> pd.DataFrame:
    """One shard's rows with the vectors their keys matched, read from the ``.npy`` files."""
    duplicated = matches[_POSITION].duplicated(keep=False).to_numpy()
    if duplicated.any():
        clash = matches[duplicated].sort_values([_POSITION, _FILE, _ROW]).head(2)
        key = clash[_KEY].iloc[0]
        where = [f"{files[f][1]} row {r}" for f, r in zip(clash[_FILE], clash[_ROW], strict=True)]
        raise DataError(f"{path}: key {key!r} has more than one vector ({', '.join(where)})")
    vectors = np.zeros((len(rows), headers[0].width), dtype=np.float32)
    found = np.zeros(len(rows), dtype=bool)
    for file, group in matches.groupby(_FILE):
        positions = group[_POSITION].to_numpy()
        vectors[positions] = read_npy_rows(files[int(file)][0], headers[int(file)], group[_ROW].to_numpy())
        found[positions] = True
    usable = found & np.isfinite(vectors).all(axis=1)
    reasons = np.where(found, "the attached vector holds NaN or infinite values", f"no vector for this row in {path}")
    embedding_column, error_column = columns
    return rows.assign(
        **{
            embedding_column: pd.Series(to_embedding_array(vectors, usable), index=rows.index),
            error_column: pd.Series(pd.array(np.where(usable, None, reasons), dtype=STRING), index=rows.index),
        }
    )
