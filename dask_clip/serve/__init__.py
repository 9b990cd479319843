"""``dask-clip serve``: a read-only web app over a dataset (overview, search, duplicates, scores, failures) and its
JSON API. Needs the ``serve`` extra (FastAPI, uvicorn, Jinja2, python-multipart), imported when an app is made."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dask_clip.optional import require

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["create_app"]


def create_app(dataset_path: str, index: str | None = None, token: str | None = None, **options: Any) -> FastAPI:
    """The app over the dataset at ``dataset_path`` (``dask_clip.serve.app.create_app``, which says what ``index``,
    ``token`` and the ``options`` do). ``MissingDependencyError`` naming the extra when FastAPI or its parts are
    not installed."""
    for module in ("fastapi", "jinja2", "python_multipart"):
        require(module, "serve", "dask-clip serve")
    from dask_clip.serve.app import create_app as create

    return create(dataset_path, index, token, **options)
