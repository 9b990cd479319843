"""Thumbnails of a dataset's images: decoded under the same pixel limit as for embedding, turned upright (EXIF
orientation), at most ``max_side`` pixels on their longer side, encoded as JPEG, and cached on disk.

``row_thumbnail`` is what a page or a notebook asks for: one row's image (its tar, recorded location and key),
read with one ranged read (``io.image_access``) the first time and from the cache after. The cache key holds the
tar's URL and identity (size, ETag or modification time), the key and ``max_side``: a replaced tar never serves
the thumbnails of the one before.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from dask_clip.errors import ImageDecodeError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS, open_image, pillow_bomb_reason, to_rgb
from dask_clip.io.image_access import check_tar_identity, current_tar_identity, read_member

DEFAULT_MAX_SIDE = 256
JPEG_QUALITY = 85


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dask_clip/thumbnails`` (``~/.cache/dask_clip/thumbnails`` when that is unset)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dask_clip" / "thumbnails"


def thumbnail(
    image_bytes: bytes, max_side: int = DEFAULT_MAX_SIDE, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> bytes:
    """An encoded image (any format Pillow reads) -> a JPEG at most ``max_side`` pixels on its longer side, upright.

    Raises ``ImageDecodeError`` with the reason embedding gives the same image (not an image, over
    ``max_image_pixels``, cannot decode).
    """
    image = open_image(image_bytes, max_image_pixels)
    try:
        if image.format == "JPEG":
            image.draft("RGB", (max_side, max_side))  # decode at a reduced scale: far less work for a large photo
        upright = ImageOps.exif_transpose(image)
        small = to_rgb(upright)
        small.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(pillow_bomb_reason(error, max_image_pixels)) from None
    except Exception as error:  # noqa: BLE001 - Pillow's decoders raise many types on malformed data
        raise ImageDecodeError(f"cannot decode image: {str(error) or type(error).__name__}") from None
    encoded = io.BytesIO()
    small.save(encoded, "JPEG", quality=JPEG_QUALITY)
    return encoded.getvalue()


class ThumbnailCache:
    """Thumbnails in ``folder``, one file each, named by the digest of what identifies it.

    ``max_bytes`` bounds the bytes of the files this cache wrote (None: no bound): a ``put`` that would pass it
    first deletes the files it wrote that were least recently used (written or read), and a thumbnail larger than
    the bound is not kept. It deletes only files it wrote itself: a file another process or an earlier run left in
    ``folder`` is read as a hit, but neither counted nor deleted. Safe to use from many threads.
    """

    def __init__(self, folder: str | Path | None = None, max_bytes: int | None = None) -> None:
        self.folder = Path(folder) if folder is not None else default_cache_dir()
        self.max_bytes = max_bytes
        self._written: OrderedDict[Path, int] = OrderedDict()  # least recently used first, with its bytes
        self._bytes = 0
        self._made_folders: set[Path] = set()
        self._lock = threading.Lock()

    @property
    def bytes_written(self) -> int:
        """The bytes of the files this cache wrote that it holds now (at most ``max_bytes``)."""
        return self._bytes

    def path(self, identity: dict[str, Any]) -> Path:
        name = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
        return self.folder / name[:2] / f"{name}.jpg"

    def get(self, identity: dict[str, Any]) -> bytes | None:
        """The cached thumbnail, or None."""
        path = self.path(identity)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        with self._lock:
            if path in self._written:
                self._written.move_to_end(path)
        return data or None

    def put(self, identity: dict[str, Any], data: bytes) -> None:
        """Cache ``data``: written to a temporary file and renamed, so a reader never sees half of it; then the
        least recently used files this cache wrote are deleted until it holds at most ``max_bytes``."""
        if self.max_bytes is not None and len(data) > self.max_bytes:
            return
        path = self.path(identity)
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._made_folders.add(path.parent)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".", suffix=".tmp", delete=False) as file:
            file.write(data)
        os.replace(file.name, path)
        with self._lock:
            self._bytes += len(data) - self._written.pop(path, 0)
            self._written[path] = len(data)
            while self.max_bytes is not None and self._bytes > self.max_bytes:
                oldest, size = self._written.popitem(last=False)
                self._bytes -= size
                oldest.unlink(missing_ok=True)

    def clear(self) -> None:
        """Delete every file this cache wrote, and the empty folders it made for them."""
        with self._lock:
            for path in self._written:
                path.unlink(missing_ok=True)
            self._written.clear()
            self._bytes = 0
            for folder in self._made_folders:
                with contextlib.suppress(OSError):  # not empty: holds files this cache did not write
                    folder.rmdir()
            self._made_folders.clear()


def row_thumbnail(
    tar_url: str,
    offset: int,
    size: int,
    key: object,
    *,
    tar_identity: dict[str, Any] | None = None,
    max_side: int = DEFAULT_MAX_SIDE,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    cache: ThumbnailCache | None = None,
) -> bytes:
    """The JPEG thumbnail of the row ``key`` whose image lies at ``offset`` (``size`` bytes) in ``tar_url``.

    ``tar_identity`` is the identity recorded with the locations (``io.image_access.recorded_tar_identity``):
    given, the tar's is checked against it on every call (a ``stat``, or a HEAD request on object storage).
    ``cache`` defaults to ``ThumbnailCache()`` in the user's cache folder. Raises ``ImageLocationError`` for a
    stale or wrong location, ``ImageDecodeError`` for an image that cannot be made into a thumbnail.
    """
    if tar_identity is not None:
        check_tar_identity(tar_url, tar_identity)
    cache = cache or ThumbnailCache()
    identity = {
        "tar": tar_url,
        "tar_identity": tar_identity or current_tar_identity(tar_url),
        "key": str(key),
        "offset": int(offset),
        "max_side": max_side,
        "max_image_pixels": max_image_pixels,
    }
    cached = cache.get(identity)
    if cached is not None:
        return cached
    data = thumbnail(read_member(tar_url, offset, size, key=key), max_side, max_image_pixels)
    cache.put(identity, data)
    return data
