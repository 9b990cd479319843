"""Image embeddings from any timm model, preprocessed with the model's own pretrained config."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from PIL import Image

from dask_clip.distributed.model_cache import make_cache_key
from dask_clip.embedders.base import ImageEmbedder, LoadedImageModel
from dask_clip.embedders.image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS, PreprocessConfig, resolve_decode_mode
from dask_clip.embedders.inference import autocast_dtype_for, resolve_device, reuse_freed_memory, run_on_batch

logger = logging.getLogger(__name__)

TIMM_EXTRA_HINT = "pip install timm"
RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR, "nearest": Image.Resampling.NEAREST}


def _import_timm() -> Any:
    try:
        import timm
    except ImportError as error:
        raise ImportError(f"TimmImageEmbedder needs timm: {TIMM_EXTRA_HINT}") from error
    return timm


def timm_preprocess_config(data_config: dict[str, Any], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> PreprocessConfig:
    """timm's ``resolve_model_data_config`` -> our ``PreprocessConfig`` (resize to size/crop_pct, centre crop)."""
    if data_config.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {data_config['crop_mode']!r} is not supported; only 'center' is")
    interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in RESAMPLING:
        raise ValueError(f"timm interpolation {interpolation!r} is not supported; use one of {sorted(RESAMPLING)}")
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct", 1.0)
    return PreprocessConfig(
        shortest_edge=math.floor(min(height, width) / crop_pct),
        crop_height=height,
        crop_width=width,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        resample=RESAMPLING[interpolation],
        max_image_pixels=max_image_pixels,
    )


def _create_model(model_name: str, pretrained: bool, checkpoint_path: str | None, model_kwargs: dict[str, Any]) -> Any:
    timm = _import_timm()
    try:
        return timm.create_model(model_name, pretrained=pretrained, checkpoint_path=checkpoint_path or "", **model_kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ValueError(f"unknown timm model {model_name!r}") from None
        raise


class TimmModel(LoadedImageModel):
    """A timm model in eval mode on one device; its output (head included) is the embedding."""

    def __init__(self, model_name: str, pretrained: bool, checkpoint_path: str | None, model_kwargs: dict[str, Any],
                 device: str, autocast: bool, max_image_pixels: int, decode_mode: str) -> None:
        timm = _import_timm()
        self.device = device
        self.model = _create_model(model_name, pretrained, checkpoint_path, model_kwargs).to(device).eval()
        data_config = timm.data.resolve_model_data_config(self.model)
        self.preprocess = timm_preprocess_config(data_config, max_image_pixels).with_decode_mode(decode_mode)
        self.autocast_dtype = autocast_dtype_for(device, autocast)
        reuse_freed_memory()

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return run_on_batch(self.model, images, self.preprocess, self.device, self.autocast_dtype)


class TimmImageEmbedder(ImageEmbedder):
    """Embeddings from a timm model (e.g. ``vit_large_patch14_clip_quickgelu_224.openai``, 768-d).

    Preprocessing follows the model's pretrained config (input size, interpolation, mean/std,
    crop_pct). Weights come from the hub when ``pretrained`` (needs network) or from
    ``checkpoint_path`` (safetensors or a state dict); with neither, every worker would draw its
    own random weights, so that is refused. ``model_kwargs`` go to ``timm.create_model`` (e.g.
    ``{"num_classes": 0}`` for pooled features without the head). ``num_threads_per_worker`` sets
    torch's intra-op threads on each worker. ``decode_mode`` is ``"exact"`` (timm's own Pillow
    transforms) by default; ``"fast"`` and ``"device"`` are as for ``ClipImageEmbedder``.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: bool = False,
        batch_size: int = 32,
        num_threads_per_worker: int = 4,
        normalize_embeddings: bool = True,
        autocast: bool = True,
        image_embedding_column: str = "image_embedding",
        checkpoint_path: str | None = None,
        *,
        device: str | None = None,
        error_column: str = "embedding_error",
        on_error: str = "record",
        decode_threads: int = 2,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        model_kwargs: dict[str, Any] | None = None,
        decode_mode: str = "exact",
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            embedding_column=image_embedding_column,
            error_column=error_column,
            normalize_embeddings=normalize_embeddings,
            remove_image_data=False,
            decode_threads=decode_threads,
            on_error=on_error,
            decode_mode=resolve_decode_mode(decode_mode, autocast),
        )
        if num_threads_per_worker < 1:
            raise ValueError(f"num_threads_per_worker must be at least 1, not {num_threads_per_worker}")
        if not pretrained and not checkpoint_path:
            raise ValueError(
                f"{model_name}: give pretrained=True or a checkpoint_path; random weights would differ on every worker"
            )
        self.model_kwargs = dict(model_kwargs or {})
        self.model_name = model_name
        self.pretrained = pretrained
        self.checkpoint_path = checkpoint_path
        self.num_threads_per_worker = num_threads_per_worker
        self.autocast = autocast
        self.device = device
        self.max_image_pixels = max_image_pixels
        self._embedding_dim = self._output_width()
        self._cache_key = make_cache_key(
            "timm",
            {"model_name": model_name, "pretrained": pretrained, "checkpoint_path": checkpoint_path, "device": device,
             "autocast": autocast, "max_image_pixels": max_image_pixels, "model_kwargs": self.model_kwargs,
             "decode_mode": self.decode_mode},
        )

    def _output_width(self) -> int:
        """The model's output width, read from a weightless copy built on torch's meta device."""
        import torch

        with torch.device("meta"):
            model = _create_model(self.model_name, False, None, self.model_kwargs)
        return int(model.num_classes or model.num_features)

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def cache_key(self) -> str:
        return self._cache_key

    def config(self) -> dict[str, Any]:
        return {**super().config(), "model_name": self.model_name, "pretrained": self.pretrained,
                "checkpoint_path": self.checkpoint_path, "model_kwargs": self.model_kwargs, "autocast": self.autocast,
                "embedding_dim": self.embedding_dim}

    def load_model(self) -> TimmModel:
        import torch

        torch.set_num_threads(self.num_threads_per_worker)
        device = resolve_device(self.device)
        logger.info("loading timm model %s on %s", self.model_name, device)
        return TimmModel(self.model_name, self.pretrained, self.checkpoint_path, self.model_kwargs, device, self.autocast,
                         self.max_image_pixels, self.decode_mode)
