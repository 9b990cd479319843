"""Write tar members as raw blocks, so that pieces written by different tasks concatenate into one tar."""

from __future__ import annotations

import tarfile
from collections.abc import Iterable
from typing import IO, Protocol

from dask_clip.io.atomic import atomic_write
from dask_clip.io.shards import filesystem_of

MEMBER_MTIME = 1_700_000_000
"""Every member written gets this modification time, so equal inputs give byte-identical tars."""
COPY_CHUNK = 1 << 22


def member_header(name: str, size: int) -> bytes:
    """The PAX header blocks of a regular member ``name`` of ``size`` bytes (UTF-8 names kept byte for byte)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def padding(size: int) -> bytes:
    """The zero bytes that end a member's data of ``size`` bytes on a block boundary."""
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def write_member(out: IO[bytes], name: str, payload: bytes) -> None:
    """Append one member holding ``payload``."""
    out.write(member_header(name, len(payload)) + payload + padding(len(payload)))


class Readable(Protocol):
    def read(self, size: int = -1) -> bytes: ...


def copy_member(out: IO[bytes], name: str, size: int, data: Readable) -> None:
    """Append one member of ``size`` bytes streamed from ``data``, a chunk at a time (never whole in memory)."""
    out.write(member_header(name, size))
    remaining = size
    while remaining:
        chunk = data.read(min(COPY_CHUNK, remaining))
        if not chunk:
            raise EOFError(f"member {name!r} ended {remaining} bytes early")
        out.write(chunk)
        remaining -= len(chunk)
    out.write(padding(size))


def concatenate_tar_pieces(piece_urls: Iterable[str], tar_url: str) -> None:
    """Write ``tar_url`` (atomically, ``io.atomic``) as the pieces followed by the tar's end blocks."""
    fs = filesystem_of(tar_url)[0]
    with atomic_write(tar_url) as out:
        size = 0
        for url in piece_urls:
            with fs.open(filesystem_of(url)[1], "rb") as piece:
                while chunk := piece.read(COPY_CHUNK):
                    out.write(chunk)
                    size += len(chunk)
        size += 2 * tarfile.BLOCKSIZE
        out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))
