"""Write a file so that its final name never holds a half-written file, even after a power loss, and
fill a folder so that it is replaced as a whole.

A file's data goes to a hidden temporary name in the same folder, is flushed to disk (fsync), renamed
into place, and the folder is flushed too, so the rename itself survives. On object stores (no folders,
no fsync) an upload only becomes visible once complete, and the same steps reduce to upload + move.
A folder (``replacing_folder``) is filled as a hidden sibling and swapped in when complete, so it never
mixes files of two runs.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import IO, Any

from dask_clip.errors import UsageError, WriteError
from dask_clip.io.shards import as_url, filesystem_of, protocol_of


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
    local = _is_local(fs)
    try:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(temporary, "wb") if local else fs.open(temporary, "wb") as file:
            yield file
            if local:
                file.flush()
                os.fsync(file.fileno())
        fs.mv(temporary, path)
        if local:
            _fsync_folder(posixpath.dirname(path))
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(f"{url}: cannot write: {error}") from error
    finally:
        with contextlib.suppress(OSError):
            if fs.exists(temporary):
                fs.rm(temporary)


def _is_local(fs: object) -> bool:
    protocol = getattr(fs, "protocol", ())
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def replacing_folder(url: str, overwrite: bool) -> Iterator[str]:
    """The URL of a fresh hidden sibling of folder ``url`` to fill; when the block ends without error, it
    replaces ``url`` as a whole (nothing of an earlier content survives), else it is removed.

    ``UsageError`` up front when ``url`` is a file, or a folder that is not empty and ``overwrite`` is False.
    """
    fs, path = filesystem_of(url)
    if fs.exists(path):
        if not fs.isdir(path):
            raise UsageError(f"{url}: exists and is not a folder")
        existing = fs.ls(path, detail=False)
        if existing and not overwrite:
            raise UsageError(
                f"{url}: is not empty (it holds {len(existing)} entries, e.g. {existing[0]}); "
                "write into a new folder, or pass overwrite=True to replace it"
            )
    parent, name = posixpath.split(path)
    token = uuid.uuid4().hex
    fresh, old = posixpath.join(parent, f".{name}.{token}.new"), posixpath.join(parent, f".{name}.{token}.old")
    try:
        fs.makedirs(fresh, exist_ok=True)
        yield as_url(protocol_of(fs), fresh)
        _swap(fs, fresh, path, old)
    finally:
        with contextlib.suppress(OSError):
            if fs.exists(fresh):
                fs.rm(fresh, recursive=True)


def _swap(fs: Any, fresh: str, path: str, old: str) -> None:
    """Put folder ``fresh`` at ``path``; an earlier ``path`` goes, or comes back if the swap fails."""
    had_old = fs.exists(path)
    try:
        if had_old:
            fs.mv(path, old, recursive=True)
        fs.mv(fresh, path, recursive=True)
    except OSError as error:
        if had_old and fs.exists(old) and not fs.exists(path):
            fs.mv(old, path, recursive=True)
        raise WriteError(f"{path}: cannot put the new folder in place: {error}") from error
    if _is_local(fs):
        _fsync_folder(posixpath.dirname(path))
    if had_old:
        with contextlib.suppress(OSError):
            fs.rm(old, recursive=True)
