"""What every image embedder shares: mapping itself over a dataset's shards, streaming each tar
through a decode thread pool into batched inference, and joining the embeddings to rows by id.

A subclass says how to load its model (``load_model``) and how wide its embeddings are
(``embedding_dim``); everything about shards, rows, errors and caching lives here.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.distributed.model_cache import get_or_load
from dask_clip.embedders.device_decode import (
    EncodedJpeg,
    check_device_decode_available,
    decode_on_device,
    prepare_image,
)
from dask_clip.embedders.image_preprocessing import DECODE_MODES, ImageDecodeError, PreprocessConfig
from dask_clip.embeddings import embedding_dtype, to_embedding_array
from dask_clip.io.tar_samples import Sample, ShardReadError, iter_tar_samples

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm")
ERROR_POLICIES = ("record", "raise")
TIMINGS_ATTR = "dask_clip_timings"
"""Key in a shard frame's ``attrs`` of its stage timings in seconds: ``load_s`` (model from the
cache or loaded), ``wait_s`` (inference waiting for decoded images: reading and decoding not hidden
by the decode threads), ``decode_s`` (decode thread time, summed over threads, plus decoding on the
model's device) and ``infer_s``."""
T = TypeVar("T")
R = TypeVar("R")


class LoadedImageModel(ABC):
    """A model ready on its device: how it wants its pixels, and a batch -> embeddings function."""

    preprocess: PreprocessConfig
    device: Any
    """The torch device the model runs on (where ``decode_mode="device"`` decodes JPEGs)."""

    @abstractmethod
    def embed(self, images: list[Any]) -> np.ndarray:
        """Preprocessed ``uint8`` images -> raw (unnormalised) embeddings, ``float32 (B, D)``.

        Each image is a numpy array ``(H, W, 3)`` or a torch tensor ``(3, H, W)`` on ``device``.
        """


@dataclass
class _Decoded:
    key: str
    pixels: np.ndarray | EncodedJpeg | Any | None
    """Preprocessed pixels (numpy, or a tensor on the model's device), or a JPEG still to decode there."""
    error: str | None


class ImageEmbedder(ABC):
    """Base of the embedders: ``embedder(dataset)`` returns a new dataset with an embedding column.

    ``on_error="record"`` gives a bad image a null embedding and a reason in ``error_column``;
    ``"raise"`` stops at the first bad image with an error naming the shard and key.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        embedding_column: str,
        error_column: str = "embedding_error",
        normalize_embeddings: bool = True,
        remove_image_data: bool = False,
        verbose: bool = False,
        decode_threads: int = 2,
        on_error: str = "record",
        decode_mode: str = "exact",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if decode_threads < 1:
            raise ValueError(f"decode_threads must be at least 1, not {decode_threads}")
        if on_error not in ERROR_POLICIES:
            raise ValueError(f"on_error must be one of {ERROR_POLICIES}, not {on_error!r}")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, not {decode_mode!r}")
        if decode_mode == "device":
            check_device_decode_available()
        self.batch_size = batch_size
        self.embedding_column = embedding_column
        self.error_column = error_column
        self.normalize_embeddings = normalize_embeddings
        self.remove_image_data = remove_image_data
        self.verbose = verbose
        self.decode_threads = decode_threads
        self.on_error = on_error
        self.decode_mode = decode_mode

    # --- what a subclass provides -------------------------------------------------------------
    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Length of one embedding vector (known on the client, without loading weights)."""

    @property
    @abstractmethod
    def cache_key(self) -> str:
        """Key of this configuration in the per-worker model cache, fixed when the embedder is built."""

    @abstractmethod
    def load_model(self) -> LoadedImageModel:
        """Load the model on this worker; called once per worker process and ``cache_key``."""

    def config(self) -> dict[str, Any]:
        """The options that determine the embeddings, recorded next to them in the parquet."""
        return {"class": type(self).__name__, "normalize_embeddings": self.normalize_embeddings,
                "decode_mode": self.decode_mode}

    def task_resources(self) -> dict[str, float]:
        """Dask worker resources one shard task needs (none by default)."""
        return {}

    # --- the dataset side ---------------------------------------------------------------------
    def __call__(self, dataset: "ImageTextPairDataset") -> "ImageTextPairDataset":
        """Lazily add ``embedding_column`` and ``error_column`` to every shard of ``dataset``."""
        from dask_clip.dataset import IMAGE_BYTES_COLUMN

        meta = self.output_meta(dataset.pandas_metadata._meta)
        if self.remove_image_data and IMAGE_BYTES_COLUMN in meta.columns:
            meta = meta.drop(columns=[IMAGE_BYTES_COLUMN])
        metadata = dataset.map_shards(self.embed_partition, meta=meta)
        return dataset.with_metadata(
            metadata,
            derived_columns={self.embedding_column: self.config(), self.error_column: self.config()},
            resources=self.task_resources(),
        )

    def output_meta(self, input_meta: pd.DataFrame) -> pd.DataFrame:
        """The input's columns plus the embedding (fixed-size list of float32) and error (string) columns."""
        return input_meta.assign(
            **{
                self.embedding_column: pd.Series([], dtype=embedding_dtype(self.embedding_dim)),
                self.error_column: pd.Series([], dtype=pd.ArrowDtype(pa.string())),
            }
        )

    # --- the worker side ----------------------------------------------------------------------
    def embed_partition(self, rows: pd.DataFrame, tar_url: str, id_col: str) -> pd.DataFrame:
        """Embed the images of one shard and join them to ``rows`` by ``id_col``.

        A row with no image in the tar, or an unusable one, gets a null embedding and a reason.
        A tar key that no row has is a ``ShardReadError`` (rows are never invented).
        """
        from dask_clip.dataset import IMAGE_BYTES_COLUMN

        started = time.perf_counter()
        model = get_or_load(self.cache_key, self.load_model)
        timings = {"load_s": time.perf_counter() - started, "wait_s": 0.0, "decode_s": 0.0, "infer_s": 0.0}
        decode_seconds: list[float] = []
        device_decode_seconds: list[float] = []
        positions = {str(key): position for position, key in enumerate(rows[id_col])}
        vectors = np.zeros((len(rows), self.embedding_dim), dtype=np.float32)
        valid = np.zeros(len(rows), dtype=bool)
        errors: list[str | None] = [None] * len(rows)
        unknown_keys: list[str] = []
        seen = np.zeros(len(rows), dtype=bool)

        def fail(item: _Decoded) -> None:
            if self.on_error == "raise":
                raise ShardReadError(f"{tar_url}: sample {item.key!r}: {item.error}")
            errors[positions[item.key]] = item.error

        def record(batch: list[_Decoded]) -> None:
            device_decode_started = time.perf_counter()
            batch = self._decode_jpegs_on_device(batch, model)
            device_decode_seconds.append(time.perf_counter() - device_decode_started)
            for item in batch:
                if item.error is not None:
                    fail(item)
            batch = [item for item in batch if item.error is None]
            if not batch:
                return
            inference_started = time.perf_counter()
            embeddings = model.embed([item.pixels for item in batch])
            timings["infer_s"] += time.perf_counter() - inference_started
            if self.normalize_embeddings:
                embeddings = l2_normalize(embeddings)
            for item, embedding in zip(batch, embeddings):
                vectors[positions[item.key]] = embedding
                valid[positions[item.key]] = True

        batch: list[_Decoded] = []
        for item in self._decoded_samples(tar_url, model.preprocess, decode_seconds):
            if item.key not in positions:
                unknown_keys.append(item.key)
                continue
            seen[positions[item.key]] = True
            if item.error is not None:
                fail(item)
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                record(batch)
                batch = []
        if batch:
            record(batch)
        if unknown_keys:
            raise ShardReadError(
                f"{tar_url}: {len(unknown_keys)} samples have keys that the shard's parquet lacks "
                f"(column {id_col!r}), e.g. {unknown_keys[:5]}"
            )
        for position in np.flatnonzero(~seen):
            errors[position] = missing_image_reason(rows, int(position))

        result = rows.drop(columns=[IMAGE_BYTES_COLUMN] if self.remove_image_data else [], errors="ignore")
        result = result.assign(
            **{
                self.embedding_column: pd.Series(to_embedding_array(vectors, valid), index=rows.index),
                self.error_column: pd.Series(pd.array(errors, dtype=pd.ArrowDtype(pa.string())), index=rows.index),
            }
        )
        elapsed = time.perf_counter() - started
        timings["decode_s"] = sum(decode_seconds) + sum(device_decode_seconds)
        timings["wait_s"] = max(0.0, elapsed - timings["load_s"] - timings["infer_s"] - sum(device_decode_seconds))
        result.attrs[TIMINGS_ATTR] = timings
        logger.debug("%s: stage seconds %s", tar_url, {name: round(value, 3) for name, value in timings.items()})
        if self.verbose:
            logger.info(
                "%s: %d rows, %d embedded, %d without embedding, %.1fs (%.1f images/s)",
                tar_url, len(rows), int(valid.sum()), int((~valid).sum()), elapsed, valid.sum() / max(elapsed, 1e-9),
            )
        return result

    @staticmethod
    def _decode_jpegs_on_device(batch: list[_Decoded], model: LoadedImageModel) -> list[_Decoded]:
        """``batch`` with every ``EncodedJpeg`` decoded on ``model.device`` (or its decode error set)."""
        encoded = [item for item in batch if isinstance(item.pixels, EncodedJpeg)]
        if not encoded:
            return batch
        decoded = iter(decode_on_device([item.pixels for item in encoded], model.preprocess, model.device))
        finished = []
        for item in batch:
            if isinstance(item.pixels, EncodedJpeg):
                result = next(decoded)
                is_error = isinstance(result, ImageDecodeError)
                item = _Decoded(item.key, None if is_error else result, str(result) if is_error else None)
            finished.append(item)
        return finished

    def _decoded_samples(
        self, tar_url: str, preprocess: PreprocessConfig, decode_seconds: list[float]
    ) -> Iterator[_Decoded]:
        """The shard's samples, decoded on ``decode_threads`` threads a bounded distance ahead.

        Each decode's duration (seconds) is appended to ``decode_seconds``.
        """

        def decode(sample: Sample) -> _Decoded:
            decode_started = time.perf_counter()
            try:
                return decode_one(sample)
            finally:
                decode_seconds.append(time.perf_counter() - decode_started)

        def decode_one(sample: Sample) -> _Decoded:
            extension = next((e for e in IMAGE_EXTENSIONS if e in sample.members or e in sample.problems), None)
            if extension is None:
                return _Decoded(sample.key, None, f"no image member (members: {sorted(sample.members)})")
            if extension in sample.problems:
                return _Decoded(sample.key, None, sample.problems[extension])
            try:
                return _Decoded(sample.key, prepare_image(sample.members[extension], preprocess), None)
            except ImageDecodeError as error:
                return _Decoded(sample.key, None, str(error))

        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="dask_clip-decode") as pool:
            yield from ordered_bounded_map(pool, decode, iter_tar_samples(tar_url), 2 * self.batch_size)


def missing_image_reason(rows: pd.DataFrame, position: int) -> str:
    """Why a row has no sample in the tar, using img2dataset's ``status``/``error_message`` when present."""
    if "status" not in rows.columns:
        return "no image in the tar for this id"
    status = rows["status"].iloc[position]
    message = rows["error_message"].iloc[position] if "error_message" in rows.columns else None
    reason = f"no image in the tar (status: {status}"
    return reason + (f", {message})" if isinstance(message, str) and message else ")")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero): ``float32 (B, D)`` -> same."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def ordered_bounded_map(
    pool: ThreadPoolExecutor, function: Callable[[T], R], items: Iterable[T], max_in_flight: int
) -> Iterator[R]:
    """``map(function, items)`` on ``pool``, in order, with at most ``max_in_flight`` results pending.

    Reading ``items`` happens on the calling thread; only ``function`` runs on the pool.
    """
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= max_in_flight:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
