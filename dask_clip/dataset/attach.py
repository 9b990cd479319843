"""Attach embeddings computed elsewhere, in clip-retrieval's layout, to a dataset's rows.

LAION published its CLIP embeddings as ``img_emb/img_emb_{i}.npy`` (rows of vectors) with
``metadata/metadata_{i}.parquet`` (one row per vector, in the same order), and ``export_clip_retrieval``
writes the same layout. ``attach_embeddings`` joins those vectors to the shards' rows by id (or by url,
where the ids differ), without embedding anything:

1. each metadata parquet's task lists its join keys with their file and row; each shard's task lists its
   rows' keys with their shard and position;
2. a Dask shuffle joins the two lists on the key, and the matches go back to their shard;
3. each shard's task reads its rows' vectors from the ``.npy`` files (only those rows) and joins them.

A row without a vector gets a reason; a key with two vectors is an error naming both files. The
columns' provenance records the path, the files' sizes and dates, and the join column's values.
"""

from __future__ import annotations

import posixpath
import unicodedata
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.columns import STRING, embedding_dtype, empty_column, to_embedding_array
from dask_clip.errors import ColumnError, DataError, DatasetLayoutError
from dask_clip.execution import ShardTask, failures_named, map_shards, shuffle_to_shards
from dask_clip.io.npy import read_npy_header, read_npy_rows
from dask_clip.io.provenance import Computed, Plain, digest, file_identity
from dask_clip.io.shards import as_url, filesystem_of, protocol_of

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

_KEY, _SHARD, _POSITION, _FILE, _ROW = "_dask_clip_key", "_dask_clip_shard", "_dask_clip_position", "_file", "_row"


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


def attach_embeddings(
    dataset: ImageTextPairDataset,
    path: str,
    *,
    on: str | None = None,
    source_column: str | None = None,
    embedding_column: str = "image_embedding",
    error_column: str | None = None,
) -> ImageTextPairDataset:
    """A new dataset whose ``embedding_column`` holds the vectors found under ``path`` (clip-retrieval's layout),
    joined to rows by column ``on`` (the id column by default; ``"url"`` where the ids differ) matched against
    ``source_column`` of the metadata parquets (by default the same name; the id column is also found
    under ``key``). Keys are compared as NFC-normalised text. Vectors are stored as ``float32``; a row without
    one gets a null and a reason in ``error_column`` (``embedding_error`` for ``image_embedding``, else
    ``<embedding_column>_error``), which this replaces too."""
    on = on or dataset.id_col
    error_column = error_column or (
        "embedding_error" if embedding_column == "image_embedding" else f"{embedding_column}_error"
    )
    source_column = source_column or on
    if on not in dataset.meta.columns:
        raise ColumnError(f"attach_embeddings joins on column {on!r}, which the dataset lacks")
    files = embedding_files(path)
    headers = [read_npy_header(vectors) for vectors, _ in files]
    widths = {header.width for header in headers}
    if len(widths) != 1:
        raise DataError(f"{path}: its .npy files hold vectors of different widths {sorted(widths)}")
    sources = _source_columns(files, source_column, on == dataset.id_col)
    fs = filesystem_of(path)[0]
    versions = [[file_identity(fs.info(filesystem_of(url)[1])) for url in pair] for pair in files]
    operation = {
        "function": "attach_embeddings",
        "path": path.rstrip("/"),
        "files": digest(versions),
        "on": on,
        "source_column": sources[0][1],
    }
    source = Computed(
        operation, {on: dataset.provenance.get(on) or Plain(on)}, reasons={embedding_column: error_column}
    )

    numbered = [(index, metadata, column) for index, (metadata, column) in enumerate(sources)]
    keys = dd.from_map(_file_keys, numbered, meta=_KEYS_META, label="embedding-keys", enforce_metadata=False)
    rows_meta = pd.DataFrame(
        {_KEY: empty_column(STRING), _SHARD: empty_column("int64"), _POSITION: empty_column("int64")}
    )
    rows = map_shards(_row_keys, dataset.pandas_metadata, dataset.shards, rows_meta, id_col=dataset.id_col, on=on)
    matches = rows.merge(keys, on=_KEY, how="inner", shuffle_method="tasks")
    by_shard = shuffle_to_shards(matches, _SHARD, len(dataset.shards))
    width = widths.pop()
    output_meta = dataset.meta.assign(
        **{embedding_column: empty_column(embedding_dtype(width)), error_column: empty_column(STRING)}
    )
    frame = map_shards(
        _join_vectors,
        dataset.pandas_metadata,
        dataset.shards,
        output_meta,
        by_shard,
        id_col=dataset.id_col,
        label="attach-embeddings",
        files=files,
        headers=headers,
        columns=(embedding_column, error_column),
        path=path,
    )
    return dataset.with_metadata(frame, dict.fromkeys((embedding_column, error_column), source))


_KEYS_META = pd.DataFrame({_KEY: empty_column(STRING), _FILE: empty_column("int64"), _ROW: empty_column("int64")})


def _source_columns(files: list[tuple[str, str]], column: str, is_id: bool) -> list[tuple[str, str]]:
    """For each metadata parquet, the column its keys are in: ``column``, or ``key`` for the id column."""
    found = []
    for _, metadata in files:
        fs, file_path = filesystem_of(metadata)
        with fs.open(file_path, "rb") as file:
            names = pq.read_schema(file).names
        name = column if column in names else "key" if is_id and "key" in names else None
        if name is None:
            raise ColumnError(f"{metadata}: no column {column!r} to join on; its columns are {names}")
        found.append((metadata, name))
    return found


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
            _SHARD: np.full(int(present.sum()), task.shard.index, dtype=np.int64),
            _POSITION: np.flatnonzero(present).astype(np.int64),
        }
    )


def _join_vectors(
    rows: pd.DataFrame,
    task: ShardTask,
    matches: pd.DataFrame,
    files: list[tuple[str, str]],
    headers: list[Any],
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
