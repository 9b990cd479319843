"""Several image embedders in one read of each shard: every image is read and decoded once, then resized for
each model with its own preprocessing."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.arguments import at_least
from dask_clip.embedders.base import (
    DEFAULT_EMBEDDING_COLUMN,
    DEFAULT_ERROR_COLUMN,
    Decoded,
    ImageEmbedder,
    ShardColumn,
    decoded_samples,
    finish_timings,
    image_bytes,
    sample_problem,
)
from dask_clip.errors import ImageDecodeError, UsageError
from dask_clip.execution import ShardTask
from dask_clip.images.preprocess import PreprocessConfig, check_resized, decode_opened, open_image, resize_and_crop
from dask_clip.io.tar_samples import RowKeys, Sample
from dask_clip.operation import Operation
from dask_clip.provenance import Computed

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)


class MultiEmbedder(Operation):
    """Image embedders run together: ``MultiEmbedder([ClipImageEmbedder(b32, embedding_column="emb_b32"),
    ClipImageEmbedder(l14, embedding_column="emb_l14")])(dataset)`` adds both columns in one read of each tar.

    Each image is decoded once per row (a JPEG at a reduced scale only when every embedder decodes ``"fast"``,
    and then no smaller than the largest size any of them resizes to), then resized, cropped and normalised
    for each model as that embedder alone would. Each embedder's columns record that embedder's own
    configuration, as a run of it alone does: a later run of one of them finds its column finished.

    - An embedder left with the default ``error_column`` writes its reasons to ``<embedding_column>_error``
      (the one writing ``image_embedding`` keeps ``embedding_error``). Two embedders writing the same column is
      a ``UsageError`` naming both.
    - A model that cannot be loaded on a worker, or raises on a batch, never stops the others: under its
      ``on_error="record"`` its rows get a null embedding and the error as their reason (every row of the
      shard for a failed load, the batch's rows for a failed batch); under ``"raise"`` the shard fails.
    - The embedders must share ``max_image_pixels``; ``decode_mode="device"`` (a decode on each model's own
      device) is refused.

    ``decode_threads`` (default: the most any embedder asks for) decode for all of them; ``name`` is the label
    progress shows.
    """

    def __init__(
        self, embedders: Sequence[ImageEmbedder], *, decode_threads: int | None = None, name: str | None = None
    ) -> None:
        embedders = list(embedders)
        if not embedders:
            raise UsageError("MultiEmbedder needs at least one embedder")
        for index, embedder in enumerate(embedders):
            if not isinstance(embedder, ImageEmbedder):
                raise UsageError(f"embedders[{index}] is a {type(embedder).__name__}, not an image embedder")
        self.embedders = [_with_own_error_column(embedder) for embedder in embedders]
        _check_compatible(self.embedders)
        self.max_image_pixels = self.embedders[0].max_image_pixels
        self.decode_threads = at_least(
            "decode_threads", decode_threads or max(embedder.decode_threads for embedder in self.embedders)
        )
        self._label = name

    @property
    def label(self) -> str:
        return self._label or self.name

    def config(self) -> dict[str, Any]:
        """Each embedder's recorded configuration, in order (each column records only its own)."""
        return {"embedders": [embedder.recorded_config() for embedder in self.embedders]}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return []  # the images come from the shard's tar

    def reads_tar(self, dataset: ImageTextPairDataset) -> bool:
        return True

    def reasons(self) -> dict[str, str]:
        return {column: reason for embedder in self.embedders for column, reason in embedder.reasons().items()}

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {name: empty for embedder in self.embedders for name, empty in embedder.output_columns(dataset).items()}

    def sources(self, dataset: ImageTextPairDataset) -> dict[str, Computed]:
        """Each embedder's columns with the record a run of that embedder alone gives them."""
        return {name: source for embedder in self.embedders for name, source in embedder.sources(dataset).items()}

    def task_resources(self) -> dict[str, float]:
        """The largest GPU share any embedder asks for: they run one after another within a shard's task."""
        shares = [embedder.task_resources().get("GPU", 0.0) for embedder in self.embedders]
        return {"GPU": max(shares)} if max(shares) else {}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        """Every embedder's columns for one shard, each image decoded once (see ``ImageEmbedder.process_shard``)."""
        started = time.perf_counter()
        decode_seconds: list[float] = []
        keys = RowKeys(rows[task.id_col], task.shard.tar_url)
        columns = [_shard_column(embedder, len(rows), task) for embedder in self.embedders]
        configs = [None if column.model is None else column.model.preprocess for column in columns]
        seen = np.zeros(len(rows), dtype=bool)
        unknown_keys: list[str] = []

        def decode(sample: Sample) -> list[Decoded]:
            return decode_for_each(sample, keys.position(sample.key), configs, self.max_image_pixels)

        ahead = max(embedder.batch_size for embedder in self.embedders)
        for items in decoded_samples(task.shard.tar_url, decode, self.decode_threads, ahead, decode_seconds):
            if items[0].position is None:
                unknown_keys.append(items[0].key)
                continue
            seen[items[0].position] = True
            for column, item in zip(columns, items, strict=True):
                column.add(item)
        for column in columns:
            column.flush()
        if unknown_keys:
            raise keys.unknown_keys_error(unknown_keys, task.id_col)
        for column in columns:
            column.add_missing(rows, ~seen)
        finish_timings(task, started, decode_seconds)
        for column in columns:
            column.log(time.perf_counter() - started)
        return {name: values for column in columns for name, values in column.columns().items()}


def decode_for_each(
    sample: Sample, position: int | None, configs: Sequence[PreprocessConfig | None], max_image_pixels: int
) -> list[Decoded]:
    """``sample``'s image decoded once, then resized and cropped for each of ``configs``: one ``Decoded`` per
    config (``uint8 (crop_height, crop_width, 3)`` pixels, or the reason). A None config (a model that could not
    be loaded) gets neither."""
    problem = None if position is None else sample_problem(sample)
    if position is None or problem is not None:
        return [Decoded(sample.key, position, None, problem) for _ in configs]
    outcomes: list[np.ndarray | str | None] = [None] * len(configs)
    try:
        image = open_image(image_bytes(sample), max_image_pixels)
        usable = []
        for index, config in enumerate(configs):
            if config is not None:
                outcomes[index] = _refusal(image, config)
                usable += [index] if outcomes[index] is None else []
        rgb = decode_opened(image, [configs[index] for index in usable]) if usable else None
        for index in usable:
            try:
                outcomes[index] = resize_and_crop(rgb, configs[index])
            except ImageDecodeError as error:
                outcomes[index] = str(error)
    except ImageDecodeError as error:
        outcomes = [None if config is None else str(error) for config in configs]
    return [
        Decoded(sample.key, position, None, outcome)
        if isinstance(outcome, str)
        else Decoded(sample.key, position, outcome, None)
        for outcome in outcomes
    ]


def _refusal(image: Any, config: PreprocessConfig) -> str | None:
    """Why ``config`` refuses ``image`` (over ``max_image_pixels`` once resized), or None."""
    try:
        check_resized(image, config)
    except ImageDecodeError as error:
        return str(error)
    return None


def _shard_column(embedder: ImageEmbedder, rows: int, task: ShardTask) -> ShardColumn:
    """``embedder``'s column for one shard, with its model from this worker's cache; a model that cannot be loaded
    gives every row its error as the reason (under ``on_error="raise"``, the shard fails)."""
    try:
        with task.timed("load_s"):
            model = embedder.model.get()
    except Exception as error:
        if embedder.on_error == "raise":
            raise
        reason = f"{describe(embedder)}: the model could not be loaded on this worker: {type(error).__name__}: {error}"
        logger.warning("%s: %s", task.shard.tar_url, reason)
        return ShardColumn(embedder, rows, task, None, model_failure=reason, record_model_errors=True)
    return ShardColumn(embedder, rows, task, model, record_model_errors=True)


def describe(embedder: ImageEmbedder) -> str:
    """An embedder by its class and model: ``ClipImageEmbedder('/models/b32')``."""
    identity = embedder.description.identity
    model = identity.get("model_dir") or identity.get("model_name")
    return f"{type(embedder).__name__}({model!r})"


def own_error_column(embedding_column: str) -> str:
    """The reason column of ``embedding_column`` in a ``MultiEmbedder``: ``embedding_error`` for ``image_embedding``
    (as for one embedder), else ``<embedding_column>_error``."""
    return DEFAULT_ERROR_COLUMN if embedding_column == DEFAULT_EMBEDDING_COLUMN else f"{embedding_column}_error"


def _with_own_error_column(embedder: ImageEmbedder) -> ImageEmbedder:
    """``embedder``, or a copy writing its reasons to ``own_error_column`` when it was left with the default
    ``error_column``."""
    if embedder.error_column != DEFAULT_ERROR_COLUMN:
        return embedder
    renamed = copy.copy(embedder)
    renamed.error_column = own_error_column(embedder.embedding_column)
    return renamed


def _check_compatible(embedders: list[ImageEmbedder]) -> None:
    """``UsageError`` when two embedders write the same column, or they cannot share one decode."""
    writers: dict[str, str] = {}
    for index, embedder in enumerate(embedders):
        named = f"embedders[{index}] {describe(embedder)}"
        if embedder.decode_mode == "device":
            raise UsageError(
                f"{named}: decode_mode='device' decodes on each model's own device and cannot share one decode; "
                "give it decode_mode='fast' or 'exact' in a MultiEmbedder"
            )
        if embedder.max_image_pixels != embedders[0].max_image_pixels:
            raise UsageError(
                f"{named}: max_image_pixels={embedder.max_image_pixels} but embedders[0] has "
                f"{embedders[0].max_image_pixels}: embedders sharing one decode must refuse the same images"
            )
        for column in (embedder.embedding_column, embedder.error_column):
            if column in writers:
                raise UsageError(
                    f"{writers[column]} and {named} both write column {column!r}: give each embedder its own "
                    "embedding_column (and error_column)"
                )
            writers[column] = named
