"""Choosing a model's device and dtype, and running a torch vision model on a batch of preprocessed images."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import numpy as np

from dask_clip.errors import DeviceUnavailableError
from dask_clip.gpu_environment import check_torch_sees_gpus, detect, has_native_bf16, out_of_memory_is_loud
from dask_clip.images.preprocess import PreprocessConfig, to_pixel_values


def resolve_device(device: str | None) -> str:
    """``None`` -> ``"cuda"`` when torch can use a GPU, else ``"cpu"``; anything else as given, once it is
    checked that a ``"cuda"`` device exists here (else ``DeviceUnavailableError``).

    ``None`` on a machine whose driver sees GPUs that torch cannot use (a CUDA build mismatch, a CPU-only
    torch) is a ``DeviceSetupError``, not a quiet run on the CPU.
    """
    import torch

    if device is None:
        if torch.cuda.is_available():
            return "cuda"
        check_torch_sees_gpus(detect())
        return "cpu"
    if torch.device(device).type == "cuda":
        index = torch.device(device).index or 0
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            check_torch_sees_gpus(detect())  # a GPU worker whose torch cannot use its GPUs says so
        if index >= visible:
            raise DeviceUnavailableError(
                f"device {device!r} was asked for, but this process on {socket.gethostname()} sees "
                f"{visible} CUDA GPU(s) (torch {torch.__version__}, built for CUDA {torch.version.cuda}). "
                "Run on GPU workers (dask cuda worker, or get_client(cluster_type='gpu')), or give "
                "device=None (the GPU when there is one) or device='cpu'."
            )
    return device


def bf16_is_fast(device: str) -> bool:
    """Whether bfloat16 runs natively here: a GPU of compute capability 8.0 or newer (torch's
    ``is_bf16_supported`` also counts emulation, as on a T4), or a CPU with AVX512-BF16 or AMX."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and has_native_bf16(torch.cuda.get_device_capability(device))
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
    """``uint8 (H, W, 3)`` images -> ``forward(pixels)`` as ``float32 (B, D)`` numpy, under inference mode.

    A batch that does not fit in the device's memory is a ``DeviceOutOfMemoryError`` (it stops the run).
    """
    import torch

    autocast = (
        torch.autocast(torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with out_of_memory_is_loud(device, len(images)):
        pixels = to_pixel_values(images, preprocess, device, torch.float32)
        with torch.inference_mode(), autocast:
            embeddings = forward(pixels)
        return embeddings.float().cpu().numpy()
