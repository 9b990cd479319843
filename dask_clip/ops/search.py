"""Exact top-k search over a dataset's saved embeddings: image -> image and text -> image.

The query is embedded on the client (one image or one text, on the CPU); each shard's task scores
its rows by cosine similarity (one matrix-vector product) and returns its own top k; the client
merges those ``k x shards`` rows.
"""

from __future__ import annotations

import io
import os
from typing import TYPE_CHECKING, Any

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.embeddings import embeddings_to_numpy
from dask_clip.io.shards import filesystem_of

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


def search(
    dataset: "ImageTextPairDataset",
    text: str | None = None,
    image: Any = None,
    k: int = 10,
    model_dir: str | None = None,
    embedding_column: str = "image_embedding",
) -> pd.DataFrame:
    """The ``k`` rows whose embedding is most similar (cosine) to the query, best first.

    ``image`` is a path or URL, encoded bytes, a PIL image, or an embedding (``float (D,)``, used as
    is); ``text`` is a caption. Embedding a query needs ``model_dir`` (a CLIP ``save_pretrained``
    folder or hub id; text also needs its tokenizer files), by default the ``model_dir`` recorded
    with the embeddings. Rows without an embedding are never returned.

    Returns a pandas frame: the id column, ``score`` (``float32`` cosine), ``stem`` and ``tar_url``
    of the shard holding the row.
    """
    if (text is None) == (image is None):
        raise ValueError("give exactly one of text= or image=")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    dtype = dataset.pandas_metadata.dtypes.get(embedding_column)
    if dtype is None:
        raise ValueError(f"no embedding column {embedding_column!r}; the dataset has {list(dataset.pandas_metadata.columns)}")
    if not (isinstance(dtype, pd.ArrowDtype) and pa.types.is_fixed_size_list(dtype.pyarrow_dtype)):
        raise TypeError(f"{embedding_column!r} is {dtype}, not an embedding column (fixed_size_list<float>)")
    width = dtype.pyarrow_dtype.list_size
    config = dict(dataset.derived_columns.get(embedding_column) or {})
    if isinstance(image, np.ndarray):
        query = np.asarray(image, dtype=np.float32).reshape(-1)
    else:
        model_dir = model_dir or config.get("model_dir")
        if model_dir is None:
            raise ValueError(f"no model_dir given and none is recorded with {embedding_column!r}: pass model_dir=")
        query = embed_text(text, model_dir) if text is not None else embed_image(image, model_dir, config)
    if query.shape != (width,):
        raise ValueError(f"the query embedding has shape {query.shape}; {embedding_column!r} holds vectors of {width}")
    query = query / max(float(np.linalg.norm(query)), 1e-12)

    id_col = dataset.id_col
    meta = pd.DataFrame(
        {
            id_col: pd.Series([], dtype=dataset.pandas_metadata.dtypes[id_col]),
            "score": pd.Series([], dtype="float32"),
            "stem": pd.Series([], dtype=object),
            "tar_url": pd.Series([], dtype=object),
        }
    )
    hits = dd.map_partitions(
        top_k_of_shard, dataset.pandas_metadata, dataset.shard_frame(), query, k, id_col, embedding_column,
        meta=meta, align_dataframes=False, enforce_metadata=False,
    )
    merged = dataset._compute(hits)
    return merged.sort_values(["score", id_col], ascending=[False, True], kind="stable").head(k).reset_index(drop=True)


def top_k_of_shard(
    rows: pd.DataFrame, shard: pd.DataFrame, query: np.ndarray, k: int, id_col: str, embedding_column: str
) -> pd.DataFrame:
    """One shard's ``k`` best rows for the unit ``float32 (D,)`` query (cosine with each L2-normalised row)."""
    vectors = embeddings_to_numpy(rows[embedding_column])
    present = np.flatnonzero(rows[embedding_column].notna().to_numpy(dtype=bool))
    vectors = vectors[present]
    norms = np.linalg.norm(vectors, axis=1)
    scores = (vectors @ query) / np.where(norms == 0, 1, norms)
    best = np.argpartition(-scores, k - 1)[:k] if len(scores) > k else np.arange(len(scores))
    return pd.DataFrame(
        {
            id_col: rows[id_col].iloc[present[best]].reset_index(drop=True),
            "score": scores[best].astype(np.float32),
            "stem": shard["stem"].iloc[0],
            "tar_url": shard["tar_url"].iloc[0],
        }
    )


def read_image_query(image: Any) -> bytes:
    """A query image (path or URL, bytes, PIL image) as encoded bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        fs, path = filesystem_of(os.fspath(image))
        with fs.open(path, "rb") as file:
            return file.read()
    from PIL import Image

    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()
    raise TypeError(f"image must be a path, bytes, a PIL image or a numpy vector, not {type(image).__name__}")


def embed_image(image: Any, model_dir: str, config: dict[str, Any]) -> np.ndarray:
    """The CLIP image embedding ``float32 (D,)`` of one query image, preprocessed as the embedder did."""
    from dask_clip.embedders.clip import ClipVisionModel
    from dask_clip.embedders.image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS, decode_and_preprocess

    model = ClipVisionModel(
        model_dir, "cpu", autocast=False, max_image_pixels=DEFAULT_MAX_IMAGE_PIXELS,
        decode_mode=config.get("decode_mode") or "exact",
    )
    pixels = decode_and_preprocess(read_image_query(image), model.preprocess)
    return model.embed([pixels])[0]


def embed_text(text: str, model_dir: str) -> np.ndarray:
    """The CLIP text embedding ``float32 (D,)`` of one caption (text tower and tokenizer of ``model_dir``)."""
    from dask_clip.embedders.clip_text import ClipTextModel

    return ClipTextModel(model_dir, "cpu").embed([text])[0]
