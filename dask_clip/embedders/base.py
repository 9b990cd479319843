"""What every image embedder shares: its options, streaming each shard's tar through a decode thread pool
into batched inference, and joining the embeddings to rows by id.

A subclass describes its model on the client (``describe_model`` returns a ``ModelDescription``: width,
preprocessing and which weights) and loads it on a worker (``load_model``: anything with ``preprocess``,
``device`` and ``embed(images)``); everything about shards, rows, errors and caching lives here and in the
operation protocol.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pandas as pd

from dask_clip.arguments import alias, at_least, one_of
from dask_clip.columns import STRING, embedding_dtype, empty_column, l2_normalize, to_embedding_array
from dask_clip.errors import ImageDecodeError, ShardReadError
from dask_clip.execution import ShardTask
from dask_clip.images.device_decode import (
    EncodedJpeg,
    check_device_decode_available,
    check_device_decode_works,
    decode_on_device,
    prepare_image,
)
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, PreprocessConfig, resolve_decode_mode
from dask_clip.io.tar_samples import RowKeys, Sample, is_image_extension, iter_tar_samples
from dask_clip.operation import ModelOperation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

ERROR_POLICIES = ("record", "raise")
DEFAULT_EMBEDDING_COLUMN = "image_embedding"
DEFAULT_ERROR_COLUMN = "embedding_error"
NON_FINITE_REASON = "the model returned non-finite values (NaN or infinity) for this image"
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ModelDescription:
    """What the client knows of an image embedder's model without loading its weights."""

    width: int
    """The embedding width ``D``: the model gives ``float32 (B, D)``."""
    preprocess: PreprocessConfig
    """How the model wants its pixels (the embedder applies its decode mode to it)."""
    identity: Mapping[str, Any]
    """Which weights (model id, checkpoint, their version), JSON-serialisable: recorded in ``config()`` and part
    of the model-cache key."""


@dataclass
class Decoded:
    key: str
    position: int | None
    """The sample's row, None when no row has its key."""
    pixels: np.ndarray | EncodedJpeg | Any | None
    """Preprocessed pixels (numpy, or a tensor on the model's device), or a JPEG still to decode there."""
    error: str | None


class ImageEmbedder(ModelOperation):
    """Base of the image embedders: ``embedder(dataset)`` returns a new dataset with an embedding column.

    Options every embedder takes (keyword-only), besides ``device``, ``num_gpus_per_worker`` (default 0.25)
    and ``name`` (see ``ModelOperation``):

    - ``batch_size``: images per model call (alias ``model_inference_batch_size``, NeMo Curator's name);
    - ``embedding_column`` (alias ``image_embedding_column``) and ``error_column``: the columns written;
    - ``normalize_embeddings``: L2-normalise each vector;
    - ``autocast``: bf16 where the device computes it natively;
    - ``decode_mode``, ``decode_threads``, ``max_image_pixels``: how images are decoded (see ``DECODE_MODES``);
    - ``on_error``: ``"record"`` gives a bad image a null embedding and a reason in ``error_column``,
      ``"raise"`` stops at the first bad image with an error naming the shard and key;
    - ``verbose``: log a line per shard;
    - ``remove_image_data``: accepted for NeMo Curator's examples and ignored: no column holds image bytes.
    """

    default_decode_mode: str | None = None
    """``decode_mode=None`` means this (None: ``"exact"`` without autocast, else ``"fast"``)."""

    def __init__(
        self,
        *,
        batch_size: int | None = None,
        embedding_column: str | None = None,
        error_column: str = DEFAULT_ERROR_COLUMN,
        normalize_embeddings: bool = True,
        autocast: bool = True,
        device: str | None = None,
        decode_mode: str | None = None,
        decode_threads: int = 2,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        on_error: str = "record",
        verbose: bool = False,
        num_gpus_per_worker: float = 0.25,
        name: str | None = None,
        model_inference_batch_size: int | None = None,
        image_embedding_column: str | None = None,
        remove_image_data: bool = False,
    ) -> None:
        del remove_image_data  # nothing to remove: the images stay in the tars
        super().__init__(device=device, num_gpus_per_worker=num_gpus_per_worker, name=name)
        self.batch_size = at_least(
            "batch_size", alias("batch_size", batch_size, "model_inference_batch_size", model_inference_batch_size, 32)
        )
        self.embedding_column = alias(
            "embedding_column",
            embedding_column,
            "image_embedding_column",
            image_embedding_column,
            DEFAULT_EMBEDDING_COLUMN,
        )
        self.error_column = error_column
        self.normalize_embeddings = normalize_embeddings
        self.autocast = autocast
        self.decode_threads = at_least("decode_threads", decode_threads)
        self.max_image_pixels = at_least("max_image_pixels", max_image_pixels)
        self.on_error = one_of("on_error", on_error, ERROR_POLICIES)
        self.verbose = verbose
        self.decode_mode = resolve_decode_mode(decode_mode or self.default_decode_mode, autocast)
        if self.decode_mode == "device":
            check_device_decode_available()
        self.description = self.describe_model(self.max_image_pixels)
        self.embedding_dim = self.description.width
        self.preprocess = self.description.preprocess.with_decode_mode(self.decode_mode)
        loaded = {
            **self.description.identity,
            "autocast": autocast,
            "max_image_pixels": max_image_pixels,
            "decode_mode": self.decode_mode,
        }
        self.model = self.model_spec(loaded, self._load_checked)

    # --- what a subclass provides -------------------------------------------------------------
    @abstractmethod
    def describe_model(self, max_image_pixels: int) -> ModelDescription:
        """On the client, without loading weights: the model's description, its preprocessing refusing images
        of more than ``max_image_pixels``.

        Raises ``ModelLoadError`` for a model that cannot be loaded, so the run fails before any shard.
        """

    @abstractmethod
    def load_model(self) -> Any:
        """Load the model on this worker (once per process and configuration): an object with ``preprocess``
        (``PreprocessConfig``), ``device`` and ``embed(images) -> float32 (B, D)``."""

    def _load_checked(self) -> Any:
        """``load_model()``, then, with ``decode_mode="device"``, a check that JPEGs decode on its device."""
        model = self.load_model()
        if self.decode_mode == "device":
            check_device_decode_works(model.device)
        return model

    # --- the operation protocol ---------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The options that determine the embeddings, recorded next to them in the parquet."""
        return {
            **self.description.identity,
            "autocast": self.autocast,
            "max_image_pixels": self.max_image_pixels,
            "decode_mode": self.decode_mode,
            "normalize_embeddings": self.normalize_embeddings,
            "embedding_dim": self.embedding_dim,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return []  # the images come from the shard's tar

    def reads_tar(self, dataset: ImageTextPairDataset) -> bool:
        return True

    def reasons(self) -> dict[str, str]:
        return {self.embedding_column: self.error_column}

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        """The embedding (fixed-size list of float32) and error (string) columns."""
        return {
            self.embedding_column: empty_column(embedding_dtype(self.embedding_dim)),
            self.error_column: empty_column(STRING),
        }

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        """Embed the images of one shard and join them to ``rows`` by id.

        A row with no image in the tar, or an unusable one, gets a null embedding and a reason.
        A tar key that no row has is a ``ShardReadError`` (rows are never invented).
        """
        started = time.perf_counter()
        decode_seconds: list[float] = []
        keys = RowKeys(rows[task.id_col], task.shard.tar_url)
        column = ShardColumn(self, len(rows), task, model)
        seen = np.zeros(len(rows), dtype=bool)
        unknown_keys: list[str] = []

        def decode(sample: Sample) -> Decoded:
            return decode_sample(sample, keys.position(sample.key), model.preprocess)

        for item in decoded_samples(task.shard.tar_url, decode, self.decode_threads, self.batch_size, decode_seconds):
            if item.position is None:
                unknown_keys.append(item.key)
                continue
            seen[item.position] = True
            column.add(item)
        column.flush()
        if unknown_keys:
            raise keys.unknown_keys_error(unknown_keys, task.id_col)
        column.add_missing(rows, ~seen)
        finish_timings(task, started, decode_seconds)
        column.log(time.perf_counter() - started)
        return column.columns()


class ShardColumn:
    """One embedder's output for one shard, filled batch by batch: ``float32 (N, D)`` vectors, which of the ``N``
    rows hold one, and a reason for each row that does not.

    ``model`` is the embedder's loaded model, or None with ``model_failure`` saying why it could not be loaded
    (every row then gets that reason). With ``record_model_errors``, a batch the model raises on gives its rows
    the error as their reason (under ``on_error="record"``) instead of stopping the shard.
    """

    def __init__(
        self,
        embedder: ImageEmbedder,
        rows: int,
        task: ShardTask,
        model: Any,
        model_failure: str | None = None,
        record_model_errors: bool = False,
    ) -> None:
        self.embedder = embedder
        self.task = task
        self.model = model
        self.model_failure = model_failure
        self.record_model_errors = record_model_errors and embedder.on_error == "record"
        self.vectors = np.zeros((rows, embedder.embedding_dim), dtype=np.float32)
        self.valid = np.zeros(rows, dtype=bool)
        self.errors: list[str | None] = [None] * rows
        self.batch: list[Decoded] = []

    def fail(self, item: Decoded) -> None:
        """Give ``item``'s row its reason (``on_error="raise"``: a ``ShardReadError`` naming the tar and key)."""
        if self.embedder.on_error == "raise":
            raise ShardReadError(f"{self.task.shard.tar_url}: sample {item.key!r}: {item.error}")
        self.errors[item.position] = item.error

    def add(self, item: Decoded) -> None:
        """Queue a decoded sample (or record its reason), embedding a batch once ``batch_size`` are queued."""
        if item.error is None and self.model_failure is not None:
            item = Decoded(item.key, item.position, None, self.model_failure)
        if item.error is not None:
            self.fail(item)
            return
        self.batch.append(item)
        if len(self.batch) == self.embedder.batch_size:
            self.flush()

    def flush(self) -> None:
        """Embed the queued samples."""
        batch, self.batch = self.batch, []
        if not batch:
            return
        with self.task.timed("decode_s"):
            batch = _decode_jpegs_on_device(batch, self.model)
        for item in batch:
            if item.error is not None:
                self.fail(item)
        batch = [item for item in batch if item.error is None]
        if not batch:
            return
        try:
            with self.task.timed("infer_s"):
                embeddings = self.model.embed([item.pixels for item in batch])
        except Exception as error:
            if not self.record_model_errors:
                raise
            reason = f"{self.embedder.label}: the model failed on this batch: {type(error).__name__}: {error}"
            for item in batch:
                self.fail(Decoded(item.key, item.position, None, reason))
            return
        if self.embedder.normalize_embeddings:
            embeddings = l2_normalize(embeddings)
        finite = np.isfinite(embeddings).all(axis=1)
        for item, embedding, usable in zip(batch, embeddings, finite, strict=True):
            if usable:
                self.vectors[item.position] = embedding
                self.valid[item.position] = True
            else:
                self.fail(Decoded(item.key, item.position, None, NON_FINITE_REASON))

    def add_missing(self, rows: pd.DataFrame, missing: np.ndarray) -> None:
        """Give the rows where ``missing`` (bool ``(N,)``: no sample in the tar) their reason."""
        for position in np.flatnonzero(missing):
            self.errors[position] = missing_image_reason(rows, int(position))

    def log(self, elapsed: float) -> None:
        """With ``verbose``, a line on what this shard got (``elapsed`` seconds)."""
        if self.embedder.verbose:
            logger.info(
                "%s: %s: %d rows, %d embedded, %d without embedding, %.1fs (%.1f images/s)",
                self.embedder.label,
                self.task.shard.tar_url,
                len(self.valid),
                int(self.valid.sum()),
                int((~self.valid).sum()),
                elapsed,
                self.valid.sum() / max(elapsed, 1e-9),
            )

    def columns(self) -> dict[str, Any]:
        """The embedding column (null where invalid) and the reason column."""
        return {
            self.embedder.embedding_column: to_embedding_array(self.vectors, self.valid),
            self.embedder.error_column: pd.array(self.errors, dtype=STRING),
        }


def finish_timings(task: ShardTask, started: float, decode_seconds: list[float]) -> None:
    """Add to ``task`` the decode threads' seconds and the seconds the inference thread waited for them."""
    on_inference_thread = task.seconds.get("infer_s", 0.0) + task.seconds.get("decode_s", 0.0)
    task.add_seconds("wait_s", max(0.0, time.perf_counter() - started - on_inference_thread))
    task.add_seconds("decode_s", sum(decode_seconds))


def decoded_samples(
    tar_url: str, decode: Callable[[Sample], T], threads: int, batch_size: int, decode_seconds: list[float]
) -> Iterator[T]:
    """``decode`` of each of the shard's samples, on ``threads`` threads, at most two batches ahead.

    Only image members are read from the tar. Each decode's duration (seconds) is appended to
    ``decode_seconds``.
    """

    def timed(sample: Sample) -> T:
        decode_started = time.perf_counter()
        try:
            return decode(sample)
        finally:
            decode_seconds.append(time.perf_counter() - decode_started)

    samples = iter_tar_samples(tar_url, wanted=is_image_extension)
    with ThreadPoolExecutor(threads, thread_name_prefix="dask_clip-decode") as pool:
        yield from ordered_bounded_map(pool, timed, samples, 2 * batch_size)


def decode_sample(sample: Sample, position: int | None, preprocess: PreprocessConfig) -> Decoded:
    """One sample's image member, preprocessed (or left encoded for the device), or the reason it has none."""
    if position is None:  # no row has this key: reported for the whole shard, nothing to decode
        return Decoded(sample.key, None, None, None)
    problem = sample_problem(sample)
    if problem is not None:
        return Decoded(sample.key, position, None, problem)
    try:
        return Decoded(sample.key, position, prepare_image(image_bytes(sample), preprocess), None)
    except ImageDecodeError as error:
        return Decoded(sample.key, position, None, str(error))


def sample_problem(sample: Sample) -> str | None:
    """Why ``sample`` has no image to decode (no image member, or one the tar could not give); None when it has."""
    extension = sample.image_member()
    if extension is None:
        return f"no image member (members: {sample.extensions})"
    return sample.problems.get(extension)


def image_bytes(sample: Sample) -> bytes:
    """The bytes of ``sample``'s image member (one ``sample_problem`` found no problem with)."""
    return sample.members[sample.image_member()]


def _decode_jpegs_on_device(batch: list[Decoded], model: Any) -> list[Decoded]:
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
            item = Decoded(item.key, item.position, None if is_error else result, str(result) if is_error else None)
        finished.append(item)
    return finished


def missing_image_reason(rows: pd.DataFrame, position: int) -> str:
    """Why a row has no sample in the tar, using img2dataset's ``status``/``error_message`` when present."""
    if "status" not in rows.columns:
        return "no image in the tar for this id"
    status = rows["status"].iloc[position]
    message = rows["error_message"].iloc[position] if "error_message" in rows.columns else None
    reason = f"no image in the tar (status: {status}"
    return reason + (f", {message})" if isinstance(message, str) and message else ")")


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
