"""The contrastive image-text model families dask_clip embeds with, and how each one's checkpoint is read.

A family says, from a checkpoint's ``config.json``, how wide its image and text embeddings are, which
transformers classes load its towers (never the whole model: a CLIPModel's text tower stays on disk when
images are embedded), where a forward pass puts the embedding, and how captions are padded.

- CLIP (``model_type`` ``clip``, ``clip_vision_model``, ``clip_text_model``): the embedding is the
  projection. A full model's width is its top-level ``projection_dim``, which wins over the one nested in
  ``vision_config`` (LAION's checkpoints, and any CLIPModel saved by transformers 4, keep the default 512
  there while the projection is 1024 or 1280 wide).
- SigLIP, and SigLIP 2 at fixed resolution (``siglip``, ``siglip_vision_model``, ``siglip_text_model``):
  the embedding is the attention-pooled output; captions are padded to the full context.
- SigLIP 2 NaFlex (``siglip2``, variable resolution and aspect ratio) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dask_clip.errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    """How to read one family's checkpoints."""

    name: str
    vision_class: str
    text_class: str
    vision_config_class: str
    text_config_class: str
    image_attribute: str
    """The attribute of the image tower's output that holds the embedding."""
    text_attribute: str
    """The attribute of the text tower's output that holds the embedding."""
    pad_to_context: bool
    """Whether captions are padded to the whole context (SigLIP reads the last position) or to the longest."""

    def image_width(self, config: dict[str, Any]) -> int:
        """The width of an image embedding, from a full or vision-only ``config.json``."""
        vision = config.get("vision_config", config)
        if self.name == "CLIP":
            width = config.get("projection_dim", vision.get("projection_dim"))
        else:
            width = vision.get("hidden_size")
        if width is None:
            raise ModelLoadError(
                f"{self.name} config has no image embedding width (model_type {config.get('model_type')!r})"
            )
        return int(width)

    def text_width(self, config: dict[str, Any]) -> int:
        """The width of a text embedding, from a full or text-only ``config.json``."""
        text = config.get("text_config", config)
        if self.name == "CLIP":
            width = config.get("projection_dim", text.get("projection_dim"))
        else:
            width = text.get("projection_size") or text.get("hidden_size")
        if width is None:
            raise ModelLoadError(
                f"{self.name} config has no text embedding width (model_type {config.get('model_type')!r})"
            )
        return int(width)

    def context_length(self, config: dict[str, Any]) -> int:
        """How many tokens the text tower reads (start and end of text included)."""
        text = config.get("text_config", config)
        return int(text.get("max_position_embeddings", 77 if self.name == "CLIP" else 64))

    def tower_config(self, model_dir: str, tower: str, width: int) -> Any:
        """The transformers config of the ``tower`` ("vision" or "text") of ``model_dir``, with the embedding
        width this family reads from the full config (the nested one may disagree)."""
        import transformers

        config_class = getattr(transformers, self.vision_config_class if tower == "vision" else self.text_config_class)
        config = config_class.from_pretrained(model_dir)
        if self.name == "CLIP":
            config.projection_dim = width
        return config


CLIP = Family(
    "CLIP",
    "CLIPVisionModelWithProjection",
    "CLIPTextModelWithProjection",
    "CLIPVisionConfig",
    "CLIPTextConfig",
    "image_embeds",
    "text_embeds",
    pad_to_context=False,
)
SIGLIP = Family(
    "SigLIP",
    "SiglipVisionModel",
    "SiglipTextModel",
    "SiglipVisionConfig",
    "SiglipTextConfig",
    "pooler_output",
    "pooler_output",
    pad_to_context=True,
)
FAMILIES = {
    "clip": CLIP,
    "clip_vision_model": CLIP,
    "clip_text_model": CLIP,
    "siglip": SIGLIP,
    "siglip_vision_model": SIGLIP,
    "siglip_text_model": SIGLIP,
}


def family_of(config: dict[str, Any], model_dir: str) -> Family:
    """The family of a checkpoint from its ``config.json``; ``ModelLoadError`` for one dask_clip does not embed with."""
    model_type = config.get("model_type")
    if model_type == "siglip2":
        raise ModelLoadError(
            f"{model_dir!r} is a SigLIP 2 NaFlex checkpoint (model_type 'siglip2': variable resolution and aspect "
            "ratio), which dask_clip does not support; use a fixed-resolution SigLIP 2 checkpoint "
            "(e.g. google/siglip2-base-patch16-224, model_type 'siglip')"
        )
    if model_type not in FAMILIES:
        raise ModelLoadError(
            f"{model_dir!r} has model_type {model_type!r}; dask_clip embeds with {sorted(FAMILIES)} checkpoints"
        )
    return FAMILIES[model_type]
