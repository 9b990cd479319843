"""The app's access to image bytes: one sample's image read from its shard's tar, and its thumbnail.

The seam between the app and the tar-reading code: the app calls ``image_bytes``, ``has_image`` and
``thumbnail_bytes`` only.
Where a row's ``(offset, size)`` is not known, the tar's headers are read once (never a member's data) and the
location of every sample's image is kept, so later reads of that tar are one ranged read each.
"""

from __future__ import annotations

import functools
import io
import tarfile

from PIL import Image, ImageOps

from dask_clip.errors import ImageDecodeError, ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, open_image, pillow_bomb_reason, to_rgb
from dask_clip.io.shards import filesystem_of
from dask_clip.io.tar_samples import IMAGE_EXTENSIONS, normalized_key, split_member_name

TARS_REMEMBERED = 4096
"""Tars whose image locations are kept (a dict of key -> (offset, size) each)."""


def image_bytes(shard_tar_url: str, key: str, offset: int | None = None, size: int | None = None) -> bytes:
    """The encoded image of sample ``key`` in the tar at ``shard_tar_url``, read with one ranged read.

    ``offset`` and ``size`` (bytes of the member's data in the tar) are found from the tar's headers when not
    given. ``ShardReadError`` (naming the tar and the key) when the sample has no image member there.
    """
    if offset is None or size is None:
        location = image_locations(shard_tar_url).get(normalized_key(key))
        if location is None:
            raise ShardReadError(f"{shard_tar_url}: no image member for key {key!r}")
        offset, size = location
    fs, path = filesystem_of(shard_tar_url)
    return fs.cat_file(path, start=offset, end=offset + size)


def has_image(shard_tar_url: str, key: str) -> bool:
    """Whether sample ``key`` has an image member in the tar at ``shard_tar_url``."""
    return normalized_key(key) in image_locations(shard_tar_url)


@functools.lru_cache(maxsize=TARS_REMEMBERED)
def image_locations(shard_tar_url: str) -> dict[str, tuple[int, int]]:
    """Each sample key of the tar (NFC-normalised) -> ``(offset, size)`` of its image member's data: the first
    of ``IMAGE_EXTENSIONS`` it has, as the embedders choose. Reads the headers only (tarfile seeks past data)."""
    rank = {extension: position for position, extension in enumerate(IMAGE_EXTENSIONS)}
    found: dict[str, tuple[int, int, int]] = {}
    fs, path = filesystem_of(shard_tar_url)
    with fs.open(path, "rb") as file, tarfile.open(fileobj=file, mode="r:") as archive:
        for member in archive:
            key, extension = split_member_name(member.name)
            position = rank.get(extension.lower())
            if not member.isfile() or position is None:
                continue
            key = normalized_key(key)
            if key not in found or position < found[key][0]:
                found[key] = (position, member.offset_data, member.size)
    return {key: (offset, size) for key, (_, offset, size) in found.items()}


def thumbnail_bytes(
    image: bytes, max_side: int = 256, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, quality: int = 85
) -> bytes:
    """A JPEG of ``image`` (encoded bytes) upright and at most ``max_side`` pixels on its longest side.

    ``ImageDecodeError`` with the reason for data that is no image, or an image over ``max_image_pixels``
    (checked from its header, before its pixels are decoded).
    """
    opened = open_image(image, max_image_pixels)
    try:
        if opened.format == "JPEG":
            opened.draft("RGB", (max_side, max_side))
        upright = ImageOps.exif_transpose(opened)
        upright.thumbnail((max_side, max_side))
        output = io.BytesIO()
        to_rgb(upright).save(output, format="JPEG", quality=quality)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(pillow_bomb_reason(error, max_image_pixels)) from None
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types on malformed data
        raise ImageDecodeError(f"cannot decode image: {str(error) or type(error).__name__}") from None
    return output.getvalue()
