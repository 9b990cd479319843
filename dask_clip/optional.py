"""Optional dependencies: imported where they are needed, with an error that names the pip extra."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from dask_clip.errors import MissingDependencyError

EXTRAS = {"gpu", "ucx", "timm", "s3", "demo", "notebooks", "img2dataset", "serve", "openvino"}


def install_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install "dask_clip[gpu]"``."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; dask_clip's extras are {sorted(EXTRAS)}")
    return f'pip install "dask_clip[{extra}]"'


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise ``MissingDependencyError`` saying that ``purpose`` needs it and how to
    install it. A module that is installed but fails to import (a broken native library) is reported
    the same way, with the original error as the cause."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(f"{purpose} needs {module}: {install_hint(extra)} ({error})") from error


def check_installed(module: str, extra: str, purpose: str) -> None:
    """Like ``require`` but without importing ``module`` (cheap, for checks on the client)."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{purpose} needs {module}: {install_hint(extra)}")
