"""CLIP image embeddings with the vision tower of a transformers CLIP model."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dask_clip.arguments import model_id, one_of
from dask_clip.embedders.base import ImageEmbedder, ModelDescription
from dask_clip.errors import UsageError
from dask_clip.models.clip import ClipVisionModel, ImageModelDescription, describe_image_model, model_identity
from dask_clip.models.device import autocast_dtype_for, resolve_device
from dask_clip.models.families import Family
from dask_clip.models.loading import resolved_model_path
from dask_clip.models.openvino import OpenVinoVisionModel
from dask_clip.operation import ModelSpec
from dask_clip.optional import check_installed

logger = logging.getLogger(__name__)

ENGINES = ("torch", "openvino")
PRECISIONS = (None, "int8")


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

    ``engine`` runs the model with ``"torch"`` (default) or ``"openvino"`` (CPU workers only; the ``openvino``
    extra): converted once per machine and cached on disk in ``engine_cache_dir`` (default
    ``~/.cache/dask_clip/openvino``, or ``$DASK_CLIP_CACHE_DIR/openvino``), in bf16 where ``autocast`` runs bf16,
    else fp32. Its embeddings agree with torch fp32's (cosine >= 0.9999 in fp32, >= 0.999 in bf16, checked when
    converted), so the engine is recorded as a property of the column, not as part of its identity: torch and
    OpenVINO shards make one column. ``precision="int8"`` (OpenVINO only, never a default) compresses the weights
    to int8 with NNCF: its embeddings are another column (the precision is part of its identity).
    """

    description: ClipModelDescription

    def __init__(
        self,
        model_dir: str = "openai/clip-vit-large-patch14",
        *,
        engine: str = "torch",
        precision: str | None = None,
        engine_cache_dir: str | None = None,
        **options: Any,
    ) -> None:
        self.model_dir = resolved_model_path(model_id("model_dir", model_dir))
        self.engine = one_of("engine", engine, ENGINES)
        self.precision = one_of("precision", precision, PRECISIONS)
        self.engine_cache_dir = engine_cache_dir
        if engine == "openvino":
            check_installed("openvino", "openvino", "engine='openvino'")
            if precision == "int8":
                check_installed("nncf", "openvino", "precision='int8'")
            options = _on_the_cpu(options)
        elif precision is not None:
            raise UsageError(f"precision={precision!r} needs engine='openvino' (torch runs fp32, or bf16 by autocast)")
        super().__init__(**options)

    def describe_model(self, max_image_pixels: int) -> ClipModelDescription:
        described = describe_image_model(self.model_dir, max_image_pixels)
        identity = model_identity(self.model_dir, described.family)
        return ClipModelDescription(described.width, described.preprocess, identity, described.family)

    def config(self) -> dict[str, Any]:
        config = super().config()
        return {**config, "precision": self.precision} if self.precision is not None else config

    def properties(self) -> dict[str, Any]:
        return {"engine": self.engine}

    def model_spec(self, weights: Mapping[str, Any], load: Callable[[], Any]) -> ModelSpec:
        engine = {"engine": self.engine, "precision": self.precision, "engine_cache_dir": self.engine_cache_dir}
        return super().model_spec({**weights, **engine}, load)

    def load_model(self) -> ClipVisionModel | OpenVinoVisionModel:
        device = resolve_device(self.device)
        logger.info("%s: loading CLIP vision model %s on %s (%s)", self.label, self.model_dir, device, self.engine)
        described = ImageModelDescription(self.description.family, self.embedding_dim, self.preprocess)
        if self.engine == "openvino":
            precision = self.precision or ("bf16" if autocast_dtype_for(device, self.autocast) else "fp32")
            return OpenVinoVisionModel(self.model_dir, described, precision, self.engine_cache_dir)
        return ClipVisionModel(self.model_dir, device, self.autocast, described)


def _on_the_cpu(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of an OpenVINO embedder, on the CPU (it asks for no GPU); ``UsageError`` for a GPU device or for
    ``decode_mode="device"``."""
    if options.get("device") not in (None, "cpu"):
        raise UsageError(f"engine='openvino' runs on CPU workers, not on device={options['device']!r}")
    if options.get("decode_mode") == "device":
        raise UsageError("decode_mode='device' decodes on a GPU: it needs engine='torch'")
    return {**options, "device": "cpu"}
