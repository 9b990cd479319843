"""The app's access to image bytes: where each row's image lies in its shard's tar, and its thumbnail.

A shard's image locations are the ``image_offset`` and ``image_size`` columns that ``LocateImages`` recorded
(``dask-clip locate``) when the tar's identity recorded with them is the tar's now; otherwise (no such columns, no
identity recorded, or a tar replaced since) they are read once, on first use, from the tar's member headers alone
(``io.image_access.sample_images``, the embedders' image-member rule), and ``sources`` says why. Either way a
thumbnail is then one ranged read checked against the member's header (``images.thumbnails.row_thumbnail``), made
under ``max_image_pixels`` and cached on disk; serving one never scans a tar.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pandas as pd

from dask_clip.errors import ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import DEFAULT_MAX_SIDE, ThumbnailCache, row_thumbnail
from dask_clip.io.image_access import current_tar_identity, recorded_tar_identity, sample_images
from dask_clip.io.shards import Shard
from dask_clip.io.tar_samples import normalized_key
from dask_clip.ops.locate import OFFSET, SIZE

RECORDED = "recorded"
TAR_HEADERS = "tar headers"


class ImageLocator:
    """Each row's image location, by its shard's stem, its key and its position in the catalog's frame.

    ``frame`` holds one row per sample (``stem``, ``key`` and, when recorded, ``OFFSET`` and ``SIZE``);
    ``sources`` has one entry per shard: ``{"stem", "source": RECORDED or TAR_HEADERS, "reason"}`` (the reason why
    the recorded locations are not used, else None)."""

    def __init__(self, shards: dict[str, Shard], frame: pd.DataFrame) -> None:
        self.shards = shards
        recorded = OFFSET in frame.columns and SIZE in frame.columns
        self._offsets = _int64_or_missing(frame[OFFSET]) if recorded else np.empty(0, np.int64)
        self._sizes = _int64_or_missing(frame[SIZE]) if recorded else np.empty(0, np.int64)
        self.identities: dict[str, dict[str, Any]] = {}
        self.sources = [self._source(shard, recorded) for shard in shards.values()]
        self._headers: dict[str, dict[str, tuple[int, int]]] = {}
        self._locks = {stem: threading.Lock() for stem in shards}

    def _source(self, shard: Shard, recorded: bool) -> dict[str, Any]:
        """Whether ``shard``'s recorded locations are used, and why not; keeps the identity of those that are."""
        if not recorded:
            reason = f"no {OFFSET!r} column: run `dask-clip locate` to record where the images lie"
        elif (identity := recorded_tar_identity(shard.parquet_url, OFFSET)) is None:
            reason = f"{shard.parquet_url} records no tar identity for {OFFSET!r}: run `dask-clip locate` again"
        elif identity != (current := current_tar_identity(shard.tar_url)):
            reason = (
                f"{shard.tar_url} changed since its images were located (recorded {identity}, now {current}): "
                "run `dask-clip locate` again"
            )
        else:
            self.identities[shard.stem] = identity
            return {"stem": shard.stem, "source": RECORDED, "reason": None}
        return {"stem": shard.stem, "source": TAR_HEADERS, "reason": reason}

    def summary(self) -> dict[str, Any]:
        """Shards counted by source, and the reasons of those read from their tar headers (most frequent first)."""
        reasons = pd.Series([s["reason"] for s in self.sources if s["source"] == TAR_HEADERS], dtype=object)
        return {
            RECORDED: sum(s["source"] == RECORDED for s in self.sources),
            TAR_HEADERS: len(self.sources) - sum(s["source"] == RECORDED for s in self.sources),
            "reasons": {str(reason): int(count) for reason, count in reasons.value_counts().items()},
            "shards": self.sources,
        }

    def location(self, stem: str, key: str, position: int) -> tuple[int, int] | None:
        """``(offset, size)`` of the image of row ``key`` (at ``position`` in the frame) of shard ``stem``, or None
        when its sample has no image member."""
        if stem in self.identities:
            offset, size = int(self._offsets[position]), int(self._sizes[position])
            return (offset, size) if offset >= 0 else None
        return self._from_headers(stem).get(normalized_key(key))

    def _from_headers(self, stem: str) -> dict[str, tuple[int, int]]:
        """Each sample key of shard ``stem``'s tar -> its image member's location, read from the headers once (one
        reader per tar: a request that comes while another reads them waits for it)."""
        found = self._headers.get(stem)
        if found is not None:
            return found
        with self._locks[stem]:
            if stem not in self._headers:
                tar_url = self.shards[stem].tar_url
                self._headers[stem] = {normalized_key(k): at for k, at in sample_images(tar_url) if at is not None}
            return self._headers[stem]

    def thumbnail(
        self,
        stem: str,
        key: str,
        position: int,
        cache: ThumbnailCache,
        max_side: int = DEFAULT_MAX_SIDE,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> bytes:
        """A JPEG of the image of row ``key`` of shard ``stem``, upright, at most ``max_side`` pixels on its longer
        side.

        ``ShardReadError`` (naming the tar and the key) when the sample has no image member there;
        ``ImageLocationError`` when the tar changed since its locations were read; ``ImageDecodeError`` with the
        reason for data that is no image, or an image over ``max_image_pixels``.
        """
        tar_url = self.shards[stem].tar_url
        location = self.location(stem, key, position)
        if location is None:
            raise ShardReadError(f"{tar_url}: no image member for key {key!r}")
        offset, size = location
        return row_thumbnail(
            tar_url,
            offset,
            size,
            key,
            tar_identity=self.identities.get(stem),
            max_side=max_side,
            max_image_pixels=max_image_pixels,
            cache=cache,
        )


def _int64_or_missing(column: pd.Series) -> np.ndarray:
    """A nullable integer column as ``int64 (n,)``, -1 where it is null."""
    return column.astype("Int64").fillna(-1).to_numpy(dtype=np.int64)
