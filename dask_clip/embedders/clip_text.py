"""CLIP text embeddings of the captions in a dataset's metadata, with the text tower of a transformers CLIP."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from dask_clip.distributed.model_cache import get_or_load, make_cache_key
from dask_clip.embedders.base import l2_normalize
from dask_clip.embedders.clip import (
    HOW_TO_PROVIDE_WEIGHTS, ModelLoadError, _quiet_transformers, projection_dim_of, read_model_json,
)
from dask_clip.embedders.inference import resolve_device
from dask_clip.embeddings import embedding_dtype, to_embedding_array

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

CLIP_CONTEXT_LENGTH = 77
"""Tokens CLIP's text tower reads, start and end of text included; longer captions are truncated."""


def has_tokenizer_files(model_dir: str) -> bool:
    """Whether ``model_dir`` (local folder or hub id) has a tokenizer: ``tokenizer.json`` or ``vocab.json``."""
    from transformers.utils import cached_file

    for name in ("tokenizer.json", "vocab.json"):
        try:
            if cached_file(model_dir, name) is not None:
                return True
        except (OSError, ValueError):
            continue
    return False


class ClipTextModel:
    """A CLIP tokenizer and projection-headed text tower on one device, in eval mode."""

    def __init__(self, model_dir: str, device: str) -> None:
        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        self.device = torch.device(device)
        if not has_tokenizer_files(model_dir):
            # transformers would build an empty tokenizer (every word unknown) without a word of warning
            raise ModelLoadError(
                f"cannot load the tokenizer of {model_dir!r}: it has neither tokenizer.json nor vocab.json\n"
                f"{HOW_TO_PROVIDE_WEIGHTS}"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir!r}: {error}\n{HOW_TO_PROVIDE_WEIGHTS}") from None
        try:
            with _quiet_transformers():
                model = CLIPTextModelWithProjection.from_pretrained(model_dir, use_safetensors=True)
        except OSError as error:
            raise ModelLoadError(
                f"cannot load the CLIP text tower of {model_dir!r} (safetensors only): {error}\n{HOW_TO_PROVIDE_WEIGHTS}"
            ) from None
        self.model = model.to(self.device).eval()

    def embed(self, captions: list[str]) -> np.ndarray:
        """Captions -> raw (unnormalised) text embeddings ``float32 (B, D)``; each truncated to 77 tokens."""
        import torch

        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=CLIP_CONTEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            return self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds.float().cpu().numpy()


class ClipTextEmbedder:
    """``embedder(dataset)`` -> a new dataset with the CLIP text embedding of each row's caption.

    ``model_dir``: the same CLIP as the image embeddings (hub id or ``save_pretrained`` folder of a
    ``CLIPModel`` or ``CLIPTextModelWithProjection``) with its tokenizer files. Captions are read from
    ``caption_column`` (img2dataset writes ``caption``) and truncated to CLIP's 77 tokens (start and
    end of text included). ``embedding_column`` holds ``float32`` vectors of the projection size,
    L2-normalised when ``normalize_embeddings``; null where the caption is null.
    """

    def __init__(
        self,
        model_dir: str = "openai/clip-vit-large-patch14",
        batch_size: int = 256,
        embedding_column: str = "text_embedding",
        caption_column: str = "caption",
        normalize_embeddings: bool = True,
        device: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        if not model_dir:
            raise ValueError("model_dir is empty: give a hub id or a local save_pretrained directory")
        self.model_dir = str(model_dir)
        self.batch_size = batch_size
        self.embedding_column = embedding_column
        self.caption_column = caption_column
        self.normalize_embeddings = normalize_embeddings
        self.device = device
        self.embedding_dim = projection_dim_of(read_model_json(self.model_dir, "config.json"))
        if not has_tokenizer_files(self.model_dir):
            # transformers would otherwise build an empty tokenizer (every word unknown) without a warning
            raise ModelLoadError(
                f"model {self.model_dir!r} has no tokenizer (neither tokenizer.json nor vocab.json)\n{HOW_TO_PROVIDE_WEIGHTS}"
            )
        self.cache_key = make_cache_key("clip-text", {"model_dir": self.model_dir, "device": device})

    def config(self) -> dict[str, Any]:
        """The options that determine the embeddings, recorded next to them in the parquet."""
        return {
            "class": type(self).__name__, "model_dir": self.model_dir, "caption_column": self.caption_column,
            "normalize_embeddings": self.normalize_embeddings, "embedding_dim": self.embedding_dim,
            "context_length": CLIP_CONTEXT_LENGTH,
        }

    def __call__(self, dataset: "ImageTextPairDataset") -> "ImageTextPairDataset":
        """Lazily add ``embedding_column`` to every shard."""
        meta = dataset.pandas_metadata._meta
        if self.caption_column not in meta.columns:
            raise KeyError(f"no caption column {self.caption_column!r}; the columns are {list(meta.columns)}")
        output_meta = meta.assign(**{self.embedding_column: pd.Series([], dtype=embedding_dtype(self.embedding_dim))})
        metadata = dataset.map_shards(self.embed_partition, meta=output_meta)
        return dataset.with_metadata(metadata, derived_columns={self.embedding_column: self.config()})

    def load_model(self) -> ClipTextModel:
        """Load the tokenizer and text tower on this worker; called once per worker process."""
        device = resolve_device(self.device)
        logger.info("loading CLIP text model %s on %s", self.model_dir, device)
        return ClipTextModel(self.model_dir, device)

    def embed_partition(self, rows: pd.DataFrame, tar_url: str, id_col: str) -> pd.DataFrame:
        """One shard's rows plus the embedding of each caption (null where the caption is null)."""
        model = get_or_load(self.cache_key, self.load_model)
        captions = rows[self.caption_column]
        valid = captions.notna().to_numpy()
        texts = [str(caption) for caption in captions[valid]]
        vectors = np.zeros((len(rows), self.embedding_dim), dtype=np.float32)
        embedded = [model.embed(texts[i : i + self.batch_size]) for i in range(0, len(texts), self.batch_size)]
        if embedded:
            stacked = np.concatenate(embedded)
            vectors[valid] = l2_normalize(stacked) if self.normalize_embeddings else stacked
        column = pd.Series(to_embedding_array(vectors, valid), index=rows.index)
        return rows.assign(**{self.embedding_column: column})
