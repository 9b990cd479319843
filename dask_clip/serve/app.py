"""The web app: five pages rendered on the server, each backed by a JSON endpoint under ``/api/``, and thumbnails.

Every handler reads the ``Catalog`` loaded at startup; nothing writes to the dataset (thumbnails are cached in a
folder the app made, bounded, and deleted when it stops). Text queries that arrive together are embedded in one
forward pass (``batching.MicroBatcher``); blocking work runs in a threadpool of ``THREADS_PER_CORE`` threads per
core. Hostile input gets a 4xx with the reason
(``{"detail": ...}``): a bound out of range 422, an upload too large 413, data that is no image 422, an index that
no longer matches the dataset 409, an image that is not the dataset's 404.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import anyio.to_thread
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from dask_clip.dataset import ImageTextPairDataset
from dask_clip.errors import ConfigurationError, DataError, ImageDecodeError, ShardReadError
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.images.thumbnails import ThumbnailCache
from dask_clip.serve.batching import MicroBatcher
from dask_clip.serve.catalog import EMBEDDING_COLUMN, Catalog
from dask_clip.serve.queries import Searcher
from dask_clip.serve.security import guard

MAX_K = 200
MAX_OFFSET = 10_000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_TEXT_CHARS = 1000
MAX_GROUPS = 200
DEFAULT_QUANTILES = "0.01,0.1,0.5,0.9,0.99"
THUMBNAIL_CACHE_BYTES = 2**30
THREADS_PER_CORE = 4

TEMPLATES = Jinja2Templates(directory=Path(__file__).parent / "templates")

K = Annotated[int, Query(ge=1, le=MAX_K, description=f"results per page, at most {MAX_K}")]
OFFSET = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=f"results to skip, at most {MAX_OFFSET}")]
Text = Annotated[str, Query(min_length=1, max_length=MAX_TEXT_CHARS)]
OptionalText = Annotated[str | None, Query(max_length=MAX_TEXT_CHARS)]
Image = Annotated[UploadFile, File(description="an image file; the server says its size limit")]
KForm = Annotated[int, Form(ge=1, le=MAX_K)]
OffsetForm = Annotated[int, Form(ge=0, le=MAX_OFFSET)]
Sort = Annotated[str, Query(pattern="^(size|similarity)$")]
Similarity = Annotated[float | None, Query(ge=-1, le=1, description="show removed rows at least this similar")]
Limit = Annotated[int, Query(ge=1, le=MAX_GROUPS)]
Bins = Annotated[int, Query(ge=1, le=100)]
Quantiles = Annotated[str, Query(max_length=200, description="comma-separated quantiles in [0, 1]")]
PerReason = Annotated[int, Query(ge=1, le=MAX_K)]
PerSide = Annotated[int, Query(ge=1, le=MAX_K, description="rows shown each side of a decision's boundary")]


def create_app(
    dataset_path: str,
    index: str | None = None,
    token: str | None = None,
    *,
    id_col: str = "key",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    thumbnail_cache_bytes: int = THUMBNAIL_CACHE_BYTES,
    thumbnail_cache_dir: str | Path | None = None,
) -> FastAPI:
    """The app over the dataset at ``dataset_path``, its metadata read now (on the current Dask client, else
    threads). ``index``: a ``build_index`` folder that search uses (else exact search). ``token``: asked of every
    request (None: requests must be addressed to a loopback host). Uploads over ``max_upload_bytes`` and images
    over ``max_image_pixels`` are refused. Thumbnails are cached in ``thumbnail_cache_dir`` (default: a new
    temporary folder), at most ``thumbnail_cache_bytes`` of them (the least recently used are deleted first); the
    app deletes the files it cached there when it stops."""
    dataset = ImageTextPairDataset.from_webdataset(dataset_path, id_col=id_col)
    catalog = Catalog.load(dataset)
    searcher = Searcher(dataset, EMBEDDING_COLUMN, index) if EMBEDDING_COLUMN in dataset.meta.columns else None
    texts = MicroBatcher(lambda batch: list(_searcher(searcher).text_vectors(batch)))
    made_folder = thumbnail_cache_dir is None
    cache_folder = Path(tempfile.mkdtemp(prefix="dask-clip-serve-")) if made_folder else Path(thumbnail_cache_dir)
    cache = ThumbnailCache(cache_folder, max_bytes=thumbnail_cache_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS_PER_CORE * (os.cpu_count() or 1)
        try:
            yield
        finally:
            cache.clear()
            if made_folder:
                with contextlib.suppress(OSError):  # not empty: holds files the app did not write
                    cache_folder.rmdir()

    app = FastAPI(
        title="dask-clip", summary=f"see the images of {dataset_path}", docs_url="/api/docs", lifespan=lifespan
    )
    app.state.thumbnail_cache = cache
    app.middleware("http")(_limit_uploads(max_upload_bytes))
    app.middleware("http")(guard(token))  # the outer one: a request without the token is refused before anything
    for error, status in ((ImageDecodeError, 422), (ConfigurationError, 400), (DataError, 409)):
        app.add_exception_handler(error, _reason_with(status))

    def render(request: Request, page: str, **context: Any) -> HTMLResponse:
        return TEMPLATES.TemplateResponse(request, f"{page}.html", {"page": page, "path": dataset_path, **context})

    # --- overview -----------------------------------------------------------------------------------------
    @app.get("/api/overview")
    def overview_api() -> dict[str, Any]:
        return catalog.overview()

    @app.get("/", response_class=HTMLResponse)
    def overview_page(request: Request) -> HTMLResponse:
        return render(request, "overview", overview=catalog.overview())

    # --- search -------------------------------------------------------------------------------------------
    def search(vector: np.ndarray, k: int, offset: int, query: dict[str, Any]) -> dict[str, Any]:
        hits = _searcher(searcher).search(vector, offset + k).iloc[offset:]
        found = catalog.found_rows(hits["stem"], hits[dataset.id_col].astype(str))
        results = [
            {"rank": offset + position + 1, "score": float(score), **row}
            for position, (row, score) in enumerate(zip(catalog.rows(found), hits["score"], strict=True))
        ]
        return {"query": query, "k": k, "offset": offset, "index": index is not None, "results": results}

    async def text_search(text: str, k: int, offset: int) -> dict[str, Any]:
        _searcher(searcher)  # 400 before the query waits for a batch, when there is nothing to search
        vector = await texts.submit(text)
        return await run_in_threadpool(search, vector, k, offset, {"text": text})

    async def image_search(image: UploadFile, k: int, offset: int) -> dict[str, Any]:
        data = await image.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise HTTPException(413, f"the uploaded image is over {max_upload_bytes} bytes")
        vector = await run_in_threadpool(_searcher(searcher).image_vector, data, max_image_pixels)
        return await run_in_threadpool(search, vector, k, offset, {"image": image.filename})

    @app.get("/api/search")
    async def search_api(text: Text, k: K = 20, offset: OFFSET = 0) -> dict[str, Any]:
        return await text_search(text, k, offset)

    @app.post("/api/search")
    async def image_search_api(image: Image, k: KForm = 20, offset: OffsetForm = 0) -> dict[str, Any]:
        return await image_search(image, k, offset)

    @app.get("/search", response_class=HTMLResponse)
    async def search_page(
        request: Request,
        text: Annotated[str | None, Query(max_length=MAX_TEXT_CHARS)] = None,
        k: K = 20,
        offset: OFFSET = 0,
    ) -> HTMLResponse:
        found = await text_search(text, k, offset) if text else None
        return render(request, "search", found=found, text=text or "", k=k)

    @app.post("/search", response_class=HTMLResponse)
    async def image_search_page(request: Request, image: Image, k: KForm = 20, offset: OffsetForm = 0) -> HTMLResponse:
        return render(request, "search", found=await image_search(image, k, offset), text="", k=k)

    # --- duplicates -----------------------------------------------------------------------------------------
    def duplicates(sort: str, min_similarity: float | None, offset: int, limit: int) -> dict[str, Any]:
        if not catalog.has_dedup_columns():
            return {"deduplicated": False, "groups": [], "total": 0, "operation": None}
        groups = catalog.duplicate_groups(sort, min_similarity)
        return {
            "deduplicated": True,
            "operation": catalog.dedup_operation(),
            "sort": sort,
            "min_similarity": min_similarity,
            "total": len(groups),
            "removed": sum(len(group["removed"]) for group in groups),
            "offset": offset,
            "groups": groups[offset : offset + limit],
        }

    @app.get("/api/duplicates")
    def duplicates_api(
        sort: Sort = "size", min_similarity: Similarity = None, offset: OFFSET = 0, limit: Limit = 20
    ) -> dict[str, Any]:
        return duplicates(sort, min_similarity, offset, limit)

    @app.get("/duplicates", response_class=HTMLResponse)
    def duplicates_page(
        request: Request, sort: Sort = "size", min_similarity: Similarity = None, offset: OFFSET = 0, limit: Limit = 20
    ) -> HTMLResponse:
        return render(request, "duplicates", found=duplicates(sort, min_similarity, offset, limit))

    # --- scores ---------------------------------------------------------------------------------------------

    @app.get("/api/scores")
    def scores_api(bins: Bins = 20, quantiles: Quantiles = DEFAULT_QUANTILES, per_side: PerSide = 6) -> dict[str, Any]:
        return {"columns": catalog.scores(bins, _quantiles(quantiles), per_side)}

    @app.get("/scores", response_class=HTMLResponse)
    def scores_page(
        request: Request, bins: Bins = 20, quantiles: Quantiles = DEFAULT_QUANTILES, per_side: PerSide = 6
    ) -> HTMLResponse:
        columns = catalog.scores(bins, _quantiles(quantiles), per_side)
        return render(request, "scores", columns=columns, quantiles=quantiles)

    # --- failures -------------------------------------------------------------------------------------------

    @app.get("/api/failures")
    def failures_api(per_reason: PerReason = 20) -> dict[str, Any]:
        return {"reason_column": catalog.reason_column, "groups": catalog.failures(per_reason)}

    @app.get("/failures", response_class=HTMLResponse)
    def failures_page(request: Request, per_reason: PerReason = 20) -> HTMLResponse:
        return render(request, "failures", groups=catalog.failures(per_reason), reason_column=catalog.reason_column)

    # --- thumbnails -----------------------------------------------------------------------------------------
    @app.get("/thumb/{stem}/{key:path}")
    def thumbnail(stem: str, key: str) -> Response:
        position = catalog.position(stem, key)
        if position is None:
            raise HTTPException(404, "no such image in this dataset: address one by its shard's stem and its key")
        try:
            jpeg = catalog.images.thumbnail(stem, key, position, cache, max_image_pixels=max_image_pixels)
        except ShardReadError as error:
            raise HTTPException(404, str(error)) from None
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


def _searcher(searcher: Searcher | None) -> Searcher:
    if searcher is None:
        raise HTTPException(400, f"this dataset has no {EMBEDDING_COLUMN!r} column to search: embed it first")
    return searcher


def _quantiles(text: str) -> list[float]:
    """``"0.1,0.5"`` -> ``[0.1, 0.5]``; HTTP 422 unless each is a number in [0, 1] (at most 20)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise HTTPException(422, f"quantiles must be comma-separated numbers in [0, 1], not {text!r}") from None
    if not values or len(values) > 20 or not all(0 <= value <= 1 for value in values):
        raise HTTPException(422, f"quantiles must be 1 to 20 numbers in [0, 1], not {text!r}")
    return values


def _reason_with(status: int) -> Any:
    """An exception handler answering ``status`` with the error's message as the reason."""

    async def handle(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"{type(error).__name__}: {error}"}, status_code=status)

    return handle


def _limit_uploads(max_bytes: int) -> Any:
    """An HTTP middleware that refuses a request body over ``max_bytes`` (413) or of unstated length (411) before
    it is read."""

    async def limit(request: Request, call_next: Any) -> Response:
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return JSONResponse(
                    {"detail": "a request body must state its length (Content-Length)"}, status_code=411
                )
            if int(length) > max_bytes + 64 * 1024:  # the multipart envelope around the image
                return JSONResponse({"detail": f"the request body is over {max_bytes} bytes"}, status_code=413)
        return await call_next(request)

    return limit
