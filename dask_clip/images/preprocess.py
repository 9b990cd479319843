"""Decode image bytes and preprocess them as CLIP or SigLIP does, without needless copies or float images.

An image becomes a ``uint8`` array of shape ``(crop_height, crop_width, 3)`` on the decode threads;
the conversion to normalised float pixels happens once per batch, on the model's device.
CLIP's preprocessing: resize the shortest side to ``shortest_edge`` (bicubic), centre-crop, scale
to [0, 1], subtract the mean and divide by the standard deviation per channel. SigLIP's: resize to a
fixed size whatever the aspect ratio (``exact_size``), no crop, then the same scaling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from dask_clip.arguments import one_of
from dask_clip.errors import ImageDecodeError

DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
"""Images with more pixels than this are refused before they are decoded (decompression bombs)."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

DECODE_MODES = ("fast", "exact", "device")
"""``exact``: Pillow at full size, as transformers' ``CLIPImageProcessor``. ``fast``: JPEG DCT scaling and
torch's resize on the decode threads. ``device``: JPEGs decoded in batches on the model's device
(nvJPEG on a GPU) and resized there; other images as in ``fast`` but at full size."""


@dataclass(frozen=True)
class PreprocessConfig:
    """The sizes, statistics and resampling filter of a CLIP or SigLIP image processor."""

    shortest_edge: int = 224
    exact_size: tuple[int, int] | None = None
    """``(height, width)`` to resize every image to, whatever its aspect ratio (SigLIP); None: the shortest
    side goes to ``shortest_edge`` and the aspect ratio is kept (CLIP)."""
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = Image.Resampling.BICUBIC
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    draft: bool = False
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, ``Image.draft``) when it is at least
    twice the resized size, before the bicubic resize: about 2x faster, not bit-identical to transformers."""
    torch_resize: bool = False
    """Resize with torch's antialiased uint8 interpolation (bicubic or bilinear; what transformers 5's
    torchvision backend uses) instead of Pillow's: ~5x faster, within one level of Pillow's pixels."""
    device_decode: bool = False
    """Leave plain JPEGs encoded on the decode threads (only their headers are checked) and decode them
    in batches on the model's device (``device_decode.decode_on_device``)."""

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of an image of ``width`` x ``height`` once resized, before the centre crop."""
        if self.exact_size is not None:
            return self.exact_size[1], self.exact_size[0]
        return resized_size(width, height, self.shortest_edge)

    def with_decode_mode(self, decode_mode: str) -> PreprocessConfig:
        """This configuration with the switches of one of ``DECODE_MODES``."""
        one_of("decode_mode", decode_mode, DECODE_MODES)
        return dataclasses.replace(
            self,
            draft=decode_mode == "fast",
            torch_resize=decode_mode != "exact",
            device_decode=decode_mode == "device",
        )

    @classmethod
    def from_processor_dict(
        cls, config: Mapping[str, Any], max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    ) -> PreprocessConfig:
        """Read a ``preprocessor_config.json`` as transformers' ``CLIPImageProcessor`` or ``SiglipImageProcessor``
        writes it (and as transformers 4's ``CLIPFeatureExtractor`` did: sizes as plain integers).

        ``size`` is ``{"shortest_edge": n}`` (keep the aspect ratio) or ``{"height", "width"}`` (resize to
        exactly that); ``crop_size`` applies when ``do_center_crop`` (by default, when there is one).
        ``ValueError`` for settings that dask_clip cannot reproduce.
        """
        size = config.get("size", {"shortest_edge": 224})
        size = {"shortest_edge": size} if isinstance(size, int) else size
        if "shortest_edge" in size:
            shortest_edge, exact_size = int(size["shortest_edge"]), None
        elif "height" in size and "width" in size:
            exact_size = (int(size["height"]), int(size["width"]))
            shortest_edge = min(exact_size)
        else:
            raise ValueError(f"unsupported image processor size {size!r}: expected shortest_edge, or height and width")
        if not math.isclose(float(config.get("rescale_factor", 1 / 255)), 1 / 255) or not config.get("do_resize", True):
            raise ValueError("unsupported image processor: it does not resize, or rescales by other than 1/255")
        if config.get("do_center_crop", "crop_size" in config):
            crop = config.get("crop_size", shortest_edge)
            crop_height, crop_width = (crop["height"], crop["width"]) if isinstance(crop, Mapping) else (crop, crop)
        else:
            crop_height, crop_width = exact_size or (shortest_edge, shortest_edge)
        normalize = config.get("do_normalize", True)
        return cls(
            shortest_edge=shortest_edge,
            exact_size=exact_size,
            crop_height=int(crop_height),
            crop_width=int(crop_width),
            mean=tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", OPENAI_CLIP_STD)) if normalize else (1.0, 1.0, 1.0),
            resample=int(config.get("resample", Image.Resampling.BICUBIC)),
            max_image_pixels=max_image_pixels,
        )


def resolve_decode_mode(decode_mode: str | None, autocast: bool) -> str:
    """``None`` -> ``"exact"`` when ``autocast=False`` (the setting that matches transformers), else ``"fast"``."""
    if decode_mode is None:
        return "fast" if autocast else "exact"
    return one_of("decode_mode", decode_mode, DECODE_MODES)


def identify_image(data: bytes) -> ImageFile.ImageFile | None:
    """Read the header of ``data`` with the first Pillow plugin that accepts it, as ``Image.open`` does
    but without its decompression-bomb check; ``None`` when no plugin does.

    That check compares with Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` (a warning above it, an
    error above twice it); ``open_image`` applies ``max_image_pixels`` instead.
    """
    Image.preinit()
    Image.init()
    prefix = data[:16]
    for image_format in Image.ID:
        factory, accept = Image.OPEN[image_format]
        accepted = accept is None or accept(prefix)
        if not accepted or isinstance(accepted, str):
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open takes as "not this format"
            continue
    return None


def open_image(data: bytes, max_image_pixels: int) -> Image.Image:
    """Open (without decoding the pixels) and refuse empty data, non-images and decompression bombs."""
    if not data:
        raise ImageDecodeError("empty image file (0 bytes)")
    try:
        image = identify_image(data)
    except Image.DecompressionBombError as error:  # a few plugins (WebP) check Pillow's limit themselves
        raise ImageDecodeError(pillow_bomb_reason(error, max_image_pixels)) from None
    except Exception as error:  # noqa: BLE001 - a plugin that accepted the first bytes failed on its header: any type
        raise ImageDecodeError(f"not a readable image: {str(error) or type(error).__name__}") from None
    if image is None:
        raise ImageDecodeError(f"not a readable image: no Pillow format reads it (data starts with {data[:8]!r})")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_image_pixels:
        raise ImageDecodeError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_image_pixels} "
            "(max_image_pixels)"
        )
    return image


def pillow_bomb_reason(error: Image.DecompressionBombError, max_image_pixels: int) -> str:
    """The reason for an image refused by Pillow's own limit, naming ours too."""
    return f"{error} (Pillow's Image.MAX_IMAGE_PIXELS; max_image_pixels is {max_image_pixels})"


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: transparency is composited on white, 16-bit and 32-bit values are scaled."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / high), 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after scaling the shortest side to ``shortest_edge``, truncated like transformers."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Centre-crop an ``(H, W, 3)`` array, padding with zeros where the image is smaller."""
    height, width = pixels.shape[:2]
    if height >= crop_height and width >= crop_width:
        top, left = (height - crop_height) // 2, (width - crop_width) // 2
        return pixels[top : top + crop_height, left : left + crop_width]
    padded = np.zeros((max(height, crop_height), max(width, crop_width), 3), dtype=pixels.dtype)
    top, left = (padded.shape[0] - height) // 2, (padded.shape[1] - width) // 2
    padded[top : top + height, left : left + width] = pixels
    return center_crop(padded, crop_height, crop_width)


def decode_and_preprocess(data: bytes, config: PreprocessConfig) -> np.ndarray:
    """Image bytes -> ``uint8`` array ``(crop_height, crop_width, 3)``, ready for ``to_pixel_values``.

    Uses the first frame of animations and multi-page files, applies the EXIF orientation, and
    raises ``ImageDecodeError`` with a short reason for anything that is not a usable image.
    """
    return preprocess_opened(open_for_preprocessing(data, config), config)


def open_for_preprocessing(data: bytes, config: PreprocessConfig) -> ImageFile.ImageFile:
    """``open_image``, also refusing an image that would be over ``max_image_pixels`` once resized."""
    image = open_image(data, config.max_image_pixels)
    check_resized(image, config)
    return image


def check_resized(image: Image.Image, config: PreprocessConfig) -> None:
    """``ImageDecodeError`` when ``image`` would be over ``max_image_pixels`` once resized as ``config`` says."""
    resized_width, resized_height = config.resized(image.width, image.height)
    if resized_width * resized_height > config.max_image_pixels:  # e.g. 2x30000: small, but huge once resized
        raise ImageDecodeError(
            f"image is {image.width}x{image.height}: resized to {resized_width}x{resized_height} it would be "
            f"over the limit of {config.max_image_pixels} pixels (max_image_pixels)"
        )


def preprocess_opened(image: ImageFile.ImageFile, config: PreprocessConfig) -> np.ndarray:
    """An image from ``open_for_preprocessing`` -> ``uint8 (crop_height, crop_width, 3)``, decoded by Pillow."""
    return resize_and_crop(decode_opened(image, [config]), config)


def decode_opened(image: ImageFile.ImageFile, configs: Sequence[PreprocessConfig]) -> Image.Image:
    """An opened image decoded once, upright and in RGB, for every one of ``configs`` to resize.

    A JPEG is decoded at a reduced scale only when every config drafts, and then no smaller than the largest
    size any of them resizes to (with one config: exactly its own draft).
    """
    with decode_errors(configs[0].max_image_pixels):
        if image.format == "JPEG" and all(config.draft for config in configs):
            sizes = [config.resized(image.width, image.height) for config in configs]
            image.draft(image.mode, (max(width for width, _ in sizes), max(height for _, height in sizes)))
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy of an upright image
        rgb = to_rgb(image)
        rgb.load()
        return rgb


def resize_and_crop(rgb: Image.Image, config: PreprocessConfig) -> np.ndarray:
    """A decoded RGB image (``decode_opened``) resized and centre-cropped -> ``uint8 (crop_height, crop_width, 3)``."""
    with decode_errors(config.max_image_pixels):
        width, height = config.resized(rgb.width, rgb.height)
        if config.torch_resize and config.resample in TORCH_RESAMPLE:
            pixels = resize_with_torch(rgb, width, height, TORCH_RESAMPLE[config.resample])
        else:
            pixels = np.asarray(rgb.resize((width, height), resample=config.resample))
    return center_crop(pixels, config.crop_height, config.crop_width)


@contextlib.contextmanager
def decode_errors(max_image_pixels: int) -> Iterator[None]:
    """Pillow's failures while decoding or resizing, as ``ImageDecodeError`` with a short reason."""
    try:
        yield
    except Image.DecompressionBombError as error:  # Pillow's limit, checked again by some decoders (TIFF, GIF)
        raise ImageDecodeError(pillow_bomb_reason(error, max_image_pixels)) from None
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types on malformed data
        raise ImageDecodeError(f"cannot decode image: {str(error) or type(error).__name__}") from None


TORCH_RESAMPLE = {Image.Resampling.BICUBIC: "bicubic", Image.Resampling.BILINEAR: "bilinear"}


def resize_with_torch(image: Image.Image, width: int, height: int, mode: str) -> np.ndarray:
    """An RGB image resized with torch's antialiased uint8 kernels -> ``uint8 (height, width, 3)``, no float copy."""
    import torch

    pixels = torch.from_numpy(np.array(image))  # writable (torch warns about read-only arrays): one ~1 MB copy
    return resize_chw(pixels.permute(2, 0, 1), width, height, mode).permute(1, 2, 0).numpy()


def resize_chw(pixels: Any, width: int, height: int, mode: str) -> Any:
    """A ``uint8`` torch tensor ``(3, H, W)`` resized (antialiased) to ``(3, height, width)`` on its own device.

    On the CPU torch resizes uint8 directly; elsewhere it resizes float32 and rounds back to uint8.
    """
    import torch

    batch = pixels[None] if pixels.device.type == "cpu" else pixels[None].to(torch.float32)
    resized = torch.nn.functional.interpolate(batch, size=(height, width), mode=mode, antialias=True)[0]
    return resized if resized.dtype == torch.uint8 else resized.round_().clamp_(0, 255).to(torch.uint8)


def to_pixel_values(images: Sequence[Any], config: PreprocessConfig, device: Any, dtype: Any) -> Any:
    """Stack images into normalised pixels: a torch tensor ``(B, 3, H, W)`` on ``device``.

    Each image is a ``uint8`` numpy array ``(H, W, 3)`` (decoded on the host) or a ``uint8`` torch
    tensor ``(3, H, W)`` already on ``device`` (decoded there). Host images are moved as one uint8
    batch (4x less to copy than floats), then everything is scaled on ``device``.
    """
    import torch

    on_host = [index for index, image in enumerate(images) if isinstance(image, np.ndarray)]
    if len(on_host) == len(images):
        batch = torch.from_numpy(np.stack(images)).to(device, non_blocking=True).permute(0, 3, 1, 2)
    else:
        batch = torch.empty((len(images), 3, config.crop_height, config.crop_width), dtype=torch.uint8, device=device)
        if on_host:
            host_batch = torch.from_numpy(np.stack([images[index] for index in on_host])).to(device, non_blocking=True)
            batch[on_host] = host_batch.permute(0, 3, 1, 2)
        for index, image in enumerate(images):
            if not isinstance(image, np.ndarray):
                batch[index] = image
    pixels = batch.to(torch.float32)
    mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(config.std, device=device).view(1, 3, 1, 1) * 255.0
    return ((pixels - mean) / std).to(dtype)
