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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.columns import embeddings_to_numpy
from dask_clip.dataset.consistency import check_consumed, contents_checked
from dask_clip.errors import ColumnError
from dask_clip.execution import ShardTask, compute
from dask_clip.io.atomic import atomic_write
from dask_clip.io.output_folder import OutputKind, replacing_folder

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

OUTPUT = OutputKind("export_clip_retrieval", ("img_emb/img_emb_*.npy", "metadata/metadata_*.parquet"))
DEFAULT_METADATA_COLUMNS = ("caption", "url")
SUMMARY_META = pd.DataFrame(
    {"stem": [""], "index": [0], "rows": [0], "not_finite": [0], "embeddings_path": [""], "metadata_path": [""]}
).iloc[:0]


def export_clip_retrieval(
    dataset: ImageTextPairDataset,
    path: str,
    embedding_column: str = "image_embedding",
    metadata_columns: Sequence[str] | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write each shard's embeddings as ``float16 (N, D)`` ``.npy`` and its ids (plus ``metadata_columns``,
    by default ``caption`` and ``url`` when present) as a parquet of ``N`` rows, in the same order.

    A vector that is null, or holds a NaN or an infinity (in float16 too), is not an embedding: its row is
    left out of both files and counted in ``not_finite`` (nulls are not counted). ``path`` is written as a
    whole (``io.output_folder``): never the dataset's folder, one inside it or above it; a folder that is not
    empty is refused unless ``overwrite=True`` and an earlier export wrote it, and is then replaced once the
    export is complete (no file of an earlier export survives).
    Embeddings that the shards' files do not hold from one run over their current rows (two models after an
    interrupted switch: ``dataset.consistency``) are refused, before anything is written.

    Returns one row per shard: ``stem``, ``index``, ``rows`` (embeddings written, 0 where no pair
    was written), ``not_finite``, ``embeddings_path`` and ``metadata_path`` (empty where no pair was written).
    """
    meta = dataset.pandas_metadata._meta
    width = dataset.embedding_width(embedding_column, "export_clip_retrieval")
    check_consumed(dataset, [embedding_column], "export_clip_retrieval")
    dataset = contents_checked(dataset, [embedding_column], "export_clip_retrieval")
    columns = list(meta.columns)
    if metadata_columns is None:
        extra = [c for c in DEFAULT_METADATA_COLUMNS if c in columns]
    else:
        unknown = [c for c in metadata_columns if c not in columns]
        if unknown:
            raise ColumnError(f"unknown metadata columns {unknown}; the dataset has {columns}")
        extra = [c for c in metadata_columns if c != dataset.id_col]
    root = path.rstrip("/")
    with replacing_folder(root, overwrite, OUTPUT, dataset.path) as fresh:
        written = dataset.map_shards(
            _write_pair,
            SUMMARY_META,
            label="export-clip-retrieval",
            folder=fresh,
            root=root,
            embedding_column=embedding_column,
            width=width,
            columns=[dataset.id_col, *extra],
            digits=len(str(len(dataset.shards))),
        )
        summary = compute(written).reset_index(drop=True)
    return summary


def _write_pair(
    rows: pd.DataFrame,
    task: ShardTask,
    folder: str,
    root: str,
    embedding_column: str,
    width: int | None,
    columns: list[str],
    digits: int,
) -> pd.DataFrame:
    """One shard's ``.npy`` + ``.parquet`` pair in ``folder`` (none when it has no embedding) -> its summary
    row, naming the files as they will be in ``root``."""
    index = task.shard.index
    vectors = embeddings_to_numpy(rows[embedding_column], width, rows[task.id_col]).astype(np.float16)
    present = rows[embedding_column].notna().to_numpy(dtype=bool)
    usable = present & np.isfinite(vectors).all(axis=1)
    name = f"{index:0{digits}d}"
    files = {"embeddings_path": f"img_emb/img_emb_{name}.npy", "metadata_path": f"metadata/metadata_{name}.parquet"}
    summary = {
        "stem": task.shard.stem,
        "index": index,
        "rows": int(usable.sum()),
        "not_finite": int((present & ~usable).sum()),
    }
    if not usable.any():
        return pd.DataFrame([{**summary, **dict.fromkeys(files, "")}])
    with atomic_write(posixpath.join(folder, files["embeddings_path"])) as file:
        buffer = io.BytesIO()
        np.save(buffer, vectors[usable])
        file.write(buffer.getvalue())
    table = pa.Table.from_pandas(rows.loc[usable, columns], preserve_index=False)
    with atomic_write(posixpath.join(folder, files["metadata_path"])) as file:
        pq.write_table(table.replace_schema_metadata(None), file)
    return pd.DataFrame([{**summary, **{key: posixpath.join(root, value) for key, value in files.items()}}])
