"""timm models: creating one (weights from the hub or a local checkpoint), its output width and its
preprocessing, read from the model's own pretrained data config."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from dask_clip.errors import ModelLoadError, UsageError
from dask_clip.images.preprocess import PreprocessConfig
from dask_clip.models.device import autocast_dtype_for, run_on_batch
from dask_clip.optional import require

RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def import_timm() -> Any:
    """The timm module, or a ``MissingDependencyError`` naming the timm extra."""
    return require("timm", "timm", "TimmImageEmbedder")


def timm_preprocess_config(data_config: dict[str, Any], max_image_pixels: int) -> PreprocessConfig:
    """timm's ``resolve_model_data_config`` -> our ``PreprocessConfig`` (resize to size/crop_pct, centre crop)."""
    if data_config.get("crop_mode", "center") != "center":
        raise UsageError(f"timm crop_mode {data_config['crop_mode']!r} is not supported; only 'center' is")
    interpolation = data_config.get("interpolation", "bicubic")
    if interpolation not in RESAMPLING:
        raise UsageError(f"timm interpolation {interpolation!r} is not supported; use one of {sorted(RESAMPLING)}")
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


def create_timm_model(
    model_name: str, pretrained: bool, checkpoint_path: str | None, model_kwargs: dict[str, Any]
) -> Any:
    """``timm.create_model``; an unknown name is a ``UsageError``, unloadable weights a ``ModelLoadError``."""
    timm = import_timm()
    try:
        return timm.create_model(
            model_name, pretrained=pretrained, checkpoint_path=checkpoint_path or "", **model_kwargs
        )
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise UsageError(f"unknown timm model {model_name!r}") from None
        raise ModelLoadError(f"cannot create timm model {model_name!r}: {error}") from error
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot load the weights of timm model {model_name!r}: {error}") from error


def describe_timm_model(
    model_name: str, model_kwargs: dict[str, Any], max_image_pixels: int
) -> tuple[int, PreprocessConfig]:
    """On the client: the output width and preprocessing of ``model_name``, from a weightless copy built on
    torch's meta device."""
    import torch

    with torch.device("meta"):
        model = create_timm_model(model_name, False, None, model_kwargs)
    data_config = import_timm().data.resolve_model_data_config(model)
    return int(model.num_classes or model.num_features), timm_preprocess_config(data_config, max_image_pixels)


class TimmModel:
    """A timm model in eval mode on one device; its output (head included) is the embedding."""

    def __init__(
        self,
        model_name: str,
        pretrained: bool,
        checkpoint_path: str | None,
        model_kwargs: dict[str, Any],
        device: str,
        autocast: bool,
        preprocess: PreprocessConfig,
    ) -> None:
        self.device = device
        self.preprocess = preprocess
        self.model = create_timm_model(model_name, pretrained, checkpoint_path, model_kwargs).to(device).eval()
        self.autocast_dtype = autocast_dtype_for(device, autocast)

    def embed(self, images: list[Any]) -> np.ndarray:
        """Preprocessed ``uint8`` images -> the model's output ``float32 (B, D)``."""
        return run_on_batch(self.model, images, self.preprocess, self.device, self.autocast_dtype)
