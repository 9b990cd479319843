"""Find the shard pairs (``NNNNN.tar`` + ``NNNNN.parquet``) of a WebDataset folder, and name files and folders
by where they are (local path or fsspec URL) and by what they hold.

Tar and parquet are paired by file stem, never by position: a missing shard must never shift
the pairing of the others.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from dask_clip.errors import DatasetLayoutError, DatasetNotFoundError
from dask_clip.provenance import file_identity

_HASH_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Shard:
    """One shard: its stem (``"00042"``), the tar with its samples and the parquet with its rows.

    Paths are in the filesystem's own form (no protocol); ``protocol`` says which filesystem.
    ``tar_identity`` is the tar's size and ETag or modification time when the folder was listed.
    """

    stem: str
    tar_path: str
    parquet_path: str
    protocol: str
    tar_identity: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def tar_url(self) -> str:
        return as_url(self.protocol, self.tar_path)

    @property
    def parquet_url(self) -> str:
        return as_url(self.protocol, self.parquet_path)


def as_url(protocol: str, path: str) -> str:
    """A path of the filesystem named by ``protocol`` as a URL (a local path stays a path)."""
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def filesystem_of(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path inside it (``"s3://b/x"`` -> (s3fs, ``"b/x"``))."""
    fs, path = url_to_fs(url)
    return fs, path.rstrip("/") or "/"


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else protocol


def resolved_url(url: str) -> str:
    """One spelling of the place ``url`` names, to record: a local path made absolute with its symlinks resolved
    (``os.path.realpath``: ``work/emb``, ``/abs/work/emb/`` and a link to it are one), a URL normalised
    (``s3://b//x/`` -> ``s3://b/x``)."""
    fs, path = filesystem_of(url)
    protocol = protocol_of(fs)
    if protocol in ("file", "local"):
        return os.path.realpath(path)
    return as_url(protocol, posixpath.normpath(path))


def content_sha256(url: str) -> tuple[str, int]:
    """The sha256 (hex digits) of every byte of the file at ``url``, read as a stream, and how many bytes it holds."""
    fs, path = filesystem_of(url)
    sha256, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK_BYTES):
            sha256.update(chunk)
            size += len(chunk)
    return sha256.hexdigest(), size


def discover_shards(url: str) -> list[Shard]:
    """List the shard pairs in the folder ``url`` (local path or any fsspec URL), sorted by stem.

    Raises ``DatasetNotFoundError`` when the folder does not exist and ``DatasetLayoutError`` when it
    holds no shard, or a tar without its parquet (or the reverse), naming each orphan file.
    """
    fs, root = filesystem_of(url)
    if not fs.isdir(root):
        raise DatasetNotFoundError(f"{url}: no such directory of WebDataset shards")
    tars: dict[str, dict[str, Any]] = {}
    parquets: dict[str, str] = {}
    for entry in fs.ls(root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        stem, _, extension = name.partition(".")
        if extension == "tar":
            tars[stem] = entry
        elif extension == "parquet":
            parquets[stem] = entry["name"]
    if not tars and not parquets:
        raise DatasetLayoutError(f"{url}: no shards found (expected pairs like 00000.tar + 00000.parquet)")
    orphans = [f"{tars[s]['name']} has no {s}.parquet" for s in sorted(tars.keys() - parquets.keys())]
    orphans += [f"{parquets[s]} has no {s}.tar" for s in sorted(parquets.keys() - tars.keys())]
    if orphans:
        listed = "; ".join(orphans[:10]) + (f"; and {len(orphans) - 10} more" if len(orphans) > 10 else "")
        raise DatasetLayoutError(f"{url}: unpaired shard files: {listed}")
    protocol = protocol_of(fs)
    return [
        Shard(stem, tars[stem]["name"], parquets[stem], protocol, file_identity(tars[stem])) for stem in sorted(tars)
    ]
