"""Image embeddings from any timm model, preprocessed with the model's own pretrained config."""

from __future__ import annotations

import logging
from typing import Any

from dask_clip.arguments import at_least, model_id
from dask_clip.embedders.base import ImageEmbedder, ModelDescription
from dask_clip.errors import UsageError
from dask_clip.models.device import resolve_device
from dask_clip.models.loading import file_version, resolved_model_path
from dask_clip.models.timm import TimmModel, describe_timm_model

logger = logging.getLogger(__name__)


class TimmImageEmbedder(ImageEmbedder):
    """Embeddings from a timm model (e.g. ``vit_large_patch14_clip_quickgelu_224.openai``, 768-d).

    Preprocessing follows the model's pretrained config (input size, interpolation, mean/std,
    crop_pct). Weights come from the hub when ``pretrained`` (needs network) or from
    ``checkpoint_path`` (safetensors or a state dict); with neither, every worker would draw its
    own random weights, so that is refused. ``model_kwargs`` go to ``timm.create_model`` (e.g.
    ``{"num_classes": 0}`` for pooled features without the head). ``num_threads_per_worker`` sets
    torch's intra-op threads on each worker. ``decode_mode`` is ``"exact"`` (timm's own Pillow
    transforms) by default; ``"fast"`` and ``"device"`` are as for ``ClipImageEmbedder``. Every
    other option is keyword-only and described in ``ImageEmbedder``.
    """

    default_decode_mode = "exact"

    def __init__(
        self,
        model_name: str,
        *,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        num_threads_per_worker: int = 4,
        **options: Any,
    ) -> None:
        self.model_name = model_id("model_name", model_name)
        self.num_threads_per_worker = at_least("num_threads_per_worker", num_threads_per_worker)
        if not pretrained and not checkpoint_path:
            raise UsageError(
                f"{model_name}: give pretrained=True or a checkpoint_path; random weights would differ on every worker"
            )
        self.pretrained = pretrained
        self.checkpoint_path = resolved_model_path(checkpoint_path) if checkpoint_path else None
        self.model_kwargs = dict(model_kwargs or {})
        super().__init__(**options)

    def describe_model(self, max_image_pixels: int) -> ModelDescription:
        width, preprocess = describe_timm_model(self.model_name, self.model_kwargs, max_image_pixels)
        identity = {
            "model_name": self.model_name,
            "pretrained": self.pretrained,
            "checkpoint_path": self.checkpoint_path,
            "checkpoint_version": file_version(self.checkpoint_path) if self.checkpoint_path else None,
            "model_kwargs": self.model_kwargs,
        }
        return ModelDescription(width, preprocess, identity)

    def load_model(self) -> TimmModel:
        import torch

        torch.set_num_threads(self.num_threads_per_worker)
        device = resolve_device(self.device)
        logger.info("%s: loading timm model %s on %s", self.label, self.model_name, device)
        return TimmModel(
            self.model_name,
            self.pretrained,
            self.checkpoint_path,
            self.model_kwargs,
            device,
            self.autocast,
            self.preprocess,
        )
