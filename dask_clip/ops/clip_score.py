"""CLIP score: the cosine similarity between each row's image embedding and its caption's text embedding."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.embeddings import embedding_width, unit_embeddings

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


def clip_score(
    dataset: "ImageTextPairDataset",
    image_column: str = "image_embedding",
    text_column: str = "text_embedding",
    score_column: str = "clip_score",
) -> "ImageTextPairDataset":
    """A new dataset with ``score_column`` (``float32``, in [-1, 1]): cosine of image and text embeddings.

    Null when either embedding is missing. Both must come from the same CLIP (same width, checked
    here). This is the raw cosine; the CLIPScore paper reports ``2.5 * max(cosine, 0)`` and
    torchmetrics ``100 * max(cosine, 0)``. LAION-400M kept pairs with cosine >= 0.3 (ViT-B/32).
    """
    meta = dataset.pandas_metadata._meta
    image_width, text_width = embedding_width(meta, image_column), embedding_width(meta, text_column)
    if image_width != text_width:
        raise ValueError(
            f"{image_column!r} holds {image_width}-d embeddings but {text_column!r} holds {text_width}-d ones: "
            "image and text embeddings must come from the same CLIP"
        )

    def score(rows: pd.DataFrame) -> pd.DataFrame:
        image_valid, images = unit_embeddings(rows[image_column])
        text_valid, texts = unit_embeddings(rows[text_column])
        both = image_valid & text_valid
        cosines = np.zeros(len(rows), dtype=np.float32)
        cosines[both] = np.einsum(
            "nd,nd->n", images[both[image_valid]], texts[both[text_valid]]
        )
        values = pd.arrays.ArrowExtensionArray(pa.array(cosines, mask=~both))
        return rows.assign(**{score_column: pd.Series(values, index=rows.index)})

    output_meta = meta.assign(**{score_column: pd.Series([], dtype=pd.ArrowDtype(pa.float32()))})
    metadata = dataset.pandas_metadata.map_partitions(score, meta=output_meta, enforce_metadata=False)
    config = {"function": "clip_score", "image_column": image_column, "text_column": text_column}
    return dataset.with_metadata(metadata, derived_columns={score_column: config})
