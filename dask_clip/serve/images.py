"""The app's access to image bytes: where a sample's image lies in its shard's tar, and its thumbnail.

The app calls ``has_image`` and ``thumbnail_bytes`` only. A tar's image locations are read once, from its member
headers alone (``io.image_access.sample_images``, the embedders' image-member rule), and
kept; each thumbnail is then one ranged read checked against the member's header
(``images.thumbnails.row_thumbnail``), made under ``max_image_pixels`` and cached on disk.
"""

from __future__ import annotations

import functools

from dask_clip.errors import ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import DEFAULT_MAX_SIDE, ThumbnailCache, row_thumbnail
from dask_clip.io.image_access import sample_images
from dask_clip.io.tar_samples import normalized_key

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
    return {normalized_key(key): found for key, found in sample_images(shard_tar_url) if found is not None}
