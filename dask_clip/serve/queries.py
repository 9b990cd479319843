"""Search for the app: queries embedded by the column's recorded model, each tower loaded once, then answered by
``dataset.search`` (the index when one is given, opened once; else exact search on the cluster)."""

from __future__ import annotations

import dataclasses
import threading
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.dataset.index_files import open_index
from dask_clip.dataset.search import check_query_model
from dask_clip.errors import UsageError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, decode_and_preprocess
from dask_clip.models.clip import ClipTextModel, ClipVisionModel, describe_image_model, describe_text_model

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


class Searcher:
    """Top-k search over ``dataset``'s ``column`` for text or image queries (``float32 (D,)`` query vectors).

    The query models (CPU) and the index (``index``: a ``build_index`` folder) are loaded on first use and kept;
    an index that fails to open (``StaleIndexError``: the dataset changed since it was built) is tried again on
    the next query, so a rebuilt index is picked up."""

    def __init__(self, dataset: ImageTextPairDataset, column: str, index: str | None) -> None:
        self.dataset = dataset
        self.column = column
        self.index = index
        self.recorded: dict[str, Any] = dataset.operation_config(column) or {}
        self.width = dataset.embedding_width(column, "search")
        self._lock = threading.Lock()
        self._loaded: dict[str, Any] = {}

    def search(self, query: np.ndarray, k: int) -> pd.DataFrame:
        """The ``k`` best rows for ``query``: the id column, ``score``, ``stem``, ``tar_url`` (``dataset.search``)."""
        index = self._get("index", lambda: open_index(self.dataset, self.index, self.column)) if self.index else None
        return self.dataset.search(image=query, k=k, embedding_column=self.column, index=index)

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """``texts`` embedded by the recorded model's text tower in one forward pass: ``float32 (len(texts), D)``."""
        return self._get("text", self._text_model).embed(texts)

    def image_vector(self, image: bytes, max_image_pixels: int) -> np.ndarray:
        """Encoded ``image`` embedded by the recorded model, preprocessed as the embedder did; ``ImageDecodeError``
        (its reason) for data that is no image or one over ``max_image_pixels``."""
        model, preprocess = self._get("image", self._image_model)
        pixels = decode_and_preprocess(image, dataclasses.replace(preprocess, max_image_pixels=max_image_pixels))
        return model.embed([pixels])[0]

    def _get(self, name: str, load: Any) -> Any:
        with self._lock:
            if name not in self._loaded:
                self._loaded[name] = load()
            return self._loaded[name]

    def _model_dir(self) -> str:
        model_dir = self.recorded.get("model_dir")
        if model_dir is None:
            raise UsageError(f"no model is recorded with {self.column!r}: it cannot embed a query")
        return model_dir

    def _text_model(self) -> ClipTextModel:
        model_dir = self._model_dir()
        described = describe_text_model(model_dir)
        check_query_model(self.column, self.recorded, self.width, model_dir, described)
        return ClipTextModel(model_dir, "cpu", described)

    def _image_model(self) -> tuple[ClipVisionModel, Any]:
        model_dir = self._model_dir()
        described = describe_image_model(model_dir, DEFAULT_MAX_IMAGE_PIXELS)
        check_query_model(self.column, self.recorded, self.width, model_dir, described)
        preprocess = described.preprocess.with_decode_mode(self.recorded.get("decode_mode") or "exact")
        model = ClipVisionModel(model_dir, "cpu", False, dataclasses.replace(described, preprocess=preprocess))
        return model, preprocess
