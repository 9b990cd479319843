"""CLIP image embeddings with the vision tower of a transformers CLIP model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dask_clip.arguments import model_id
from dask_clip.embedders.base import ImageEmbedder, ModelDescription
from dask_clip.models.clip import ClipVisionModel, ImageModelDescription, describe_image_model, model_identity
from dask_clip.models.device import resolve_device
from dask_clip.models.families import Family
from dask_clip.models.loading import resolved_model_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipModelDescription(ModelDescription):
    """A CLIP-family image model's description, with its family (which tower a worker loads)."""

    family: Family


class ClipImageEmbedder(ImageEmbedder):
    """CLIP image embeddings of every image of a dataset, as a new column.

    ``model_dir`` is a hub id or a local ``save_pretrained`` directory of a ``CLIPModel`` or a
    ``CLIPVisionModelWithProjection`` (with ``preprocessor_config.json``; safetensors weights only). The
    output column holds ``float32`` vectors of the model's projection size (768 for ViT-L/14),
    L2-normalised when ``normalize_embeddings``. Every other option is keyword-only and described in
    ``ImageEmbedder``.

    ``decode_mode="fast"`` decodes a JPEG at 1/2, 1/4 or 1/8 scale (``Image.draft``) when it is at
    least twice the resized size, and resizes with torch's antialiased uint8 bicubic (as transformers
    5's torchvision backend does) instead of Pillow's: about 3x faster decoding, embeddings within
    cosine ~0.998 of the exact ones on real photos. ``"exact"`` decodes at full size and resizes
    with Pillow, as transformers' ``CLIPImageProcessor`` does (cosine >= 0.9999). ``None``
    (default) is ``"exact"`` with ``autocast=False`` (the setting that matches transformers) and
    ``"fast"`` otherwise (the same accuracy class as bf16 autocast). ``"device"`` is for GPU workers:
    JPEGs are decoded in batches on the model's device with nvJPEG (through TorchCodec, the ``gpu``
    extra) and resized there with torch's bicubic; other images, and JPEGs nvJPEG refuses, are
    decoded by Pillow on the decode threads. Its pixels are those of ``"fast"`` without the reduced-size
    JPEG decode.
    """

    description: ClipModelDescription

    def __init__(self, model_dir: str = "openai/clip-vit-large-patch14", **options: Any) -> None:
        self.model_dir = resolved_model_path(model_id("model_dir", model_dir))
        super().__init__(**options)

    def describe_model(self, max_image_pixels: int) -> ClipModelDescription:
        described = describe_image_model(self.model_dir, max_image_pixels)
        identity = model_identity(self.model_dir, described.family)
        return ClipModelDescription(described.width, described.preprocess, identity, described.family)

    def load_model(self) -> ClipVisionModel:
        device = resolve_device(self.device)
        logger.info("%s: loading CLIP vision model %s on %s", self.label, self.model_dir, device)
        described = ImageModelDescription(self.description.family, self.embedding_dim, self.preprocess)
        return ClipVisionModel(self.model_dir, device, self.autocast, described)
