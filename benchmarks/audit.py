"""Count the files a process opens while recording (an audit hook), in the client or in every worker.

Kept in its own module so that Dask pickles these functions by reference: a worker imports this module
and records into its own copy of the state.
"""

from __future__ import annotations

import os
import sys
import threading

_opened: list[str] = []
_recording = threading.Event()
_installed = threading.Event()


def _audit(event: str, args: tuple) -> None:
    if _recording.is_set() and event == "open" and isinstance(args[0], (str, os.PathLike)):
        _opened.append(os.fspath(args[0]))


def start_recording() -> None:
    """Start counting the files this process opens (installing the hook once: it cannot be removed)."""
    if not _installed.is_set():
        sys.addaudithook(_audit)
        _installed.set()
    _opened.clear()
    _recording.set()


def stop_recording() -> dict[str, int]:
    """Stop counting; how many ``.tar`` and ``.parquet`` files were opened since ``start_recording``."""
    _recording.clear()
    return {suffix: sum(path.endswith(suffix) for path in _opened) for suffix in (".tar", ".parquet")}
