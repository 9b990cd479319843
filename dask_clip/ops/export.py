"""Export embeddings in clip-retrieval's layout: ``img_emb/img_emb_{i}.npy`` + ``metadata/metadata_{i}.parquet``.

One pair per shard, written by the shard's own task. ``i`` is the shard's position in the dataset,
zero-padded as clip-retrieval pads it (to the number of digits of the shard count). Only rows with
an embedding are written, in the same order in both files; a shard with none writes no pair (as
clip-retrieval skips an empty partition).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from typing import TYPE_CHECKING

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.embeddings import embeddings_to_numpy
from dask_clip.io.shards import filesystem_of

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

DEFAULT_METADATA_COLUMNS = ("caption", "url")


def export_clip_retrieval(
    dataset: "ImageTextPairDataset",
    path: str,
    embedding_column: str = "image_embedding",
    metadata_columns: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Write each shard's embeddings as ``float16 (N, D)`` ``.npy`` and its ids (plus ``metadata_columns``,
    by default ``caption`` and ``url`` when present) as a parquet of ``N`` rows, in the same order.

    Returns one row per shard: ``stem``, ``index``, ``rows`` (embeddings written, 0 where no pair
    was written), ``embeddings_path`` and ``metadata_path`` (empty where no pair was written).
    """
    columns = list(dataset.pandas_metadata.columns)
    if embedding_column not in columns:
        raise ValueError(f"no embedding column {embedding_column!r}; the dataset has {columns}")
    if metadata_columns is None:
        extra = [c for c in DEFAULT_METADATA_COLUMNS if c in columns]
    else:
        unknown = [c for c in metadata_columns if c not in columns]
        if unknown:
            raise ValueError(f"unknown metadata columns {unknown}; the dataset has {columns}")
        extra = [c for c in metadata_columns if c != dataset.id_col]
    kept_columns = [dataset.id_col, *extra]
    digits = len(str(len(dataset.shards)))
    root = path.rstrip("/")
    fs, root_path = filesystem_of(root)
    for folder in ("img_emb", "metadata"):
        fs.makedirs(posixpath.join(root_path, folder), exist_ok=True)

    def write(rows: pd.DataFrame, shard: pd.DataFrame, partition_info: dict | None = None) -> pd.DataFrame:
        index = partition_info["number"] if partition_info else 0
        stem = shard["stem"].iloc[0]
        vectors = embeddings_to_numpy(rows[embedding_column])
        present = rows[embedding_column].notna().to_numpy(dtype=bool)
        summary = {"stem": stem, "index": index, "rows": int(present.sum()), "embeddings_path": "", "metadata_path": ""}
        if present.any():
            name = f"{index:0{digits}d}"
            summary["embeddings_path"] = posixpath.join(root, "img_emb", f"img_emb_{name}.npy")
            summary["metadata_path"] = posixpath.join(root, "metadata", f"metadata_{name}.parquet")
            buffer = io.BytesIO()
            np.save(buffer, vectors[present].astype(np.float16))
            with fs.open(filesystem_of(summary["embeddings_path"])[1], "wb") as file:
                file.write(buffer.getvalue())
            table = pa.Table.from_pandas(rows.loc[present, kept_columns], preserve_index=False)
            with fs.open(filesystem_of(summary["metadata_path"])[1], "wb") as file:
                pq.write_table(table.replace_schema_metadata(None), file)
        return pd.DataFrame([summary])

    meta = pd.DataFrame(
        {"stem": [""], "index": [0], "rows": [0], "embeddings_path": [""], "metadata_path": [""]}
    ).iloc[:0]
    written = dd.map_partitions(
        write, dataset.pandas_metadata, dataset.shard_frame(), meta=meta, align_dataframes=False, enforce_metadata=False
    )
    return dataset._compute(written).reset_index(drop=True)
