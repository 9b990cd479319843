"""Choosing a model's device and dtype, and running a torch vision model on a batch of preprocessed images."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_clip.errors import DeviceUnavailableError
from dask_clip.images.preprocess import PreprocessConfig, to_pixel_values


def resolve_device(device: str | None) -> str:
    """``None`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; anything else as given, once it is
    checked that a ``"cuda"`` device exists here (else ``DeviceUnavailableError``)."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= visible:
            raise DeviceUnavailableError(
                f"device {device!r} was asked for, but this process on {socket.gethostname()} sees "
                f"{visible} CUDA GPU(s) (torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Run on GPU workers (dask cuda worker, or get_client(cluster_type='gpu')), or give "
                "device=None (the GPU when there is one) or device='cpu'."
            )
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
    forward: Callable[[Any], Any],
    images: list[np.ndarray],
    preprocess: PreprocessConfig,
    device: Any,
    autocast_dtype: Any,
) -> np.ndarray:
    """``uint8 (H, W, 3)`` images -> ``forward(pixels)`` as ``float32 (B, D)`` numpy, under inference mode."""
    import torch

    pixels = to_pixel_values(images, preprocess, device, torch.float32)
    autocast = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        embeddings = forward(pixels)
    return embeddings.float().cpu().numpy()
