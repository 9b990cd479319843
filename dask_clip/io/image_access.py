"""Read one image from a shard's tar with one ranged read, at the location ``ops.locate.LocateImages`` recorded.

The read takes the 512-byte tar header just before the member's data too (in every tar format the member's own
header block comes right before its data), and checks it: a valid header checksum, the recorded size and, when
the row's key is given, a member name of that key (matched as ``RowKeys`` matches keys). A wrong offset lands on
anything but such a header, so it is detected whatever the image format; a recorded ``sha256`` is no help here,
as img2dataset hashes the image it downloaded, before resizing it. A tar replaced by one that holds other images
at the same places is caught by its identity (size, ETag or modification time), compared with the one recorded
with the locations (``recorded_tar_identity``).
"""

from __future__ import annotations

import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from dask_clip.errors import ImageLocationError
from dask_clip.io.metadata import read_parquet_schema
from dask_clip.io.shards import filesystem_of
from dask_clip.io.tar_samples import RowKeys, image_extension, iter_tar_members, split_member_name
from dask_clip.provenance import FileRecords, file_identity

HEADER_BYTES = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class ImageLocations:
    """Where the image of each of ``n`` rows lies in a tar: ``offsets`` and ``sizes`` (``int64 (n,)``, bytes),
    valid where ``found`` (``bool (n,)``: False for a row whose sample has no image member, or a sparse one), and
    the tar's sample keys that no row has (``unknown_keys``)."""

    offsets: np.ndarray
    sizes: np.ndarray
    found: np.ndarray
    unknown_keys: list[str]


def sample_images(tar_url: str) -> Iterator[tuple[str, tuple[int, int] | None]]:
    """Each sample key of the uncompressed tar at ``tar_url``, in tar order, with ``(offset, size)`` of its image
    member's data (None without one, or for a sparse member), from the member headers alone: each member's data
    is seeked past, never read. The image member is the one the embedders read (``image_extension``)."""
    members = iter_tar_members(tar_url, headers_only=True)
    for key, group in itertools.groupby(members, key=lambda member: member.key):
        by_extension = {member.extension: member for member in group}
        image = by_extension.get(image_extension(by_extension) or "")
        yield key, (image.offset, image.size) if image is not None and image.offset is not None else None


def image_locations(tar_url: str, keys: RowKeys, rows: int) -> ImageLocations:
    """The image members of ``rows`` rows (matched to sample keys by ``keys``) in the tar at ``tar_url``
    (``sample_images``)."""
    offsets = np.zeros(rows, dtype=np.int64)
    sizes = np.zeros(rows, dtype=np.int64)
    found = np.zeros(rows, dtype=bool)
    unknown: list[str] = []
    for key, location in sample_images(tar_url):
        position = keys.position(key)
        if position is None:
            unknown.append(key)
        elif location is not None:
            (offsets[position], sizes[position]), found[position] = location, True
    return ImageLocations(offsets, sizes, found, unknown)


def recorded_tar_identity(parquet_url: str, offset_column: str = "image_offset") -> dict[str, Any] | None:
    """The identity (size, ETag or modification time) of the tar whose images the shard's parquet at
    ``parquet_url`` located, from its footer; None when it records none (no ``offset_column``, or not dask_clip's)."""
    record = FileRecords.from_schema(read_parquet_schema(parquet_url)).columns.get(offset_column) or {}
    return (record.get("shard") or {}).get("tar")


def current_tar_identity(tar_url: str) -> dict[str, Any]:
    """The tar's identity now, from its listing entry (a ``stat`` locally, a HEAD request on object storage)."""
    fs, path = filesystem_of(tar_url)
    return file_identity(fs.info(path))


def check_tar_identity(tar_url: str, recorded: dict[str, Any]) -> None:
    """``ImageLocationError`` when the tar at ``tar_url`` is not the one ``recorded`` (replaced since located)."""
    current = current_tar_identity(tar_url)
    if current != recorded:
        raise ImageLocationError(
            f"{tar_url}: the tar changed since its images were located (recorded {recorded}, now {current}); "
            "run `dask-clip locate` on the dataset again"
        )


def read_member(
    tar_url: str,
    offset: int,
    size: int,
    *,
    key: object | None = None,
    tar_identity: dict[str, Any] | None = None,
) -> bytes:
    """The ``size`` bytes of the tar member whose data starts at byte ``offset`` of ``tar_url`` (local path or
    fsspec URL), read with one ranged read.

    ``key`` (the row's id) checks that the member belongs to that row; ``tar_identity`` (``recorded_tar_identity``)
    checks first that the tar is the one located. Raises ``ImageLocationError`` naming the tar, key and offset when
    the bytes there are not such a member.
    """
    if tar_identity is not None:
        check_tar_identity(tar_url, tar_identity)
    where = f"{tar_url}: key {key!r} at offset {offset}"
    if offset < HEADER_BYTES or offset % HEADER_BYTES or size < 0:
        raise ImageLocationError(f"{where}, size {size}: not a tar member's location (a member starts on a block)")
    fs, path = filesystem_of(tar_url)
    try:
        data = fs.cat_file(path, start=offset - HEADER_BYTES, end=offset + size)
    except (OSError, ValueError) as error:
        raise ImageLocationError(f"{where}: cannot read {size} bytes: {error}") from error
    if len(data) != HEADER_BYTES + size:
        raise ImageLocationError(f"{where}: the tar ends before the {size} bytes recorded; run `dask-clip locate`")
    _check_header(data[:HEADER_BYTES], size, key, where)
    return data[HEADER_BYTES:]


def _check_header(block: bytes, size: int, key: object | None, where: str) -> None:
    """Raise unless ``block`` is the tar header of a member of ``size`` bytes (and of ``key``, when given)."""
    try:
        header = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as error:
        raise ImageLocationError(
            f"{where}: no tar member starts there ({error}); the tar changed since it was located, run "
            "`dask-clip locate` again"
        ) from None
    if header.size != size:
        raise ImageLocationError(f"{where}: the member there has {header.size} bytes, not the {size} recorded")
    if key is not None and len(header.name) < 99 and "?" not in header.name:  # else cut or made ASCII (PAX names)
        member_key, _ = split_member_name(header.name)
        if RowKeys(pd.Series([key]), where).position(member_key) != 0:
            raise ImageLocationError(f"{where}: the member there is {header.name!r}, of another key")
