"""Scores from small classifiers on image embeddings: LAION's aesthetic predictor and NSFW detector.

``classifier(dataset)`` returns a new dataset with a ``float32`` prediction column, computed shard
by shard from the embedding column (no image is read). Each worker process loads the classifier
once (the per-worker model cache) from a local checkpoint file the user provides.
"""

from __future__ import annotations

import logging
import os
from abc import abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.arguments import at_least
from dask_clip.columns import FLOAT32, embedding_width, empty_column, nullable, unit_embeddings
from dask_clip.errors import CheckpointError, ColumnError, UsageError
from dask_clip.execution import ShardTask
from dask_clip.models.device import resolve_device
from dask_clip.models.loading import file_version, resolved_model_path
from dask_clip.operation import ModelOperation

if TYPE_CHECKING:
    import torch

    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)


class EmbeddingClassifier(ModelOperation):
    """Base: a torch module applied in batches to the L2-normalised embeddings of ``embedding_column``.

    Rows without an embedding get a null prediction. The embedding width must equal
    ``embedding_dim`` (768 for CLIP ViT-L/14); the column's width is checked when the classifier is applied.
    ``device``, ``num_gpus_per_worker`` and ``name`` are as for every ``ModelOperation``.
    """

    default_pred_column: str
    """The prediction column when ``pred_column`` is not given."""

    def __init__(
        self,
        model_path: str,
        *,
        embedding_column: str = "image_embedding",
        pred_column: str | None = None,
        batch_size: int = 1024,
        embedding_dim: int = 768,
        device: str | None = None,
        num_gpus_per_worker: float = 0.25,
        name: str | None = None,
    ) -> None:
        super().__init__(device=device, num_gpus_per_worker=num_gpus_per_worker, name=name)
        if not model_path:
            raise UsageError(f"{self.name} needs model_path: a local checkpoint file")
        self.model_path = resolved_model_path(str(model_path))
        if not os.path.isfile(self.model_path):
            raise CheckpointError(f"{self.name}: checkpoint {self.model_path!r} does not exist")
        self.embedding_column = embedding_column
        self.pred_column = pred_column or self.default_pred_column
        self.batch_size = at_least("batch_size", batch_size)
        self.embedding_dim = at_least("embedding_dim", embedding_dim)
        self.checkpoint_version = file_version(self.model_path)
        self.check_checkpoint()
        weights = {
            "model_path": self.model_path,
            "checkpoint_version": self.checkpoint_version,
            "embedding_dim": self.embedding_dim,
        }
        self.model = self.model_spec(weights, self.load_model)

    @abstractmethod
    def build_module(self) -> torch.nn.Module:
        """The architecture with freshly initialised weights (the checkpoint is loaded into it)."""

    def check_checkpoint(self) -> None:
        """On the client: ``CheckpointError`` unless the checkpoint loads into the architecture (a small file)."""
        from dask_clip.models.classifiers import load_classifier

        load_classifier(self.build_module(), self.model_path)

    def config(self) -> dict[str, Any]:
        """The options that determine the predictions, recorded next to them in the parquet."""
        return {
            "model_path": self.model_path,
            "checkpoint_version": self.checkpoint_version,
            "embedding_column": self.embedding_column,
            "embedding_dim": self.embedding_dim,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        width = embedding_width(dataset.meta, self.embedding_column, self.name)
        if width is not None and width != self.embedding_dim:  # a list column's width is checked row by row
            raise ColumnError(
                f"{self.name} takes {self.embedding_dim}-d embeddings but column "
                f"{self.embedding_column!r} holds {width}-d ones (use the CLIP the classifier was trained on)"
            )

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.pred_column: empty_column(FLOAT32)}

    def load_model(self) -> tuple[torch.nn.Module, torch.device]:
        """The module with the checkpoint's weights, on this worker's device; called once per worker."""
        import torch

        from dask_clip.models.classifiers import load_classifier

        device = torch.device(resolve_device(self.device))
        logger.info("%s: loading %s on %s", self.label, self.model_path, device)
        return load_classifier(self.build_module(), self.model_path).to(device), device

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        """``pred_column`` for one shard's rows."""
        import torch

        module, device = model
        valid, vectors = unit_embeddings(rows[self.embedding_column], self.embedding_dim, rows[task.id_col])
        predictions = np.zeros(len(vectors), dtype=np.float32)
        with task.timed("infer_s"), torch.inference_mode():
            for start in range(0, len(vectors), self.batch_size):
                batch = torch.from_numpy(vectors[start : start + self.batch_size]).to(device)
                predictions[start : start + len(batch)] = module(batch)[:, 0].float().cpu().numpy()
        column = np.zeros(len(rows), dtype=np.float32)
        column[valid] = predictions
        return {self.pred_column: nullable(column, valid, FLOAT32)}


class AestheticClassifier(EmbeddingClassifier):
    """LAION's improved aesthetic predictor (v2) on CLIP ViT-L/14 image embeddings: a score, about 0-10.

    ``model_path``: the published ``sac+logos+ava1-l14-linearMSE.pth`` (a torch state dict; it is
    loaded with ``weights_only=True``) or the same weights as safetensors. Higher is prettier;
    LAION-Aesthetics used 5, 6 and 6.5 as cut-offs.
    """

    default_pred_column = "aesthetic_score"

    def build_module(self) -> torch.nn.Module:
        from dask_clip.models.classifiers import AestheticMlp

        return AestheticMlp(self.embedding_dim)


class NsfwClassifier(EmbeddingClassifier):
    """LAION's CLIP-based NSFW detector on CLIP ViT-L/14 image embeddings: a probability, 0-1 (1 = NSFW).

    ``model_path``: a safetensors file or torch state dict with ``norm.mean``, ``norm.variance``
    (``(768,)`` or Keras's ``(1, 768)``) and ``linear_1`` ... ``linear_4`` ``weight``/``bias`` (Dense 64,
    512, 256, 1), the layout of LAION's PyTorch port of ``clip_autokeras_binary_nsfw``.
    """

    default_pred_column = "nsfw_score"

    def build_module(self) -> torch.nn.Module:
        from dask_clip.models.classifiers import NsfwMlp

        return NsfwMlp(self.embedding_dim)
