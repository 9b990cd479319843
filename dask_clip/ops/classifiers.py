"""Scores from small classifiers on image embeddings: LAION's aesthetic predictor and NSFW detector.

``classifier(dataset)`` returns a new dataset with a ``float32`` prediction column, computed shard
by shard from the embedding column (no image is read). Each worker process loads the classifier
once (the per-worker model cache) from a local checkpoint file the user provides.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.distributed.model_cache import get_or_load, make_cache_key
from dask_clip.embeddings import embedding_width, unit_embeddings

if TYPE_CHECKING:
    import torch

    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

PREDICTION_DTYPE = pd.ArrowDtype(pa.float32())


class EmbeddingClassifier(ABC):
    """Base: a torch module applied in batches to the L2-normalised embeddings of ``embedding_column``.

    Rows without an embedding get a null prediction. The embedding width must equal
    ``embedding_dim`` (768 for CLIP ViT-L/14); the column's width is checked when the classifier is applied.
    """

    default_pred_column: str
    """The prediction column when ``pred_column`` is not given."""

    def __init__(
        self,
        model_path: str,
        embedding_column: str = "image_embedding",
        pred_column: str | None = None,
        batch_size: int = 1024,
        *,
        embedding_dim: int = 768,
        device: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if not model_path:
            raise ValueError(f"{type(self).__name__} needs model_path: a local checkpoint file")
        self.model_path = os.path.abspath(os.path.expanduser(str(model_path)))
        if not os.path.isfile(self.model_path):
            raise FileNotFoundError(f"{type(self).__name__}: checkpoint {self.model_path!r} does not exist")
        self.embedding_column = embedding_column
        self.pred_column = pred_column or self.default_pred_column
        self.batch_size = batch_size
        self.embedding_dim = embedding_dim
        self.device = device
        stat = os.stat(self.model_path)
        self._cache_key = make_cache_key(
            type(self).__name__,
            {"path": self.model_path, "mtime": stat.st_mtime_ns, "size": stat.st_size, "dim": embedding_dim, "device": device},
        )

    @abstractmethod
    def build_module(self) -> "torch.nn.Module":
        """The architecture with freshly initialised weights (the checkpoint is loaded into it)."""

    def config(self) -> dict[str, Any]:
        """The options that determine the predictions, recorded next to them in the parquet."""
        return {
            "class": type(self).__name__, "model_path": self.model_path,
            "embedding_column": self.embedding_column, "embedding_dim": self.embedding_dim,
        }

    def __call__(self, dataset: "ImageTextPairDataset") -> "ImageTextPairDataset":
        """Lazily add ``pred_column`` (``float32``, null without an embedding) to every shard."""
        width = embedding_width(dataset.pandas_metadata._meta, self.embedding_column)
        if width != self.embedding_dim:
            raise ValueError(
                f"{type(self).__name__} takes {self.embedding_dim}-d embeddings but column "
                f"{self.embedding_column!r} holds {width}-d ones (use the CLIP the classifier was trained on)"
            )
        meta = dataset.pandas_metadata._meta.assign(**{self.pred_column: pd.Series([], dtype=PREDICTION_DTYPE)})
        metadata = dataset.map_shards(self.predict_partition, meta=meta)
        return dataset.with_metadata(metadata, derived_columns={self.pred_column: self.config()})

    def load_model(self) -> tuple["torch.nn.Module", "torch.device"]:
        """The module with the checkpoint's weights, on this worker's device; called once per worker."""
        import torch

        from dask_clip.embedders.inference import resolve_device
        from dask_clip.ops.classifier_models import load_classifier

        device = torch.device(resolve_device(self.device))
        logger.info("loading %s from %s on %s", type(self).__name__, self.model_path, device)
        return load_classifier(self.build_module(), self.model_path).to(device), device

    def predict_partition(self, rows: pd.DataFrame, tar_url: str, id_col: str) -> pd.DataFrame:
        """One shard's rows plus ``pred_column``."""
        import torch

        module, device = get_or_load(self._cache_key, self.load_model)
        valid, vectors = unit_embeddings(rows[self.embedding_column])
        predictions = np.zeros(len(vectors), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(vectors), self.batch_size):
                batch = torch.from_numpy(vectors[start : start + self.batch_size]).to(device)
                predictions[start : start + len(batch)] = module(batch)[:, 0].float().cpu().numpy()
        column = np.zeros(len(rows), dtype=np.float32)
        column[valid] = predictions
        values = pd.arrays.ArrowExtensionArray(pa.array(column, mask=~valid))
        return rows.assign(**{self.pred_column: pd.Series(values, index=rows.index)})


class AestheticClassifier(EmbeddingClassifier):
    """LAION's improved aesthetic predictor (v2) on CLIP ViT-L/14 image embeddings: a score, about 0-10.

    ``model_path``: the published ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict; it is
    loaded with ``weights_only=True``) or the same weights as safetensors. Higher is prettier;
    LAION-Aesthetics used 5, 6 and 6.5 as cut-offs.
    """

    default_pred_column = "aesthetic_score"

    def build_module(self) -> "torch.nn.Module":
        from dask_clip.ops.classifier_models import AestheticMlp

        return AestheticMlp(self.embedding_dim)


class NsfwClassifier(EmbeddingClassifier):
    """LAION's CLIP-based NSFW detector on CLIP ViT-L/14 image embeddings: a probability, 0-1 (1 = NSFW).

    ``model_path``: a safetensors file or torch state dict with ``norm.mean``, ``norm.variance``
    (``(768,)`` or Keras's ``(1, 768)``) and ``linear_1`` ... ``linear_4`` ``weight``/``bias`` (Dense 64,
    512, 256, 1), the layout of LAION's PyTorch port of ``clip_autokeras_binary_nsfw``.
    """

    default_pred_column = "nsfw_score"

    def build_module(self) -> "torch.nn.Module":
        from dask_clip.ops.classifier_models import NsfwMlp

        return NsfwMlp(self.embedding_dim)
