"""A command's output folder (a reshard, an index, an export), written as a whole under one overwrite rule.

The folder is filled as a hidden sibling (``.{name}.{32 hex}.new``) and swapped in when complete, so it never
mixes files of two runs. Before the swap, the command leaves a manifest in it (``MANIFEST_NAME``: the command,
dask_clip's version, the time and every file it wrote). Then:

- a folder that is the input dataset, inside it or above it is never written;
- a missing or empty folder is written; a folder that is not empty only with ``overwrite``, and only when the
  same command wrote it and it holds no other file: its manifest says so or, for a folder written before
  manifests existed, its files fit the command's layout (``OutputKind.layout``) and nothing else;
- anything else is a ``UsageError`` that names what the folder holds;
- the scratch siblings a killed run left (``.new``, ``.old``) are removed by the next run into the same folder;
  when the run was killed between moving the old folder aside and moving the new one in, the ``.old`` is the
  only copy, and is moved back first.

The run holds a lock next to the folder (``.{name}.dask_clip.lock``, ``io.locks``) from before it cleans up
until the swap is done, and refuses a folder that a running ``save_metadata`` writes into (its lock is inside).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from dask_clip import __version__
from dask_clip.errors import UsageError, WriteError
from dask_clip.io.atomic import atomic_write, fsync_folder, is_local
from dask_clip.io.locks import LOCK_NAME, check_unlocked, writer_lock
from dask_clip.io.shards import as_url, filesystem_of, protocol_of, resolved_url

MANIFEST_NAME = ".dask_clip-output.json"
_NOT_CONTENT = frozenset({MANIFEST_NAME, LOCK_NAME})
_SCRATCH = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{32}\.(?P<suffix>new|old)")
_EXAMPLES = 3

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputKind:
    """What a command writes: ``command``, its name (in the manifest and in messages), and ``layout``, globs of
    the files (relative paths) a folder it wrote before manifests existed holds, each matched at least once and
    nothing else (empty: such a folder is not recognised)."""

    command: str
    layout: Sequence[str] = ()


@contextlib.contextmanager
def replacing_folder(url: str, overwrite: bool, kind: OutputKind, dataset_url: str) -> Iterator[str]:
    """The URL of a fresh hidden sibling of folder ``url`` to fill with ``kind``'s output from the dataset at
    ``dataset_url``; when the block ends without error, it replaces ``url`` as a whole, else it is removed.

    ``UsageError`` up front when ``url`` is the dataset, inside it or above it, is a file, or is a folder that is
    not empty and not replaceable (the module's rule); ``FolderLockedError`` when another run writes there.
    """
    check_outside(url, dataset_url)
    fs, path = filesystem_of(url)
    protocol, (parent, name) = protocol_of(fs), posixpath.split(path)
    with writer_lock(as_url(protocol, posixpath.join(parent, f".{name}{LOCK_NAME}")), kind.command):
        _remove_scratch(fs, url, path)
        _check_replaceable(fs, url, path, overwrite, kind)
        token = uuid.uuid4().hex
        fresh, old = (posixpath.join(parent, f".{name}.{token}.{suffix}") for suffix in ("new", "old"))
        try:
            fs.makedirs(fresh, exist_ok=True)
            yield as_url(protocol, fresh)
            _write_manifest(fs, fresh, kind)
            _swap(fs, fresh, path, old)
        finally:
            with contextlib.suppress(OSError):
                if fs.exists(fresh):
                    fs.rm(fresh, recursive=True)


def check_outside(url: str, dataset_url: str) -> None:
    """``UsageError`` when folder ``url`` is the folder ``dataset_url``, inside it or above it: local paths are
    compared resolved (symbolic links, ``..``, trailing slashes), URLs normalised on the same protocol."""
    output, dataset = resolved_url(url), resolved_url(dataset_url)  # URLs of other protocols never nest
    if output == dataset or dataset.startswith(output.rstrip("/") + "/"):
        raise UsageError(
            f"{url}: holds the dataset {dataset_url} (it is that folder, or one above it); "
            "write the output into a folder outside the dataset"
        )
    if output.startswith(dataset + "/"):
        raise UsageError(f"{url}: is inside the dataset {dataset_url}; write the output into a folder outside it")


def _remove_scratch(fs: Any, url: str, path: str) -> None:
    """Remove the ``.new`` / ``.old`` siblings that killed runs into ``path`` left, after moving back an
    ``.old`` that is the only copy (``path`` missing)."""
    parent, name = posixpath.split(path)
    fs.invalidate_cache(parent)
    if not fs.exists(parent):
        return
    scratch: dict[str, list[str]] = {"new": [], "old": []}
    for entry in fs.ls(parent, detail=False):
        match = _SCRATCH.fullmatch(posixpath.basename(entry.rstrip("/")))
        if match and match["name"] == name:
            scratch[match["suffix"]].append(entry.rstrip("/"))
    if scratch["old"] and not fs.exists(path):
        if len(scratch["old"]) > 1:
            raise UsageError(
                f"{url}: is missing, and {len(scratch['old'])} folders left by killed runs could each be its "
                f"earlier content: {sorted(scratch['old'])}; move the one to keep to {url}, remove the others"
            )
        old = scratch["old"].pop()
        logger.warning("%s: a run was killed while replacing it; moving its earlier content back from %s", url, old)
        _move_folder(fs, old, path)
    for leftover in scratch["new"] + scratch["old"]:
        logger.warning("%s: removing %s, left by a killed run", url, leftover)
        fs.rm(leftover, recursive=True)


def _check_replaceable(fs: Any, url: str, path: str, overwrite: bool, kind: OutputKind) -> None:
    """``UsageError`` unless ``path`` is missing, empty, or (with ``overwrite``) replaceable by ``kind``."""
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return
    if not fs.isdir(path):
        raise UsageError(f"{url}: exists and is not a folder")
    entries = {posixpath.basename(e["name"].rstrip("/")): e for e in fs.ls(path, detail=True)}
    if LOCK_NAME in entries:
        check_unlocked(as_url(protocol_of(fs), posixpath.join(path, LOCK_NAME)))
    names = entries.keys() - _NOT_CONTENT
    if not names:
        return
    manifest = _read_manifest(fs, path) if MANIFEST_NAME in entries else None
    held = _describe(entries, manifest)
    reason = _why_not_replaceable(fs, path, names, manifest, kind)
    if reason is not None:
        raise UsageError(
            f"{url}: is not empty: it holds {held}; {reason}, so even overwrite leaves it alone: write into another "
            "folder, or remove this one yourself if you mean to replace it"
        )
    if not overwrite:
        raise UsageError(
            f"{url}: is not empty: it holds {held}; pass overwrite=True (--overwrite) to replace it, "
            "or write into another folder"
        )


def _why_not_replaceable(
    fs: Any, path: str, names: set[str], manifest: dict[str, Any] | None, kind: OutputKind
) -> str | None:
    """None when ``kind``'s command wrote every file of folder ``path`` (top-level entries ``names``), as its
    manifest lists them or, without a manifest, as they fit its layout; else why it is not replaceable."""
    if manifest is not None and manifest.get("command") == kind.command:
        written = set(manifest.get("files", ()))
        files = _files_under(fs, path, names, written)
        foreign = sorted(names - _tops(written) if files is None else files - written)
        if foreign:
            return (
                f"{kind.command} wrote it, but not {len(foreign)} of its files (e.g. {', '.join(foreign[:_EXAMPLES])})"
            )
        changed = _changed_since(fs, path, manifest.get("sizes", {}))
        if changed:
            return (
                f"{kind.command} wrote it, but {len(changed)} of its files changed since (e.g. "
                f"{', '.join(changed[:_EXAMPLES])}: another command saved into them)"
            )
        return None
    if manifest is None and kind.layout:
        files = _files_under(fs, path, names, kind.layout)
        if files is not None and _fits(files, kind.layout):
            return None
    return f"nothing shows that {kind.command} wrote it (it holds no {MANIFEST_NAME} of {kind.command}'s)"


def _files_under(fs: Any, path: str, names: set[str], known: Collection[str]) -> set[str] | None:
    """The files under ``path`` (relative paths), or None when a top-level entry is none of ``known``'s: a folder
    that is not the command's is never walked (it may be anybody's home)."""
    if names - _tops(known):
        return None
    return {posixpath.relpath(f, path) for f in fs.find(path)} - _NOT_CONTENT


def _changed_since(fs: Any, path: str, sizes: dict[str, int]) -> list[str]:
    """The files (relative paths) under ``path`` whose size is no longer the one the manifest recorded."""
    if not sizes:
        return []
    now = {posixpath.relpath(f, path): info.get("size") for f, info in fs.find(path, detail=True).items()}
    return sorted(file for file, size in sizes.items() if file in now and now[file] != size)


def _tops(files: Collection[str]) -> set[str]:
    return {file.split("/")[0] for file in files}


def _fits(files: set[str], layout: Sequence[str]) -> bool:
    """Whether ``files`` fit ``layout``: each matches one of its globs, and each glob matches one of them."""
    every_file = all(any(fnmatch.fnmatchcase(file, glob) for glob in layout) for file in files)
    every_glob = all(any(fnmatch.fnmatchcase(file, glob) for file in files) for glob in layout)
    return every_file and every_glob


def _describe(entries: dict[str, dict[str, Any]], manifest: dict[str, Any] | None) -> str:
    """What a folder holds, from its entries: ``"a dataset: 3 tars and 3 parquets; 9 entries (9 files), e.g. ..."``."""
    names = sorted(entries.keys() - _NOT_CONTENT)
    folders = sum(entries[n]["type"] == "directory" for n in names)
    counts = ", ".join(_counted(n, noun) for n, noun in ((folders, "folder"), (len(names) - folders, "file")) if n)
    summary = f"{_counted(len(names), 'entry', 'entries')} ({counts}), e.g. {', '.join(names[:_EXAMPLES])}"
    tars, parquets = (sum(n.endswith(extension) for n in names) for extension in (".tar", ".parquet"))
    if manifest is not None:
        kind = (
            f"the output of dask_clip's {manifest.get('command')}, dask_clip {manifest.get('dask_clip')}, "
            f"written {manifest.get('written')}"
        )
    elif tars or parquets:
        kind = f"a dataset: {tars} tars and {parquets} parquets"
    else:
        return summary
    return f"{kind}; {summary}"


def _counted(count: int, noun: str, plural: str | None = None) -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def _read_manifest(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        manifest = json.loads(fs.cat_file(posixpath.join(path, MANIFEST_NAME)))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _write_manifest(fs: Any, folder: str, kind: OutputKind) -> None:
    found = {posixpath.relpath(f, folder): info.get("size") for f, info in fs.find(folder, detail=True).items()}
    manifest = {
        "command": kind.command,
        "dask_clip": __version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": sorted(found),
        "sizes": found,
    }
    with atomic_write(as_url(protocol_of(fs), posixpath.join(folder, MANIFEST_NAME))) as file:
        file.write(json.dumps(manifest, indent=1).encode())


def _swap(fs: Any, fresh: str, path: str, old: str) -> None:
    """Put folder ``fresh`` at ``path``; an earlier ``path`` goes, or comes back if the swap fails."""
    had_old = fs.exists(path)
    try:
        if had_old:
            _move_folder(fs, path, old)
        _move_folder(fs, fresh, path)
    except OSError as error:
        if had_old and fs.exists(old) and not fs.exists(path):
            _move_folder(fs, old, path)
        raise WriteError(f"{path}: cannot put the new folder in place: {error}") from error
    if is_local(fs):
        fsync_folder(posixpath.dirname(path))
    if had_old:
        with contextlib.suppress(OSError):
            fs.rm(old, recursive=True)


def _move_folder(fs: Any, source: str, target: str) -> None:
    """Move folder ``source`` to ``target``: one rename on a local filesystem; on an object store, a copy of each
    file, then their removal (``fs.mv(recursive=True)`` fails there on the folders' own entries)."""
    if is_local(fs):
        fs.mv(source, target, recursive=True)
        return
    fs.invalidate_cache(source)  # a listing cached by this process misses what the workers wrote
    files = fs.find(source)
    fs.copy(files, [target + file[len(source) :] for file in files])
    fs.rm(files)
    fs.invalidate_cache(source)
    fs.invalidate_cache(target)
