"""The app's access to image bytes: where a sample's image lies in its shard's tar, and its thumbnail.

The app calls ``has_image`` and ``thumbnail_bytes`` only. A tar's image locations are read once, from its member
headers alone (``io.tar_samples.iter_tar_members(headers_only=True)``, the embedders' image-member rule), and
kept; each thumbnail is then one ranged read checked against the member's header
(``images.thumbnails.row_thumbnail``), made under ``max_image_pixels`` and cached on disk.
"""

from __future__ import annotations

import functools
import itertools

from dask_clip.errors import ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import DEFAULT_MAX_SIDE, ThumbnailCache, row_thumbnail
from dask_clip.io.tar_samples import image_extension, iter_tar_members, normalized_key

TARS_REMEMBERED = 4096
"""Tars whose image locations are kept (a dict of key -> (offset, size) each)."""


def has_image(shard_tar_url: str, key: str) -> bool:
    """Whether sample ``key`` has an image member in the tar at ``shard_tar_url``."""
    return normalized_key(key) in image_locations(shard_tar_url)


def thumbnail_bytes(
    shard_tar_url: str,
    key: str,
    max_side: int = DEFAULT_MAX_SIDE,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cache: ThumbnailCache | None = None,
) -> bytes:
    """A JPEG of sample ``key``'s image, upright, at most ``max_side`` pixels on its longer side.

    ``ShardReadError`` (naming the tar and the key) when the sample has no image member there;
    ``ImageLocationError`` when the tar changed since its headers were read; ``ImageDecodeError`` with the reason
    for data that is no image, or an image over ``max_image_pixels``.
    """
    location = image_locations(shard_tar_url).get(normalized_key(key))
    if location is None:
        raise ShardReadError(f"{shard_tar_url}: no image member for key {key!r}")
    offset, size = location
    return row_thumbnail(
        shard_tar_url, offset, size, key, max_side=max_side, max_image_pixels=max_image_pixels, cache=cache
    )


@functools.lru_cache(maxsize=TARS_REMEMBERED)
def image_locations(shard_tar_url: str) -> dict[str, tuple[int, int]]:
    """Each sample key of the tar (NFC-normalised) -> ``(offset, size)`` of its image member's data."""
    found: dict[str, tuple[int, int]] = {}
    members = iter_tar_members(shard_tar_url, headers_only=True)
    for key, group in itertools.groupby(members, key=lambda member: member.key):
        by_extension = {member.extension: member for member in group}
        image = by_extension.get(image_extension(by_extension) or "")
        if image is not None and image.offset is not None:
            found[normalized_key(key)] = (image.offset, image.size)
    return found
