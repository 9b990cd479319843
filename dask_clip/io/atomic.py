"""Write a file so that its final name never holds a half-written file, even after a power loss.

A file's data goes to a hidden temporary name in the same folder, is flushed to disk (fsync), renamed
into place, and the folder is flushed too, so the rename itself survives. On object stores (no folders,
no fsync) an upload only becomes visible once complete, and the same steps reduce to upload + move.
(A whole folder is replaced by ``io.output_folder.replacing_folder``.)
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO

from dask_clip.errors import WriteError
from dask_clip.io.shards import filesystem_of


def temporary_name(path: str) -> str:
    """A hidden sibling of ``path``: ``folder/.name.<random>.tmp`` (ignored when shards are listed)."""
    folder, name = posixpath.split(path)
    return posixpath.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")


@contextlib.contextmanager
def atomic_write(url: str) -> Iterator[IO[bytes]]:
    """A binary file to write ``url`` through; it appears at ``url`` only when the block ends without error.

    Any ``OSError`` (disk full, permissions) becomes a ``WriteError`` that starts with ``url``; the
    temporary file is removed whatever happens.
    """
    fs, path = filesystem_of(url)
    temporary = temporary_name(path)
    local = is_local(fs)
    try:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(temporary, "wb") if local else fs.open(temporary, "wb") as file:
            yield file
            if local:
                file.flush()
                os.fsync(file.fileno())
        fs.mv(temporary, path)
        if local:
            fsync_folder(posixpath.dirname(path))
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(f"{url}: cannot write: {error}") from error
    finally:
        with contextlib.suppress(OSError):
            if fs.exists(temporary):
                fs.rm(temporary)


def is_local(fs: object) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def fsync_folder(folder: str) -> None:
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
