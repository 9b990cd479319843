"""CLIP score: the cosine similarity between each row's image embedding and its caption's text embedding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.columns import FLOAT32, embedding_width, embeddings_to_numpy, empty_column, nullable, unit_embeddings
from dask_clip.errors import ColumnError
from dask_clip.execution import ShardTask
from dask_clip.operation import Operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


class ClipScore(Operation):
    """Adds ``score_column`` (``float32``, in [-1, 1]): the cosine of each row's image and text embeddings.

    Null when either embedding is missing. Both must come from the same CLIP (same width: checked when applied
    where the columns' types say their widths, as files' footers record them; else row by row, as it runs).
    This is the raw cosine; the CLIPScore paper reports ``2.5 * max(cosine, 0)`` and torchmetrics
    ``100 * max(cosine, 0)``. LAION-400M kept pairs with cosine >= 0.3 (ViT-B/32).
    """

    function_name = "clip_score"

    def __init__(
        self,
        *,
        image_column: str = "image_embedding",
        text_column: str = "text_embedding",
        score_column: str = "clip_score",
    ) -> None:
        self.image_column = image_column
        self.text_column = text_column
        self.score_column = score_column

    def config(self) -> dict[str, Any]:
        return {"image_column": self.image_column, "text_column": self.text_column}

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.image_column, self.text_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        image_width = embedding_width(dataset.meta, self.image_column, self.name)
        text_width = embedding_width(dataset.meta, self.text_column, self.name)
        if None not in (image_width, text_width) and image_width != text_width:
            raise ColumnError(
                f"{self.image_column!r} holds {image_width}-d embeddings but {self.text_column!r} holds "
                f"{text_width}-d ones: image and text embeddings must come from the same CLIP"
            )

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {self.score_column: empty_column(FLOAT32)}

    def process_shard(self, rows: pd.DataFrame, task: ShardTask, model: Any) -> Mapping[str, Any]:
        ids = rows[task.id_col]
        image_vectors = embeddings_to_numpy(rows[self.image_column], ids=ids)
        image_valid, images = unit_embeddings(rows[self.image_column], image_vectors.shape[1] or None, ids)
        text_valid, texts = unit_embeddings(rows[self.text_column], image_vectors.shape[1] or None, ids)
        both = image_valid & text_valid
        cosines = np.zeros(len(rows), dtype=np.float32)
        cosines[both] = np.einsum("nd,nd->n", images[both[image_valid]], texts[both[text_valid]])
        return {self.score_column: nullable(cosines, both, FLOAT32)}


def clip_score(
    dataset: ImageTextPairDataset,
    image_column: str = "image_embedding",
    text_column: str = "text_embedding",
    score_column: str = "clip_score",
) -> ImageTextPairDataset:
    """A new dataset with ``score_column``: ``ClipScore`` applied to ``dataset``."""
    return ClipScore(image_column=image_column, text_column=text_column, score_column=score_column)(dataset)
