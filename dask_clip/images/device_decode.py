"""``decode_mode="device"``: JPEGs decoded in batches on the model's device, nvJPEG on a GPU.

The decode threads only read each image's header (``prepare_image``): a plain JPEG stays encoded
as an ``EncodedJpeg``, anything else is decoded by Pillow there as in the other modes. At batch
time ``decode_on_device`` decodes the JPEGs with TorchCodec (nvJPEG on CUDA, libjpeg-turbo on the
CPU), resizes with torch's antialiased interpolation and centre-crops, all on the device. On the
CPU the pixels are identical to the Pillow path with ``torch_resize``: that is how the tests cover
this module on machines without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import ExifTags

from dask_clip.errors import DeviceSetupError, ImageDecodeError
from dask_clip.gpu_environment import detect, out_of_memory_is_loud
from dask_clip.images.preprocess import (
    TORCH_RESAMPLE,
    PreprocessConfig,
    open_for_preprocessing,
    preprocess_opened,
    resize_chw,
)
from dask_clip.optional import check_installed, require

logger = logging.getLogger(__name__)

DEVICE_DECODE = "decode_mode='device'"
DEVICE_DECODE_PIXELS_PER_CALL = 128_000_000
"""At most this many decoded pixels (3 bytes each) are held on the device by one decode call."""
DEVICE_DECODE_MODES = ("RGB", "L")
"""Pillow modes of the JPEGs decoded on the device; CMYK and others are decoded by Pillow."""


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header passed every check, left encoded for ``decode_on_device``."""

    data: bytes
    width: int
    height: int


def prepare_image(data: bytes, config: PreprocessConfig) -> np.ndarray | EncodedJpeg:
    """On a decode thread: an ``EncodedJpeg`` for a plain JPEG when ``config.device_decode``, else the
    Pillow-decoded ``uint8 (crop_height, crop_width, 3)``; ``ImageDecodeError`` for unusable data.
    """
    image = open_for_preprocessing(data, config)
    if config.device_decode and is_plain_jpeg(image, data, config):
        return EncodedJpeg(data, image.width, image.height)
    return preprocess_opened(image, config)


def is_plain_jpeg(image: Any, data: bytes, config: PreprocessConfig) -> bool:
    """Whether the opened ``image`` is a JPEG for the device decoder: 8-bit RGB or grayscale, upright (no EXIF
    orientation other than 1: decoders differ on whether they apply it), ending with its end-of-image
    marker (a truncated file goes to Pillow, which reports it), and resized with a filter torch has.
    """
    return (
        image.format == "JPEG"
        and image.mode in DEVICE_DECODE_MODES
        and data.endswith(b"\xff\xd9")
        and config.resample in TORCH_RESAMPLE
        and image.getexif().get(ExifTags.Base.Orientation, 1) == 1
    )


def decode_on_device(
    jpegs: Sequence[EncodedJpeg], config: PreprocessConfig, device: Any
) -> list[Any | np.ndarray | ImageDecodeError]:
    """Decode and preprocess ``jpegs`` on ``device``, in calls of at most ``DEVICE_DECODE_PIXELS_PER_CALL``.

    Each result is a ``uint8`` torch tensor ``(3, crop_height, crop_width)`` on ``device``. A JPEG the
    device decoder refuses, or decodes to a size other than its header's, is decoded by Pillow instead
    (``uint8 (crop_height, crop_width, 3)`` numpy); one that Pillow refuses too is its
    ``ImageDecodeError``. Results are in the order of ``jpegs``. Running out of device memory is a
    ``DeviceOutOfMemoryError``, never a fallback.
    """
    decode_jpeg = import_decode_jpeg()
    results: list[Any | np.ndarray | ImageDecodeError] = []
    for chunk in chunks_by_pixels(jpegs, DEVICE_DECODE_PIXELS_PER_CALL):
        with out_of_memory_is_loud(device, len(chunk), "decoding a batch"):
            for jpeg, decoded in zip(chunk, _decode_chunk(decode_jpeg, chunk, device), strict=True):
                if decoded is not None and tuple(decoded.shape) == (3, jpeg.height, jpeg.width):
                    results.append(finish_on_device(decoded, config))
                else:
                    results.append(_decode_with_pillow(jpeg, config))
    return results


def check_device_decode_works(device: Any) -> None:
    """On a worker, when its model is loaded: decode a small JPEG on ``device`` as every batch will, so that a
    decoder that cannot work there (TorchCodec built for another torch, no nvJPEG, no usable device) is a
    ``DeviceSetupError`` before the first shard rather than a silent fallback to Pillow for every image."""
    decode_jpeg = import_decode_jpeg()
    try:
        decoded = decode_jpeg([_probe_jpeg()], mode="RGB", device=device)[0]
    except Exception as error:  # whatever fails here would fail for every image
        raise DeviceSetupError(
            f"TorchCodec cannot decode JPEGs on {device} {detect().describe()}: {type(error).__name__}: {error}. "
            "Fix: install the TorchCodec release built for this torch (and CUDA) on every worker, or give "
            "decode_mode='fast' to decode with Pillow on the CPU threads."
        ) from error
    if tuple(decoded.shape) != (3, 8, 16):
        raise DeviceSetupError(f"TorchCodec decoded an 8x16 JPEG on {device} to shape {tuple(decoded.shape)}")


def _probe_jpeg() -> bytes:
    """A small JPEG (16 x 8 pixels, RGB) made with Pillow."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 60)).save(buffer, format="JPEG")
    return buffer.getvalue()


def check_device_decode_available() -> None:
    """``MissingDependencyError`` naming the gpu extra, without importing torch, if TorchCodec is missing."""
    check_installed("torchcodec", "gpu", DEVICE_DECODE)


def import_decode_jpeg() -> Callable[..., Any]:
    """TorchCodec's ``decode_jpeg``; a ``MissingDependencyError`` naming the gpu extra when it is not installed,
    a ``DeviceSetupError`` when it is installed but its native library does not load (TorchCodec raises
    ``OSError`` or ``RuntimeError`` when it was built for another torch or finds no FFmpeg)."""
    try:
        return require("torchcodec.decoders", "gpu", DEVICE_DECODE).decode_jpeg
    except (OSError, RuntimeError) as error:
        raise DeviceSetupError(
            f"TorchCodec {_installed_version('torchcodec')} is installed but does not load {detect().describe()}: "
            f"{type(error).__name__}: {error}. Fix: install the TorchCodec release made for torch "
            f"{_installed_version('torch')} (TorchCodec's README has the table) and FFmpeg's libraries, or give "
            "decode_mode='fast'."
        ) from error


def _installed_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


def chunks_by_pixels(jpegs: Sequence[EncodedJpeg], max_pixels: int) -> Iterator[Sequence[EncodedJpeg]]:
    """Consecutive runs of ``jpegs`` whose pixels add up to at most ``max_pixels`` (a larger JPEG alone)."""
    start, pixels = 0, 0
    for index, jpeg in enumerate(jpegs):
        if index > start and pixels + jpeg.width * jpeg.height > max_pixels:
            yield jpegs[start:index]
            start, pixels = index, 0
        pixels += jpeg.width * jpeg.height
    if start < len(jpegs):
        yield jpegs[start:]


def _decode_chunk(decode_jpeg: Callable[..., Any], chunk: Sequence[EncodedJpeg], device: Any) -> list[Any | None]:
    """``uint8 (3, H, W)`` tensors on ``device``, ``None`` for a JPEG the decoder refuses.

    One batched call (one nvJPEG call on CUDA); when it fails, the JPEGs are decoded one by one to find
    which fail, since the decoder reports one error for the whole batch. Running out of memory is raised.
    """
    import torch

    try:
        return list(decode_jpeg([jpeg.data for jpeg in chunk], mode="RGB", device=device))
    except torch.OutOfMemoryError:
        raise  # not the JPEGs' fault: out_of_memory_is_loud reports it
    except (RuntimeError, ValueError) as batch_error:
        logger.debug("batched device decode of %d JPEGs failed (%s); decoding them one by one", len(chunk), batch_error)
    decoded: list[Any | None] = []
    for jpeg in chunk:
        try:
            decoded.append(decode_jpeg(jpeg.data, mode="RGB", device=device))
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError) as error:
            logger.debug("device decoder refused a JPEG (%s); Pillow decodes it", error)
            decoded.append(None)
    return decoded


def _decode_with_pillow(jpeg: EncodedJpeg, config: PreprocessConfig) -> np.ndarray | ImageDecodeError:
    try:
        return preprocess_opened(open_for_preprocessing(jpeg.data, config), config)
    except ImageDecodeError as error:
        return error


def finish_on_device(pixels: Any, config: PreprocessConfig) -> Any:
    """A decoded ``uint8 (3, H, W)`` tensor -> resized and centre-cropped ``(3, crop_height, crop_width)``."""
    width, height = config.resized(pixels.shape[2], pixels.shape[1])
    resized = resize_chw(pixels, width, height, TORCH_RESAMPLE[config.resample])
    return center_crop_chw(resized, config.crop_height, config.crop_width)


def center_crop_chw(pixels: Any, crop_height: int, crop_width: int) -> Any:
    """Centre-crop a ``(3, H, W)`` tensor as ``image_preprocessing.center_crop`` does, zero-padding a small image."""
    import torch

    height, width = pixels.shape[1:]
    pad_height, pad_width = max(crop_height - height, 0), max(crop_width - width, 0)
    if pad_height or pad_width:
        pixels = torch.nn.functional.pad(
            pixels, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2, pad_height - pad_height // 2)
        )
        height, width = pixels.shape[1:]
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return pixels[:, top : top + crop_height, left : left + crop_width]
