"""The image and text towers of a CLIP-family checkpoint (CLIP, SigLIP: ``models.families``), ready on one device.

``describe_*`` functions run on the client: they read the folder's JSON files and check that its weights
and tokenizer are there, so that a model that cannot be loaded fails before any shard runs. The towers
are loaded in float32 whatever the dtype of the weights on disk (fp16 and bf16 checkpoints included):
``autocast`` then runs bf16 where the device computes it natively.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dask_clip.errors import ModelLoadError
from dask_clip.images.preprocess import PreprocessConfig
from dask_clip.models.device import autocast_dtype_for, run_on_batch
from dask_clip.models.families import Family, family_of
from dask_clip.models.loading import (
    check_safetensors_weights,
    check_tokenizer_files,
    load_pretrained,
    model_version,
    read_model_json,
)


@dataclass(frozen=True)
class ImageModelDescription:
    """What the client knows of an image model without loading its weights."""

    family: Family
    width: int
    preprocess: PreprocessConfig


@dataclass(frozen=True)
class TextModelDescription:
    """What the client knows of a text model without loading its weights."""

    family: Family
    width: int
    context_length: int


def model_identity(model_dir: str, family: Family) -> dict[str, Any]:
    """What the embedders record of the model that produced a column (``config()``): its id, its family and the
    version of its weights (``loading.model_version``). Search builds a query model's identity with it too."""
    return {"model_dir": model_dir, "family": family.name, "model_version": model_version(model_dir)}


def describe_image_model(model_dir: str, max_image_pixels: int) -> ImageModelDescription:
    """On the client: the family, embedding width and image preprocessing of ``model_dir``, once its weights
    are known to be there (``ModelLoadError`` otherwise)."""
    config = read_model_json(model_dir, "config.json")
    family = family_of(config, model_dir)
    try:
        preprocess = PreprocessConfig.from_processor_dict(
            read_model_json(model_dir, "preprocessor_config.json"), max_image_pixels=max_image_pixels
        )
    except ValueError as error:
        raise ModelLoadError(f"{model_dir!r}: {error}") from None
    check_safetensors_weights(model_dir)
    return ImageModelDescription(family, family.image_width(config), preprocess)


def describe_text_model(model_dir: str) -> TextModelDescription:
    """On the client: the family, text embedding width and context of ``model_dir``, once its weights and
    tokenizer are found."""
    config = read_model_json(model_dir, "config.json")
    family = family_of(config, model_dir)
    check_safetensors_weights(model_dir)
    check_tokenizer_files(model_dir)
    return TextModelDescription(family, family.text_width(config), family.context_length(config))


def load_tower(family: Family, model_dir: str, tower: str, width: int) -> Any:
    """The ``tower`` (``"vision"`` or ``"text"``) of ``model_dir`` in float32, on the CPU, in train mode."""
    import torch
    import transformers

    model_class = getattr(transformers, family.vision_class if tower == "vision" else family.text_class)
    config = family.tower_config(model_dir, tower, width)
    return load_pretrained(model_class, model_dir, f"{family.name} {tower} tower", config=config, dtype=torch.float32)


class ClipVisionModel:
    """The image tower of a CLIP-family checkpoint, on one device, in eval mode.

    ``preprocess`` says how it wants its pixels; ``device`` is where ``decode_mode="device"`` decodes JPEGs.
    """

    def __init__(self, model_dir: str, device: str, autocast: bool, described: ImageModelDescription) -> None:
        import torch

        self.device = torch.device(device)
        self.preprocess = described.preprocess
        self.attribute = described.family.image_attribute
        self.model = load_tower(described.family, model_dir, "vision", described.width).to(self.device).eval()
        self.autocast_dtype = autocast_dtype_for(device, autocast)

    def embed(self, images: list[Any]) -> np.ndarray:
        """Preprocessed ``uint8`` images (numpy ``(H, W, 3)`` or torch ``(3, H, W)`` on ``device``) ->
        raw (unnormalised) embeddings ``float32 (B, D)``."""
        return run_on_batch(
            lambda pixels: getattr(self.model(pixel_values=pixels), self.attribute),
            images,
            self.preprocess,
            self.device,
            self.autocast_dtype,
        )


class ClipTextModel:
    """A CLIP-family tokenizer and text tower on one device, in eval mode."""

    def __init__(self, model_dir: str, device: str, described: TextModelDescription) -> None:
        import torch
        from transformers import AutoTokenizer

        check_tokenizer_files(model_dir)
        self.device = torch.device(device)
        self.described = described
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"cannot load the tokenizer of {model_dir!r}: {error}") from None
        self.model = load_tower(described.family, model_dir, "text", described.width).to(self.device).eval()

    def embed(self, captions: list[str]) -> np.ndarray:
        """Captions -> raw (unnormalised) text embeddings ``float32 (B, D)``, each truncated to the context."""
        import torch

        family = self.described.family
        tokens = self.tokenizer(
            captions,
            padding="max_length" if family.pad_to_context else True,
            truncation=True,
            max_length=self.described.context_length,
            return_tensors="pt",
        ).to(self.device)
        inputs = {"input_ids": tokens["input_ids"]}
        if not family.pad_to_context:
            inputs["attention_mask"] = tokens["attention_mask"]
        with torch.inference_mode():
            outputs = self.model(**inputs)
        return getattr(outputs, family.text_attribute).float().cpu().numpy()
