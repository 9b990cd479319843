"""The projection-headed vision and text towers of a transformers CLIP checkpoint, ready on one device.

``describe_*`` functions run on the client: they read the folder's JSON files and check that its weights
and tokenizer are there, so that a model that cannot be loaded fails before any shard runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dask_clip.errors import ModelLoadError
from dask_clip.images.preprocess import PreprocessConfig
from dask_clip.models.device import autocast_dtype_for, run_on_batch
from dask_clip.models.loading import (
    check_safetensors_weights,
    check_tokenizer_files,
    load_pretrained,
    read_model_json,
)

CLIP_CONTEXT_LENGTH = 77
"""Tokens CLIP's text tower reads, start and end of text included; longer captions are truncated."""


def projection_dim_of(config: dict[str, Any]) -> int:
    """The embedding width in a CLIP ``config.json`` (full model or vision tower only)."""
    vision = config.get("vision_config", config)
    dim = config.get("projection_dim", vision.get("projection_dim"))
    if dim is None:
        raise ModelLoadError(f"config has no projection_dim (model_type {config.get('model_type')!r})")
    return int(dim)


def describe_image_model(model_dir: str, max_image_pixels: int) -> tuple[int, PreprocessConfig]:
    """On the client: the embedding width and image preprocessing of ``model_dir``, once its weights are
    known to be there (``ModelLoadError`` otherwise)."""
    width = projection_dim_of(read_model_json(model_dir, "config.json"))
    preprocess = PreprocessConfig.from_processor_dict(
        read_model_json(model_dir, "preprocessor_config.json"), max_image_pixels=max_image_pixels
    )
    check_safetensors_weights(model_dir)
    return width, preprocess


def describe_text_model(model_dir: str) -> int:
    """On the client: the text embedding width of ``model_dir``, once its weights and tokenizer are found."""
    width = projection_dim_of(read_model_json(model_dir, "config.json"))
    check_safetensors_weights(model_dir)
    check_tokenizer_files(model_dir)
    return width


class ClipVisionModel:
    """The projection-headed vision tower of a CLIP checkpoint, on one device, in eval mode.

    ``preprocess`` says how it wants its pixels; ``device`` is where ``decode_mode="device"`` decodes JPEGs.
    """

    def __init__(self, model_dir: str, device: str, autocast: bool, preprocess: PreprocessConfig) -> None:
        import torch
        from transformers import CLIPVisionModelWithProjection

        self.device = torch.device(device)
        self.preprocess = preprocess
        model = load_pretrained(CLIPVisionModelWithProjection, model_dir, "CLIP vision tower")
        self.model = model.to(self.device).eval()
        self.autocast_dtype = autocast_dtype_for(device, autocast)

    def embed(self, images: list[Any]) -> np.ndarray:
        """Preprocessed ``uint8`` images (numpy ``(H, W, 3)`` or torch ``(3, H, W)`` on ``device``) ->
        raw (unnormalised) embeddings ``float32 (B, D)``."""
        return run_on_batch(
            lambda pixels: self.model(pixel_values=pixels).image_embeds,
            images,
            self.preprocess,
            self.device,
            self.autocast_dtype,
        )


class ClipTextModel:
    """A CLIP tokenizer and projection-headed text tower on one device, in eval mode."""

    def __init__(self, model_dir: str, device: str) -> None:
        import torch
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        check_tokenizer_files(model_dir)
        self.device = torch.device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir!r}: {error}") from None
        model = load_pretrained(CLIPTextModelWithProjection, model_dir, "CLIP text tower")
        self.model = model.to(self.device).eval()

    def embed(self, captions: list[str]) -> np.ndarray:
        """Captions -> raw (unnormalised) text embeddings ``float32 (B, D)``; each truncated to 77 tokens."""
        import torch

        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=CLIP_CONTEXT_LENGTH, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            outputs = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return outputs.text_embeds.float().cpu().numpy()
