"""Exact top-k search over a dataset's saved embeddings: image -> image and text -> image.

The query is embedded on the client (one image or one text, on the CPU); each shard's task scores
its rows by cosine similarity (one matrix-vector product) and returns its own top k; the client
merges those ``k x shards`` rows.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.arguments import at_least
from dask_clip.columns import l2_normalize, unit_embeddings
from dask_clip.dataset.index_files import OpenedIndex, open_index
from dask_clip.errors import UsageError
from dask_clip.execution import ShardTask, compute, map_shards
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, decode_and_preprocess
from dask_clip.io.provenance import Computed
from dask_clip.io.shards import filesystem_of
from dask_clip.models.clip import ClipTextModel, ClipVisionModel, describe_image_model, describe_text_model

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


def search(
    dataset: ImageTextPairDataset,
    text: str | None = None,
    image: Any = None,
    k: int = 10,
    model_dir: str | None = None,
    embedding_column: str = "image_embedding",
    index: str | OpenedIndex | None = None,
    nprobe: int | None = None,
) -> pd.DataFrame:
    """The ``k`` rows whose embedding is most similar (cosine) to the query, best first.

    ``image`` is a path or URL, encoded bytes, a PIL image, or an embedding (``float (D,)``, used as
    is); ``text`` is a caption. Embedding a query needs ``model_dir`` (a CLIP ``save_pretrained``
    folder or hub id; text also needs its tokenizer files), by default the ``model_dir`` recorded
    with the embeddings. Rows without an embedding are never returned.

    By default every row is scored (exact). ``index``: the folder of an index that ``build_index`` wrote for
    this column (opened and checked against the dataset on each call), or one opened once with
    ``open_index`` for many queries; it answers approximately, scanning ``nprobe`` IVF lists (the index's
    default unless given).

    Returns a pandas frame: the id column, ``score`` (``float32`` cosine), ``stem`` and ``tar_url``
    of the shard holding the row.
    """
    if (text is None) == (image is None):
        raise UsageError("give exactly one of text= or image=")
    if nprobe is not None and index is None:
        raise UsageError(f"nprobe={nprobe} applies to an index search only: give index=, or leave nprobe out")
    at_least("k", k)
    width = dataset.embedding_width(embedding_column, "search")
    config = dataset.operation_config(embedding_column) or {}
    if isinstance(image, np.ndarray):
        query = np.asarray(image, dtype=np.float32).reshape(-1)
    else:
        model_dir = model_dir or config.get("model_dir")
        if model_dir is None:
            raise UsageError(f"no model_dir given and none is recorded with {embedding_column!r}: pass model_dir=")
        query = embed_text(text, model_dir) if text is not None else embed_image(image, model_dir, config)
    if query.shape != (width,):
        raise UsageError(f"the query embedding has shape {query.shape}; {embedding_column!r} holds vectors of {width}")
    if not np.isfinite(query).all() or not query.any():
        raise UsageError("the query embedding holds NaN or infinite values, or only zeros")
    query = l2_normalize(query[None, :])[0]
    if index is not None:
        if nprobe is not None:
            at_least("nprobe", nprobe)
        if isinstance(dataset.provenance.get(embedding_column), Computed):
            raise UsageError(
                f"{embedding_column!r} is computed in this run, not read from the shards' files that the index "
                "holds: save_metadata() and build the index again, or search without index="
            )
        opened = index if isinstance(index, OpenedIndex) else open_index(dataset, index, embedding_column)
        if opened.shards != dataset.shards or opened.manifest["column"] != embedding_column:
            raise UsageError(
                f"{opened.path}: opened for column {opened.manifest['column']!r} of other shards, "
                f"not for {embedding_column!r} of this dataset: open_index(dataset, path) for this one"
            )
        return opened.top_k(query, k, nprobe)

    id_col = dataset.id_col
    meta = pd.DataFrame(
        {
            id_col: pd.Series([], dtype=dataset.pandas_metadata.dtypes[id_col]),
            "score": pd.Series([], dtype="float32"),
            "stem": pd.Series([], dtype=object),
            "tar_url": pd.Series([], dtype=object),
        }
    )
    hits = map_shards(
        top_k_of_shard,
        dataset.pandas_metadata,
        dataset.shards,
        meta,
        id_col=id_col,
        label="search",
        query=query,
        k=k,
        embedding_column=embedding_column,
    )
    merged = compute(hits)
    return merged.sort_values(["score", id_col], ascending=[False, True], kind="stable").head(k).reset_index(drop=True)


def top_k_of_shard(
    rows: pd.DataFrame, task: ShardTask, query: np.ndarray, k: int, embedding_column: str
) -> pd.DataFrame:
    """One shard's ``k`` best rows for the unit ``float32 (D,)`` query (cosine with each L2-normalised row).

    Rows without a usable embedding (null, NaN or infinite values, or all zeros) are never returned.
    """
    usable, vectors = unit_embeddings(rows[embedding_column], query.shape[0], rows[task.id_col])
    present = np.flatnonzero(usable)
    scores = vectors @ query
    best = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    return pd.DataFrame(
        {
            task.id_col: rows[task.id_col].iloc[present[best]].reset_index(drop=True),
            "score": scores[best].astype(np.float32),
            "stem": task.shard.stem,
            "tar_url": task.shard.tar_url,
        }
    )


def read_image_query(image: Any) -> bytes:
    """A query image (path or URL, bytes, PIL image) as encoded bytes; ``UsageError`` for a path that names no file."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        fs, path = filesystem_of(os.fspath(image))
        if fs.isdir(path):
            raise UsageError(f"image {os.fspath(image)!r} is a folder, not an image file: give one image file")
        if not fs.isfile(path):
            raise UsageError(f"image {os.fspath(image)!r}: no such file: give the path or URL of an image file")
        with fs.open(path, "rb") as file:
            return file.read()
    from PIL import Image

    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    raise UsageError(f"image must be a path, bytes, a PIL image or a numpy vector, not {type(image).__name__}")


def embed_image(image: Any, model_dir: str, config: dict[str, Any]) -> np.ndarray:
    """The CLIP image embedding ``float32 (D,)`` of one query image, preprocessed as the embedder did
    (its decode mode; a ``device`` mode query is decoded on the host with the same pixels)."""
    described = describe_image_model(model_dir, DEFAULT_MAX_IMAGE_PIXELS)
    preprocess = described.preprocess.with_decode_mode(config.get("decode_mode") or "exact")
    model = ClipVisionModel(model_dir, "cpu", False, dataclasses.replace(described, preprocess=preprocess))
    return model.embed([decode_and_preprocess(read_image_query(image), preprocess)])[0]


def embed_text(text: str, model_dir: str) -> np.ndarray:
    """The CLIP text embedding ``float32 (D,)`` of one caption (text tower and tokenizer of ``model_dir``)."""
    return ClipTextModel(model_dir, "cpu", describe_text_model(model_dir)).embed([text])[0]
