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

from dask_clip.arguments import at_least, model_id
from dask_clip.columns import l2_normalize, unit_embeddings
from dask_clip.dataset.consistency import check_consumed, contents_checked
from dask_clip.dataset.index_files import OpenedIndex, open_index
from dask_clip.errors import UsageError
from dask_clip.execution import ShardTask, compute
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, decode_and_preprocess
from dask_clip.io.shards import filesystem_of
from dask_clip.models.clip import (
    ClipTextModel,
    ClipVisionModel,
    ImageModelDescription,
    TextModelDescription,
    describe_image_model,
    describe_text_model,
    model_identity,
)
from dask_clip.models.loading import resolved_model_path, same_weights
from dask_clip.provenance import Computed, describe_operation, digest

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
    is, of the column's width); ``text`` is a caption. A query is embedded in the column's own space: by the
    model recorded with the embeddings (every shard must record the same one), with its text tower for
    ``text`` (which needs its tokenizer files). ``model_dir`` (a ``save_pretrained`` folder or hub id) may
    name that model; one of another family, width or weights is refused (``UsageError``, naming both).
    Embeddings that the shards' files do not hold from one run over their current rows (two models after an
    interrupted switch) are refused (``MixedProvenanceError``). Rows without an embedding are never returned.

    By default every row is scored (exact). ``index``: the folder of an index that ``build_index`` wrote for
    this column (opened and checked against the dataset on each call), or one opened once with
    ``open_index`` for many queries; it answers approximately, scanning ``nprobe`` IVF lists (the index's
    default unless given).

    Returns a pandas frame: the id column, ``score`` (``float32`` cosine), ``stem`` and ``tar_url``
    of the shard holding the row.
    ``dask_clip.show(frame, dataset)`` draws it as a grid of thumbnails in Jupyter.
    """
    if (text is None) == (image is None):
        raise UsageError("give exactly one of text= or image=")
    if nprobe is not None and index is None:
        raise UsageError(f"nprobe={nprobe} applies to an index search only: give index=, or leave nprobe out")
    at_least("k", k)
    width = dataset.embedding_width(embedding_column, "search")
    if index is None:
        config = check_consumed(dataset, [embedding_column], "search")[embedding_column]
        dataset = contents_checked(dataset, [embedding_column], "search")
    else:  # an opened index was checked against the shards' files (and its build, their provenance)
        opened = opened_index(dataset, index, embedding_column, nprobe)
        config = opened.manifest.get("embedding_operation")
    query = query_vector(text, image, model_dir, embedding_column, config or {}, width)
    if index is not None:
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
    hits = dataset.map_shards(
        top_k_of_shard,
        meta,
        label="search",
        query=query,
        k=k,
        embedding_column=embedding_column,
    )
    merged = compute(hits)
    return merged.sort_values(["score", id_col], ascending=[False, True], kind="stable").head(k).reset_index(drop=True)


def opened_index(
    dataset: ImageTextPairDataset, index: str | OpenedIndex, embedding_column: str, nprobe: int | None
) -> OpenedIndex:
    """``index`` opened for ``embedding_column`` of ``dataset`` (``StaleIndexError`` when the dataset changed since)."""
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
    return opened


def query_vector(
    text: str | None, image: Any, model_dir: str | None, column: str, recorded: dict[str, Any], width: int | None
) -> np.ndarray:
    """The unit ``float32 (D,)`` query: ``image`` as given when it is a vector, else ``text`` or ``image`` embedded
    by the model ``recorded`` for ``column`` (``model_dir`` by default; another model is a ``UsageError``)."""
    if isinstance(image, np.ndarray):
        query = np.asarray(image, dtype=np.float32).reshape(-1)
    else:
        if model_dir is not None:
            model_dir = resolved_model_path(model_id("model_dir", model_dir))
        model_dir = model_dir or recorded.get("model_dir")
        if model_dir is None:
            raise UsageError(f"no model_dir given and none is recorded with {column!r}: pass model_dir=")
        if text is not None:
            described = describe_text_model(model_dir)
            check_query_model(column, recorded, width, model_dir, described)
            query = ClipTextModel(model_dir, "cpu", described).embed([text])[0]
        else:
            described = describe_image_model(model_dir, DEFAULT_MAX_IMAGE_PIXELS)
            check_query_model(column, recorded, width, model_dir, described)
            query = embed_image(image, model_dir, described, recorded)
    if query.shape != (width,):
        raise UsageError(f"the query embedding has shape {query.shape}; {column!r} holds vectors of {width}")
    if not np.isfinite(query).all() or not query.any():
        raise UsageError("the query embedding holds NaN or infinite values, or only zeros")
    return l2_normalize(query[None, :])[0]


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


def check_query_model(
    column: str,
    recorded: dict[str, Any],
    width: int | None,
    model_dir: str,
    described: ImageModelDescription | TextModelDescription,
) -> None:
    """``UsageError`` (naming both) unless ``model_dir`` is the model whose identity ``recorded`` (the column's
    configuration) holds: the same id, family, width and weights (files added since, such as a tokenizer, do
    not count). A column whose record names no model (attached vectors, an older dask_clip) is checked by width."""
    query = {**model_identity(model_dir, described.family), "embedding_dim": described.width}
    names_a_model = any(key in recorded for key in ("model_dir", "model_name"))
    if not names_a_model and width in (None, described.width):
        return
    same = (
        names_a_model
        and all(recorded.get(key) == query[key] for key in ("model_dir", "family"))
        and recorded.get("embedding_dim", width) == described.width
        and same_weights(recorded.get("model_version") or {}, query["model_version"])
    )
    if not same:
        raise UsageError(
            f"the query would be embedded by another model than the one that embedded {column!r}, so it would be "
            f"compared in another space: recorded: {_identity(recorded, width)}; query: {_identity(query, width)}. "
            f"Leave model_dir out to use the recorded model, or embed the column again with {model_dir!r}"
        )


def _identity(operation: dict[str, Any], width: int | None) -> str:
    """A model's identity on one line: ``model_dir='m', family CLIP, 32-d, weights 1a2b3c4d``."""
    if "model_dir" not in operation:
        return describe_operation(operation or None) + (f", {width}-d" if width else "")
    dim = operation.get("embedding_dim", width)
    return (
        f"model_dir={operation['model_dir']!r}, family {operation.get('family')}, {dim}-d, "
        f"weights {digest(operation.get('model_version'))[:8]}"
    )


def embed_image(image: Any, model_dir: str, described: ImageModelDescription, config: dict[str, Any]) -> np.ndarray:
    """The CLIP image embedding ``float32 (D,)`` of one query image, preprocessed as the embedder did
    (its decode mode; a ``device`` mode query is decoded on the host with the same pixels)."""
    model = image_model_for(model_dir, described, config)
    return model.embed([decode_and_preprocess(read_image_query(image), model.preprocess)])[0]


def image_model_for(
    model_dir: str, described: ImageModelDescription, config: dict[str, Any], device: str = "cpu"
) -> ClipVisionModel:
    """The image tower of ``model_dir`` on ``device``, preprocessing as the embedder whose configuration is
    ``config`` did (its decode mode: ``model.preprocess``), to embed images in a column's space."""
    preprocess = described.preprocess.with_decode_mode(config.get("decode_mode") or "exact")
    return ClipVisionModel(model_dir, device, False, dataclasses.replace(described, preprocess=preprocess))
