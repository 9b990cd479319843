"""CLIP text embeddings of the captions in a dataset's metadata, with the text tower of a transformers CLIP."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.arguments import at_least, model_id
from dask_clip.columns import embedding_dtype, empty_column, l2_normalize, to_embedding_array
from dask_clip.execution import ShardTask
from dask_clip.models.clip import ClipTextModel, describe_text_model, model_identity
from dask_clip.models.device import resolve_device
from dask_clip.models.loading import resolved_model_path
from dask_clip.operation import ModelOperation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)


class ClipTextEmbedder(ModelOperation):
    """``embedder(dataset)`` -> a new dataset with the CLIP text embedding of each row's caption.

    ``model_dir``: the same CLIP as the image embeddings (hub id or ``save_pretrained`` folder of a
    ``CLIPModel`` or ``CLIPTextModelWithProjection``) with its tokenizer files. Captions are read from
    ``caption_column`` (img2dataset writes ``caption``) and truncated to CLIP's 77 tokens (start and
    end of text included). ``embedding_column`` holds ``float32`` vectors of the projection size,
    L2-normalised when ``normalize_embeddings``; null where the caption is null. ``device``,
    ``num_gpus_per_worker`` and ``name`` are as for every ``ModelOperation``.
    """

    def __init__(
        self,
        model_dir: str = "openai/clip-vit-large-patch14",
        *,
        batch_size: int = 256,
        embedding_column: str = "text_embedding",
        caption_column: str = "caption",
        normalize_embeddings: bool = True,
        device: str | None = None,
        num_gpus_per_worker: float = 0.25,
        name: str | None = None,
    ) -> None:
        super().__init__(device=device, num_gpus_per_worker=num_gpus_per_worker, name=name)
        self.model_dir = resolved_model_path(model_id("model_dir", model_dir))
        self.batch_size = at_least("batch_size", batch_size)
        self.embedding_column = embedding_column
        self.caption_column = caption_column
        self.normalize_embeddings = normalize_embeddings
        self.described = describe_text_model(self.model_dir)
        self.embedding_dim = self.described.width
        self.identity = model_identity(self.model_dir, self.described.family)
        self.model = self.model_spec(self.identity, self.load_model)

    def config(self) -> dict[str, Any]:
        """The options that determine the embeddings, recorded next to them in the parquet."""
        return {
            **self.identity,
            "caption_column": self.caption_column,
            "normalize_embeddings": self.normalize_embeddings,
            "embedding_dim": self.embedding_dim,
            "context_length": self.described.context_length,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.caption_column]

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.embedding_column: empty_column(embedding_dtype(self.embedding_dim))}

    def load_model(self) -> ClipTextModel:
        """Load the tokenizer and text tower on this worker; called once per worker process."""
        device = resolve_device(self.device)
        logger.info("%s: loading CLIP text model %s on %s", self.label, self.model_dir, device)
        return ClipTextModel(self.model_dir, device, self.described)

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        """The embedding of each caption of one shard (null where the caption is null)."""
        captions = rows[self.caption_column]
        valid = captions.notna().to_numpy()
        texts = [str(caption) for caption in captions[valid]]
        vectors = np.zeros((len(rows), self.embedding_dim), dtype=np.float32)
        with task.timed("infer_s"):
            embedded = [model.embed(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        if embedded:
            stacked = np.concatenate(embedded)
            vectors[valid] = l2_normalize(stacked) if self.normalize_embeddings else stacked
        return {self.embedding_column: to_embedding_array(vectors, valid)}
