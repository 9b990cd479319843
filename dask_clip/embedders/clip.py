"""CLIP image embeddings with the vision tower of a transformers CLIP model."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from dask_clip.distributed.model_cache import make_cache_key
from dask_clip.embedders.base import ImageEmbedder, LoadedImageModel
from dask_clip.embedders.image_preprocessing import DEFAULT_MAX_IMAGE_PIXELS, PreprocessConfig, resolve_decode_mode
from dask_clip.embedders.inference import autocast_dtype_for, resolve_device, reuse_freed_memory, run_on_batch

logger = logging.getLogger(__name__)

HOW_TO_PROVIDE_WEIGHTS = (
    "Give model_dir a hub id this machine can download, or a local directory written by "
    "CLIPModel.save_pretrained (with its image processor's preprocessor_config.json): on a machine "
    "with network, `huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`, then copy DIR."
)


class ModelLoadError(OSError):
    """The model's configuration or weights cannot be found or are not safe to load."""


def read_model_json(model_dir: str, filename: str) -> dict[str, Any]:
    """A JSON file of ``model_dir`` (local directory or hub id), as a dict; ``ModelLoadError`` if absent."""
    from transformers.utils import cached_file

    if model_dir.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(model_dir)):
        raise ModelLoadError(f"model directory {model_dir!r} does not exist.\n{HOW_TO_PROVIDE_WEIGHTS}")
    try:
        path = cached_file(model_dir, filename)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {filename} of model {model_dir!r}: {error}\n{HOW_TO_PROVIDE_WEIGHTS}") from None
    if path is None:
        raise ModelLoadError(f"model {model_dir!r} has no {filename}.\n{HOW_TO_PROVIDE_WEIGHTS}")
    with open(path) as file:
        return json.load(file)


def projection_dim_of(config: dict[str, Any]) -> int:
    """The embedding width in a CLIP ``config.json`` (full model or vision tower only)."""
    vision = config.get("vision_config", config)
    dim = config.get("projection_dim", vision.get("projection_dim"))
    if dim is None:
        raise ModelLoadError(f"config has no projection_dim (model_type {config.get('model_type')!r})")
    return int(dim)


def preprocess_config(model_dir: str, max_image_pixels: int, decode_mode: str) -> PreprocessConfig:
    """The model's image processor settings, with the switches of ``decode_mode`` (see ``DECODE_MODES``)."""
    config = PreprocessConfig.from_processor_dict(
        read_model_json(model_dir, "preprocessor_config.json"), max_image_pixels=max_image_pixels
    )
    return config.with_decode_mode(decode_mode)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (a full CLIP's text weights go unused)."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _load_vision_tower(model_dir: str) -> Any:
    """``CLIPVisionModelWithProjection`` from safetensors weights only (never a pickled checkpoint)."""
    from transformers import CLIPVisionModelWithProjection

    try:
        return CLIPVisionModelWithProjection.from_pretrained(model_dir, use_safetensors=True)
    except OSError as error:
        raise ModelLoadError(
            f"cannot load CLIP weights from {model_dir!r} (only safetensors files are accepted, never "
            f"pickled checkpoints): {error}\n{HOW_TO_PROVIDE_WEIGHTS}"
        ) from None


class ClipVisionModel(LoadedImageModel):
    """The projection-headed vision tower of a CLIP checkpoint, on one device, in eval mode."""

    def __init__(
        self, model_dir: str, device: str, autocast: bool, max_image_pixels: int, decode_mode: str = "exact"
    ) -> None:
        import torch

        self.device = torch.device(device)
        self.preprocess = preprocess_config(model_dir, max_image_pixels, resolve_decode_mode(decode_mode, autocast))
        with _quiet_transformers():
            model = _load_vision_tower(model_dir)
        self.model = model.to(self.device).eval()
        self.autocast_dtype = autocast_dtype_for(device, autocast)
        reuse_freed_memory()  # after the load, so that the load's own temporary buffers are returned

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        return run_on_batch(
            lambda pixels: self.model(pixel_values=pixels).image_embeds, images, self.preprocess, self.device,
            self.autocast_dtype,
        )


class ClipImageEmbedder(ImageEmbedder):
    """CLIP image embeddings of every image of a dataset, as a new column.

    ``model_dir`` is a hub id or a local ``save_pretrained`` directory of a ``CLIPModel`` or a
    ``CLIPVisionModelWithProjection`` (with ``preprocessor_config.json``). The output column holds
    ``float32`` vectors of the model's projection size (768 for ViT-L/14), L2-normalised when
    ``normalize_embeddings``. ``device=None`` uses CUDA when the worker has it, else the CPU;
    ``autocast`` runs bf16 where the device computes it natively.

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

    def __init__(
        self,
        model_dir: str = "openai/clip-vit-large-patch14",
        model_inference_batch_size: int = 32,
        num_gpus_per_worker: float = 0.25,
        verbose: bool = False,
        remove_image_data: bool = False,
        normalize_embeddings: bool = True,
        autocast: bool = True,
        embedding_column: str = "image_embedding",
        device: str | None = None,
        *,
        error_column: str = "embedding_error",
        on_error: str = "record",
        decode_threads: int = 2,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        decode_mode: str | None = None,
    ) -> None:
        super().__init__(
            batch_size=model_inference_batch_size,
            embedding_column=embedding_column,
            error_column=error_column,
            normalize_embeddings=normalize_embeddings,
            remove_image_data=remove_image_data,
            verbose=verbose,
            decode_threads=decode_threads,
            on_error=on_error,
            decode_mode=resolve_decode_mode(decode_mode, autocast),
        )
        if not model_dir:
            raise ValueError("model_dir is empty: give a hub id or a local save_pretrained directory")
        self.model_dir = str(model_dir)
        self.num_gpus_per_worker = num_gpus_per_worker
        self.autocast = autocast
        self.device = device
        self.max_image_pixels = max_image_pixels
        self._embedding_dim = projection_dim_of(read_model_json(self.model_dir, "config.json"))
        self._cache_key = make_cache_key(
            "clip-vision", {"model_dir": self.model_dir, "device": device, "autocast": autocast, "max_image_pixels": max_image_pixels,
             "decode_mode": self.decode_mode}
        )

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    @property
    def cache_key(self) -> str:
        return self._cache_key

    def config(self) -> dict[str, Any]:
        return {
            **super().config(), "model_dir": self.model_dir, "autocast": self.autocast,
            "embedding_dim": self.embedding_dim,
        }

    def task_resources(self) -> dict[str, float]:
        return {"GPU": self.num_gpus_per_worker} if self.device != "cpu" and self.num_gpus_per_worker else {}

    def load_model(self) -> ClipVisionModel:
        device = resolve_device(self.device)
        logger.info("loading CLIP vision model %s on %s", self.model_dir, device)
        return ClipVisionModel(self.model_dir, device, self.autocast, self.max_image_pixels, self.decode_mode)
