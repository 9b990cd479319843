"""Running a torch vision model on a batch of preprocessed images, shared by every embedder."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_clip.embedders.image_preprocessing import PreprocessConfig, to_pixel_values


def resolve_device(device: str | None) -> str:
    """``None`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 runs natively here (CUDA with bf16, or a CPU with AVX512-BF16 or AMX)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype_for(device: str, autocast: bool) -> Any:
    """``torch.bfloat16`` when ``autocast`` is asked for and the device runs it natively, else None (fp32)."""
    import torch

    return torch.bfloat16 if autocast and bf16_is_fast(device) else None


def run_on_batch(
    forward: Callable[[Any], Any], images: list[np.ndarray], preprocess: PreprocessConfig, device: Any, autocast_dtype: Any
) -> np.ndarray:
    """``uint8 (H, W, 3)`` images -> ``forward(pixels)`` as ``float32 (B, D)`` numpy, under inference mode."""
    import torch

    pixels = to_pixel_values(images, preprocess, device, torch.float32)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        embeddings = forward(pixels)
    return embeddings.float().cpu().numpy()
