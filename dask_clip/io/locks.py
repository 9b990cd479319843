"""One writer at a time: a lock file that a run holds in the folder it writes (or next to a folder it replaces).

The lock is JSON: ``host``, ``pid``, ``started`` and ``refreshed`` (ISO 8601, UTC), ``operation`` (the library
call: ``save_metadata``, ``build_index``, ...), ``command`` (the process's command line) and a random ``token``.
On a local filesystem it is taken atomically (``O_CREAT | O_EXCL``). On an object store, which has no such
operation, it is written, then read back and compared: best effort, two runs that start within the same instant
may both go on. While it is held, a daemon thread rewrites ``refreshed`` every ``REFRESH_EVERY_S``; it is removed
when the run ends, also on error.

A lock is stale, and taken over with a warning, when its process has ended (a lock of this host), or when it was
not refreshed for ``STALE_AFTER_S`` (any host; the hosts' clocks must agree within minutes). A lock file that
cannot be read is stale once the file itself is that old.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shlex
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime, timezone
from typing import Any

import psutil

from dask_clip.errors import DaskClipError, FolderLockedError
from dask_clip.io.atomic import atomic_write, is_local
from dask_clip.io.shards import as_url, filesystem_of, protocol_of

LOCK_NAME = ".dask_clip.lock"
STALE_AFTER_S = 600.0
REFRESH_EVERY_S = 60.0
_TRIES = 3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: one run of one process."""

    host: str
    pid: int
    started: str
    refreshed: str
    operation: str
    command: str
    token: str

    @classmethod
    def of_this_run(cls, operation: str) -> Holder:
        now = _now()
        command = shlex.join(sys.argv)
        return cls(socket.gethostname(), os.getpid(), now, now, operation, command, uuid.uuid4().hex)

    @classmethod
    def from_json(cls, raw: bytes) -> Holder | None:
        """The holder a lock file names; None when it is not a lock this module wrote (cut short, edited)."""
        try:
            found = json.loads(raw)
            holder = cls(**{f.name: found[f.name] for f in fields(cls)})
            _age_s(holder.refreshed)
        except (ValueError, TypeError, KeyError):
            return None
        return holder if isinstance(holder.pid, int) and holder.pid > 0 else None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def is_stale(self) -> bool:
        gone = self.host == socket.gethostname() and not psutil.pid_exists(self.pid)
        return gone or _age_s(self.refreshed) > STALE_AFTER_S

    def __str__(self) -> str:
        return (
            f"pid {self.pid} on host {self.host} ({self.operation}: {self.command}), since {self.started}, "
            f"last refreshed {self.refreshed}"
        )


@contextlib.contextmanager
def writer_lock(url: str, operation: str) -> Iterator[None]:
    """Hold the lock file ``url`` while the block runs; ``operation`` names this run in it.

    ``FolderLockedError`` when another run holds it; a stale lock is taken over (a warning names its holder).
    A folder made for the lock is removed with it when it is still empty (a local folder).
    """
    fs, path = filesystem_of(url)
    folder = posixpath.dirname(path)
    made_folder = is_local(fs) and not fs.exists(folder)
    holder = Holder.of_this_run(operation)
    _take(fs, path, holder, url)
    stop = threading.Event()
    refresher = threading.Thread(
        target=_keep_refreshed, args=(fs, path, holder, stop), name=f"dask_clip-lock-{path}", daemon=True
    )
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        _release(fs, path, holder, url)
        if made_folder:
            with contextlib.suppress(OSError):
                os.rmdir(folder)


def check_unlocked(url: str) -> None:
    """``FolderLockedError`` when the lock file ``url`` is held by a run that is not stale."""
    fs, path = filesystem_of(url)
    found, raw = _read(fs, path)
    if raw is not None and not _is_stale(fs, path, found):
        raise FolderLockedError(_held_message(url, found))


def _take(fs: Any, path: str, holder: Holder, url: str) -> None:
    for _ in range(_TRIES):
        if _create(fs, path, holder):
            return
        found, raw = _read(fs, path)
        if raw is None:  # removed since: try again
            continue
        if not _is_stale(fs, path, found):
            raise FolderLockedError(_held_message(url, found))
        logger.warning("%s: taking over the stale lock of %s", url, _who(found))
        if _read(fs, path)[1] == raw:  # unchanged since it was judged stale
            fs.rm(path)
    raise FolderLockedError(f"{url}: another run took this lock each time it was free ({_TRIES} tries); run again")


def _create(fs: Any, path: str, holder: Holder) -> bool:
    """Write ``holder`` at ``path`` unless a lock is there; False when one is (or another run won the race)."""
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if is_local(fs):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "wb") as file:
            file.write(holder.to_json())
            file.flush()
            os.fsync(file.fileno())
        return True
    fs.invalidate_cache(path)
    if fs.exists(path):
        return False
    fs.pipe_file(path, holder.to_json())
    return _read(fs, path)[0] == holder


def _read(fs: Any, path: str) -> tuple[Holder | None, bytes | None]:
    """The lock at ``path``: its holder (None when unreadable) and its bytes (None when there is no lock)."""
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None, None
    return Holder.from_json(raw), raw


def _is_stale(fs: Any, path: str, found: Holder | None) -> bool:
    if found is not None:
        return found.is_stale()
    try:  # unreadable: stale once the file is as old as a lock without refresh
        return (datetime.now(timezone.utc) - fs.modified(path)).total_seconds() > STALE_AFTER_S
    except (OSError, NotImplementedError, TypeError):
        return False


def _keep_refreshed(fs: Any, path: str, holder: Holder, stop: threading.Event) -> None:
    """Rewrite the lock's ``refreshed`` every ``REFRESH_EVERY_S`` until ``stop``, while it is still ``holder``'s."""
    url = as_url(protocol_of(fs), path)
    while not stop.wait(REFRESH_EVERY_S):
        found = _read(fs, path)[0]
        if found is None or found.token != holder.token:
            logger.warning("%s: this run's lock was taken over by %s; it no longer holds it", url, _who(found))
            return
        try:
            with atomic_write(url) as file:
                file.write(replace(holder, refreshed=_now()).to_json())
        except (OSError, DaskClipError) as error:
            logger.warning("%s: cannot refresh this run's lock: %s", url, error)


def _release(fs: Any, path: str, holder: Holder, url: str) -> None:
    found = _read(fs, path)[0]
    if found is not None and found.token == holder.token:
        fs.rm(path)
    else:
        logger.warning("%s: this run's lock was taken over by %s before the run ended", url, _who(found))


def _held_message(url: str, found: Holder | None) -> str:
    return (
        f"{url}: another run writes into this folder: {_who(found)}. Wait for it to end; if it no longer runs, "
        f"remove {url} and run again. (A lock is taken over without asking once its process has ended, on this host, "
        f"or when it is stale after {STALE_AFTER_S / 60:.0f} minutes without a refresh.)"
    )


def _who(found: Holder | None) -> str:
    return str(found) if found is not None else "an unknown run (its lock file cannot be read)"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age_s(timestamp: str) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(timestamp)).total_seconds()
