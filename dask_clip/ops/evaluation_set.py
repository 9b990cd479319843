"""The evaluation side of decontamination: named unit vectors in a training column's space, and what identifies them.

``load_evaluation_set(against, ...)`` reads one of

- **a folder of images** (any depth; ``.jpg .jpeg .png .webp .bmp .gif .tif .tiff``, hidden files skipped, any
  other file refused): each embedded by the model recorded with the training column, preprocessed as the embedder
  did; an item's name is its path in the folder (``val/0001.jpg``);
- **another dask_clip dataset** (an ``ImageTextPairDataset``, or the folder of its shards): its embedding column,
  which must record the same model as the training column; an item's name is ``<stem>/<id>``; its rows without
  a usable embedding are counted, not compared;
- **an embeddings file**: ``NAME.npy`` (``float (m, D)``) with ``NAME.txt`` beside it (one item name a line, ``m``
  lines, UTF-8), or a ``.parquet`` file with a ``name`` (string) and an ``embedding`` (list of floats) column. No
  model is recorded in such a file: only its width is checked.

Names must be unique; every vector must be finite and non-zero. Bad input is a ``UsageError`` (or the
``ImageDecodeError`` of an unreadable image) naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.arguments import model_id
from dask_clip.columns import STRING, embeddings_to_numpy, empty_column, l2_normalize, unit_embeddings
from dask_clip.dataset.consistency import check_consumed
from dask_clip.dataset.search import check_query_model, image_model_for
from dask_clip.errors import ImageDecodeError, UsageError
from dask_clip.execution import ShardTask, compute
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, decode_and_preprocess
from dask_clip.io.shards import filesystem_of, resolved_url
from dask_clip.models.clip import describe_image_model
from dask_clip.models.loading import resolved_model_path, same_weights
from dask_clip.provenance import digest

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBED_BATCH = 32
"""Evaluation images preprocessed and embedded at a time."""
MODEL_KEYS = ("model_dir", "family", "embedding_dim", "model_version")
"""What a column's record says of the model that embedded it (``model_identity`` and the width)."""


@dataclass(frozen=True, eq=False)
class EvaluationSet:
    """``names`` (``m`` unique strings) and their unit ``vectors`` (``float32 (m, D)``); ``identity`` is what
    provenance records of them: ``kind`` (``images``, ``dataset``, ``embeddings``), ``path``, ``items`` and a
    ``digest`` of their contents (files' bytes, or a dataset's names and vectors)."""

    names: tuple[str, ...]
    vectors: np.ndarray
    identity: dict[str, Any]


def load_evaluation_set(
    against: Any,
    dataset: ImageTextPairDataset,
    column: str,
    width: int,
    *,
    against_column: str | None = None,
    model_dir: str | None = None,
    device: str = "cpu",
) -> EvaluationSet:
    """The evaluation set ``against`` names (module docstring), in the space of ``dataset``'s ``column``
    (``width``-d): a dataset's ``against_column`` (default: ``column``); images embedded by the column's recorded
    model (``model_dir`` may name it: another is refused) on ``device``."""
    from dask_clip.dataset import ImageTextPairDataset

    recorded = dataset.operation_config(column) or {}
    if isinstance(against, ImageTextPairDataset):
        return _from_dataset(against, against_column or column, column, recorded, width)
    if not isinstance(against, (str, os.PathLike)):
        raise UsageError(f"against must be a path or an ImageTextPairDataset, not {type(against).__name__}")
    url = resolved_url(os.fspath(against))
    fs, path = filesystem_of(url)
    if fs.isfile(path):
        if path.endswith(".npy"):
            return _from_npy(url, width)
        if path.endswith(".parquet"):
            return _from_parquet(url, width)
        raise UsageError(f"{url}: an evaluation file must be a .npy (with its .txt of names) or a .parquet file")
    if not fs.isdir(path):
        raise UsageError(f"{url}: no such file or folder")
    if any(name.endswith(".parquet") for name in fs.ls(path, detail=False)):
        evaluation = ImageTextPairDataset.from_webdataset(url, id_col=dataset.id_col)
        return _from_dataset(evaluation, against_column or column, column, recorded, width)
    return _from_images(url, column, recorded, width, model_dir, device)


def _from_images(
    url: str, column: str, recorded: dict[str, Any], width: int, model_dir: str | None, device: str
) -> EvaluationSet:
    fs, root = filesystem_of(url)
    files = sorted(
        posixpath.relpath(found, root)
        for found in fs.find(root)
        if not any(part.startswith(".") for part in posixpath.relpath(found, root).split("/"))
    )
    others = [name for name in files if not name.lower().endswith(IMAGE_SUFFIXES)]
    if others:
        raise UsageError(
            f"{url}: {len(others)} files are not images ({', '.join(others[:5])}): an evaluation folder holds "
            f"images only ({' '.join(IMAGE_SUFFIXES)}); move the others out"
        )
    if not files:
        raise UsageError(f"{url}: no images in this folder")
    model_dir = resolved_model_path(model_id("model_dir", model_dir)) if model_dir else recorded.get("model_dir")
    if model_dir is None:
        raise UsageError(
            f"no model is recorded with {column!r} to embed the images of {url}: pass model_dir=, or give the "
            "evaluation set as embeddings (a .npy or .parquet file) or as a dataset"
        )
    described = describe_image_model(model_dir, DEFAULT_MAX_IMAGE_PIXELS)
    check_query_model(column, recorded, width, model_dir, described)
    model = image_model_for(model_dir, described, recorded, device)
    hashes, vectors = [], []
    for start in range(0, len(files), EMBED_BATCH):
        pixels = []
        for name in files[start : start + EMBED_BATCH]:
            with fs.open(posixpath.join(root, name), "rb") as file:
                data = file.read()
            hashes.append([name, hashlib.sha256(data).hexdigest()])
            try:
                pixels.append(decode_and_preprocess(data, model.preprocess))
            except ImageDecodeError as error:
                raise ImageDecodeError(f"{posixpath.join(url, name)}: {error}") from None
        vectors.append(model.embed(pixels))
    identity = {"kind": "images", "path": url, "items": len(files), "digest": digest(hashes)}
    return _checked(tuple(files), np.concatenate(vectors), identity, url, width)


def _from_dataset(
    evaluation: ImageTextPairDataset, against_column: str, column: str, recorded: dict[str, Any], width: int
) -> EvaluationSet:
    config = check_consumed(evaluation, [against_column], "decontaminate")[against_column] or {}
    check_same_model(column, recorded, f"{against_column!r} of {evaluation.path}", config)
    meta = pd.DataFrame({"name": empty_column(STRING), "vector": empty_column(object)})
    rows = compute(evaluation.map_shards(_named_vectors, meta, label="decontaminate-against", column=against_column))
    names = rows["name"].astype(str).tolist()
    usable, vectors = unit_embeddings(rows["vector"], None, rows["name"]) if len(rows) else (np.zeros(0, bool), None)
    if vectors is None or not len(vectors):
        raise UsageError(f"{evaluation.path}: no row holds an embedding in {against_column!r}")
    kept = tuple(name for name, ok in zip(names, usable, strict=True) if ok)
    identity = {
        "kind": "dataset",
        "path": resolved_url(evaluation.path),
        "column": against_column,
        "items": len(kept),
        "without_embedding": int((~usable).sum()),
        "digest": digest([list(kept), hashlib.sha256(vectors.tobytes()).hexdigest()]),
    }
    return _checked(kept, vectors, identity, evaluation.path, width)


def _named_vectors(rows: pd.DataFrame, task: ShardTask, column: str) -> pd.DataFrame:
    """One shard's rows as ``<stem>/<id>`` names and their vectors (``float32`` arrays; NaN where none)."""
    vectors = embeddings_to_numpy(rows[column], None, rows[task.id_col])
    return pd.DataFrame(
        {
            "name": pd.array([f"{task.shard.stem}/{key}" for key in rows[task.id_col]], dtype=STRING),
            "vector": pd.Series(list(vectors), dtype=object),
        }
    )


def check_same_model(column: str, recorded: dict[str, Any], other: str, other_config: dict[str, Any]) -> None:
    """``UsageError`` (naming both) unless ``other_config`` records the model ``recorded`` records for ``column``:
    the same id, family, width and weights. Two columns that record no model (attached vectors) are compared by
    width alone, later."""
    mine = {key: recorded.get(key) for key in MODEL_KEYS}
    theirs = {key: other_config.get(key) for key in MODEL_KEYS}
    if mine["model_dir"] is None and theirs["model_dir"] is None:
        return
    same = all(mine[key] == theirs[key] for key in ("model_dir", "family", "embedding_dim")) and same_weights(
        mine["model_version"] or {}, theirs["model_version"] or {}
    )
    if not same:
        raise UsageError(
            f"{other} was embedded by another model than {column!r}, so they cannot be compared: {column!r}: "
            f"{_model(mine)}; {other}: {_model(theirs)}. Embed the evaluation set with the same model"
        )


def _model(identity: dict[str, Any]) -> str:
    if identity["model_dir"] is None:
        return "no model recorded"
    return (
        f"model_dir={identity['model_dir']!r}, family {identity['family']}, {identity['embedding_dim']}-d, "
        f"weights {digest(identity['model_version'])[:8]}"
    )


def _from_npy(url: str, width: int) -> EvaluationSet:
    names_url = url.removesuffix(".npy") + ".txt"
    fs, path = filesystem_of(url)
    data = fs.cat_file(path)
    try:
        vectors = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as error:
        raise UsageError(f"{url}: not a .npy array of floats: {error}") from None
    names_fs, names_path = filesystem_of(names_url)
    if not names_fs.isfile(names_path):
        raise UsageError(f"{url}: its item names are missing: expected {names_url}, one name a line")
    text = names_fs.cat_file(names_path)
    names = tuple(text.decode("utf-8").splitlines())
    if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.floating):
        raise UsageError(f"{url}: holds a {vectors.dtype} array of shape {vectors.shape}, not floats of shape (m, D)")
    if len(names) != len(vectors):
        raise UsageError(f"{url}: {len(vectors)} vectors but {names_url} names {len(names)} items")
    identity = {
        "kind": "embeddings",
        "path": url,
        "items": len(names),
        "digest": digest([hashlib.sha256(data).hexdigest(), hashlib.sha256(text).hexdigest()]),
    }
    return _checked(names, vectors, identity, url, width)


def _from_parquet(url: str, width: int) -> EvaluationSet:
    fs, path = filesystem_of(url)
    data = fs.cat_file(path)
    table = pq.read_table(io.BytesIO(data))
    missing = [name for name in ("name", "embedding") if name not in table.column_names]
    if missing:
        raise UsageError(f"{url}: no column {missing}; an evaluation parquet has 'name' and 'embedding' columns")
    frame = table.select(["name", "embedding"]).to_pandas(types_mapper=pd.ArrowDtype)
    try:
        vectors = embeddings_to_numpy(frame["embedding"], None, frame["name"])
    except ValueError as error:
        raise UsageError(f"{url}: {error}") from None
    identity = {"kind": "embeddings", "path": url, "items": len(frame), "digest": hashlib.sha256(data).hexdigest()}
    return _checked(tuple(frame["name"].astype(str)), vectors, identity, url, width)


def _checked(names: tuple[str, ...], vectors: np.ndarray, identity: dict[str, Any], source: str, width: int):
    """``EvaluationSet`` of ``names`` and their vectors normalised, once their count, width, values and names are
    checked (``UsageError`` naming ``source`` and the first bad item otherwise)."""
    if not len(names):
        raise UsageError(f"{source}: the evaluation set is empty")
    if vectors.shape[1] != width:
        raise UsageError(
            f"{source}: holds {vectors.shape[1]}-d vectors, and the training column {width}-d ones: "
            "they come from different models"
        )
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise UsageError(f"{source}: item {names[bad[0]]!r} (and {len(bad) - 1} more) has NaN, infinite or zero values")
    repeated = pd.Index(names)[pd.Index(names).duplicated()]
    if len(repeated):
        raise UsageError(f"{source}: item names repeat ({', '.join(map(repr, repeated[:5]))}): names must be unique")
    return EvaluationSet(names, l2_normalize(vectors), identity)
