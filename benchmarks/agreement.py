"""How close the fast decode is to the exact one, and both to transformers: the cosine of the final
(L2-normalised) embeddings of the same photos through ``decode_mode="fast"``, ``"exact"`` and
``CLIPImageProcessor`` + ``CLIPModel.get_image_features``, on the CPU in fp32."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np


def agreement(model_dir: Path, jpegs: list[bytes]) -> dict[str, float]:
    """Cosine of final embeddings: fast vs exact decode, and each vs transformers' own pipeline."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from dask_clip.columns import l2_normalize
    from dask_clip.images.preprocess import decode_and_preprocess
    from dask_clip.models.clip import ClipVisionModel, describe_image_model

    described = describe_image_model(str(model_dir), 10**9)
    modes = {
        mode: dataclasses.replace(described, preprocess=described.preprocess.with_decode_mode(mode))
        for mode in ("exact", "fast")
    }
    exact = ClipVisionModel(str(model_dir), "cpu", False, modes["exact"])
    fast = ClipVisionModel(str(model_dir), "cpu", False, modes["fast"])
    e_exact = l2_normalize(exact.embed([decode_and_preprocess(j, exact.preprocess) for j in jpegs]))
    e_fast = l2_normalize(fast.embed([decode_and_preprocess(j, fast.preprocess) for j in jpegs]))
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels)
    reference = l2_normalize(getattr(features, "pooler_output", features).numpy())
    cos_fast_exact = np.sum(e_fast * e_exact, axis=1)
    cos_exact_ref = np.sum(e_exact * reference, axis=1)
    cos_fast_ref = np.sum(e_fast * reference, axis=1)
    return {
        "images": len(jpegs),
        "fast_vs_exact_min": float(cos_fast_exact.min()),
        "fast_vs_exact_mean": float(cos_fast_exact.mean()),
        "exact_vs_transformers_min": float(cos_exact_ref.min()),
        "fast_vs_transformers_min": float(cos_fast_ref.min()),
        "fast_vs_transformers_mean": float(cos_fast_ref.mean()),
    }
