"""``dask-clip serve``: every page and JSON endpoint over embedded, deduplicated shards, and the security rules
(only the dataset's images, bounded uploads and ``k``, the token off loopback, a stale index refused)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from dask_clip import ImageTextPairDataset
from dask_clip.images.thumbnails import thumbnail
from dask_clip.serve import create_app
from dask_clip.serve.security import token_for

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

LOOPBACK = "http://127.0.0.1"


@pytest.fixture(autouse=True)
def temporary_folders_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An app run without its lifespan (a ``TestClient`` outside ``with``) leaves its thumbnail folder: here."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture(scope="module")
def app_client(deduplicated: Path) -> Iterator[TestClient]:
    with TestClient(create_app(str(deduplicated)), base_url=LOOPBACK) as running:  # its thumbnails deleted after
        yield running


def first_image(folder: Path, stem: str = "00001") -> tuple[str, bytes]:
    """The key and bytes of the first image member of shard ``stem``."""
    with tarfile.open(folder / f"{stem}.tar") as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(".jpg"))
        return member.name[:-4], archive.extractfile(member).read()


def test_overview_counts_shards_rows_provenance_and_failures(app_client: TestClient) -> None:
    overview = app_client.get("/api/overview").json()
    assert (overview["shards"], overview["rows"]) == (3, 18)
    produced = {column["column"]: column["operation"] for column in overview["derived_columns"]}
    assert produced["image_embedding"].startswith("ClipImageEmbedder(model_dir=")
    assert produced["keep"].startswith("SemanticDeduplicator(")
    assert sum(overview["without_embedding"].values()) == 3
    page = app_client.get("/")
    assert page.status_code == 200 and "18 rows" in page.text and "ClipImageEmbedder(model_dir=" in page.text


def test_text_search_pages_through_results_with_thumbnails(app_client: TestClient) -> None:
    first = app_client.get("/api/search", params={"text": "a photo of a cat", "k": 4}).json()["results"]
    second = app_client.get("/api/search", params={"text": "a photo of a cat", "k": 4, "offset": 4}).json()["results"]
    assert [r["rank"] for r in first + second] == list(range(1, 9))
    assert len({(r["stem"], r["key"]) for r in first + second}) == 8
    assert [r["score"] for r in first + second] == sorted((r["score"] for r in first + second), reverse=True)
    assert all(r["caption"].startswith("a photo of") for r in first)
    thumb = app_client.get(first[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    page = app_client.get("/search", params={"text": "a photo of a cat", "k": 4})
    assert page.status_code == 200 and first[0]["thumbnail"] in page.text and "next</a>" in page.text


def test_image_search_finds_the_uploaded_image_first(app_client: TestClient, deduplicated: Path) -> None:
    key, data = first_image(deduplicated)
    found = app_client.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "3"})
    assert found.status_code == 200, found.text
    best = found.json()["results"][0]
    assert (best["stem"], best["key"]) == ("00001", key) and best["score"] > 0.99
    page = app_client.post("/search", files={"image": ("q.jpg", data, "image/jpeg")})
    assert page.status_code == 200 and f"/thumb/00001/{key}" in page.text


def test_duplicates_show_kept_beside_removed_and_a_cut_off_previews_a_smaller_eps(app_client: TestClient) -> None:
    found = app_client.get("/api/duplicates", params={"sort": "size"}).json()
    assert found["deduplicated"] and found["operation"]["eps"] == 0.3 and found["total"] >= 1
    group = found["groups"][0]
    assert group["size"] == 1 + len(group["removed"])
    assert all(row["similarity"] >= 0.7 for row in group["removed"])
    sizes = [g["size"] for g in found["groups"]]
    assert sizes == sorted(sizes, reverse=True)
    by_similarity = app_client.get("/api/duplicates", params={"sort": "similarity"}).json()["groups"]
    lowest = [g["min_similarity"] for g in by_similarity]
    assert lowest == sorted(lowest)
    cut = max(row["similarity"] for g in found["groups"] for row in g["removed"])
    stricter = app_client.get("/api/duplicates", params={"min_similarity": cut}).json()
    assert 1 <= stricter["removed"] < found["removed"] or stricter["removed"] == found["removed"] == 1
    assert all(row["similarity"] >= cut for g in stricter["groups"] for row in g["removed"])
    page = app_client.get("/duplicates")
    assert page.status_code == 200 and group["kept"]["thumbnail"] in page.text and 'class="card kept"' in page.text


def test_scores_histogram_counts_every_value_with_images_at_quantiles(app_client: TestClient) -> None:
    columns = {c["column"]: c for c in app_client.get("/api/scores", params={"bins": 5}).json()["columns"]}
    similarity = columns["similarity"]
    assert len(similarity["counts"]) == 5 and sum(similarity["counts"]) == similarity["count"] >= 1
    assert [q["quantile"] for q in similarity["quantiles"]] == [0.01, 0.1, 0.5, 0.9, 0.99]
    assert all(q["row"]["thumbnail"].startswith("/thumb/") for q in similarity["quantiles"])
    page = app_client.get("/scores")
    assert page.status_code == 200 and '<svg class="histogram"' in page.text and "<rect" in page.text


def test_failures_group_rows_without_an_embedding_by_reason(app_client: TestClient) -> None:
    failures = app_client.get("/api/failures").json()
    assert failures["reason_column"] == "embedding_error"
    assert sum(g["count"] for g in failures["groups"]) == 3
    rows = [row for g in failures["groups"] for row in g["rows"]]
    assert not any(row["has_image"] for row in rows)  # failed downloads: no image in the tar
    assert all(app_client.get(row["thumbnail"]).status_code == 404 for row in rows)
    page = app_client.get("/failures")
    assert page.status_code == 200 and failures["groups"][0]["reason"] in page.text


@pytest.mark.parametrize(
    "path",
    [
        "/thumb/../../etc/passwd",
        "/thumb/%2e%2e/%2e%2e/etc/passwd",
        "/thumb/00001/..%2f..%2f00001.parquet",
        "/thumb/00001/%2Fetc%2Fpasswd",
        "/thumb/..%2f00001/000010001",
        "/thumb/99999/000010001",
        "/thumb/00001/not-a-key",
    ],
)
def test_thumbnails_serve_only_the_datasets_images(app_client: TestClient, path: str) -> None:
    refused = app_client.get(path)
    assert refused.status_code == 404
    assert "root:" not in refused.text


def test_hostile_queries_get_a_4xx_with_a_reason(app_client: TestClient, deduplicated: Path) -> None:
    too_many = app_client.get("/api/search", params={"text": "a cat", "k": 201})
    assert too_many.status_code == 422 and "less than or equal to 200" in too_many.text
    assert app_client.get("/api/search", params={"text": "a cat", "offset": -1}).status_code == 422
    corrupt = app_client.post("/api/search", files={"image": ("x.jpg", b"\xff\xd8not a jpeg", "image/jpeg")})
    assert corrupt.status_code == 422 and "not a readable image" in corrupt.json()["detail"]
    empty = app_client.post("/api/search", files={"image": ("x.jpg", b"", "image/jpeg")})
    assert empty.status_code == 422 and "empty image" in empty.json()["detail"]
    huge = app_client.post("/api/search", files={"image": ("x.jpg", b"\0" * (11 * 1024 * 1024), "image/jpeg")})
    assert huge.status_code == 413 and "over" in huge.json()["detail"]
    assert app_client.get("/api/scores", params={"quantiles": "2"}).status_code == 422
    assert app_client.get("/api/duplicates", params={"sort": "name"}).status_code == 422


def test_an_upload_over_the_pixel_limit_is_refused_before_decoding(deduplicated: Path) -> None:
    _, data = first_image(deduplicated)
    small = TestClient(create_app(str(deduplicated), max_image_pixels=100), base_url=LOOPBACK)
    refused = small.post("/api/search", files={"image": ("q.jpg", data, "image/jpeg")})
    assert refused.status_code == 422 and "max_image_pixels" in refused.json()["detail"]


def test_a_token_is_asked_of_every_request_off_loopback(deduplicated: Path) -> None:
    assert token_for("127.0.0.1", None) is None and token_for("localhost", None) is None
    generated = token_for("0.0.0.0", None)
    assert generated and len(generated) >= 32 and generated != token_for("0.0.0.0", None)
    app = create_app(str(deduplicated), token="s3cret")
    remote = TestClient(app, base_url="http://10.1.2.3")
    missing = remote.get("/api/overview")
    assert missing.status_code == 401 and "a token is needed" in missing.json()["detail"]
    wrong = remote.get("/api/overview", params={"token": "guess"})
    assert wrong.status_code == 401 and "wrong token" in wrong.json()["detail"]
    assert remote.get("/thumb/00001/x", headers={"Authorization": "token guess"}).status_code == 401
    assert remote.get("/api/overview", headers={"Authorization": "token s3cret"}).status_code == 200
    opened = remote.get("/", params={"token": "s3cret"})
    assert opened.status_code == 200 and "dask_clip_token" in opened.headers["set-cookie"]
    assert remote.get("/duplicates").status_code == 200  # the cookie set from the query


def test_without_a_token_only_loopback_hosts_are_answered(app_client: TestClient, deduplicated: Path) -> None:
    rebound = TestClient(create_app(str(deduplicated)), base_url="http://attacker.example")
    refused = rebound.get("/api/overview")
    assert refused.status_code == 403 and "loopback" in refused.json()["detail"]
    assert app_client.get("/api/overview").headers["x-content-type-options"] == "nosniff"


def test_a_query_against_a_stale_index_is_refused(embedded_shards: Path, tmp_path: Path, client) -> None:
    index = str(tmp_path / "index")
    ImageTextPairDataset.from_webdataset(str(embedded_shards)).build_index(index)
    app = TestClient(create_app(str(embedded_shards), index=index), base_url=LOOPBACK)
    fresh = app.get("/api/search", params={"text": "a photo", "k": 3})
    assert fresh.status_code == 200 and fresh.json()["index"] and len(fresh.json()["results"]) == 3

    stale_app = create_app(str(embedded_shards), index=index)
    table = pq.read_table(embedded_shards / "00003.parquet")
    pq.write_table(table.slice(1), embedded_shards / "00003.parquet")  # a row removed: the index is stale
    stale = TestClient(stale_app, base_url=LOOPBACK).get("/api/search", params={"text": "a photo", "k": 3})
    assert stale.status_code == 409 and "StaleIndexError" in stale.json()["detail"]
    assert "00003" in stale.json()["detail"]


@pytest.mark.slow
def test_the_command_off_loopback_prints_a_token_and_asks_for_it(deduplicated: Path) -> None:
    """``dask-clip serve --host 0.0.0.0`` generates a token, prints the address with it, and refuses requests
    without it."""
    import re
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "dask_clip.cli", "serve", str(deduplicated), "--host", "0.0.0.0"]
    server = subprocess.Popen([*command, "--port", str(port), "--n-workers", "1"], stderr=subprocess.PIPE, text=True)
    try:
        printed = ""
        while "?token=" not in printed and server.poll() is None:
            printed += server.stderr.readline()
        token = re.search(r"\?token=(\S+)", printed).group(1)
        address = f"http://127.0.0.1:{port}/api/overview"
        for _ in range(100):
            try:
                refused = httpx.get(address)
                break
            except httpx.ConnectError:
                time.sleep(0.2)
        assert refused.status_code == 401 and "a token is needed" in refused.json()["detail"]
        answered = httpx.get(address, params={"token": token})
        assert answered.status_code == 200 and answered.json()["rows"] == 18
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def located(deduplicated: Path, tmp_path: Path) -> Path:
    """A copy of the app's data whose image locations are recorded (``dask-clip locate``)."""
    from dask_clip import LocateImages

    folder = Path(shutil.copytree(deduplicated, tmp_path / "located"))
    LocateImages()(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
    return folder


def test_thumbnails_use_the_recorded_locations_and_never_read_a_tars_headers(
    located: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dask_clip.serve import images

    def no_header_pass(tar_url: str) -> None:
        raise AssertionError(f"{tar_url}: the headers were read although the locations are recorded")

    monkeypatch.setattr(images, "sample_images", no_header_pass)
    app = TestClient(create_app(str(located), thumbnail_cache_dir=tmp_path / "cache"), base_url=LOOPBACK)
    overview = app.get("/api/overview").json()["image_locations"]
    assert (overview["recorded"], overview["tar headers"], overview["reasons"]) == (3, 0, {})
    hits = app.get("/api/search", params={"text": "a photo", "k": 6}).json()["results"]
    assert all(app.get(hit["thumbnail"]).status_code == 200 for hit in hits)
    failures = app.get("/api/failures").json()["groups"]
    assert not any(row["has_image"] for group in failures for row in group["rows"])


def test_a_tar_changed_since_it_was_located_is_read_from_its_headers_and_the_overview_says_why(
    located: Path, tmp_path: Path
) -> None:
    tar = located / "00001.tar"
    os.utime(tar, (tar.stat().st_atime, tar.stat().st_mtime + 60))  # replaced (by the same bytes) after `locate`
    app = TestClient(create_app(str(located), thumbnail_cache_dir=tmp_path / "cache"), base_url=LOOPBACK)
    overview = app.get("/api/overview").json()["image_locations"]
    assert (overview["recorded"], overview["tar headers"]) == (2, 1)
    (stale,) = [shard for shard in overview["shards"] if shard["source"] == "tar headers"]
    assert stale["stem"] == "00001" and "changed since its images were located" in stale["reason"]
    key, data = first_image(located)
    thumb = app.get(f"/thumb/00001/{key}")
    assert thumb.status_code == 200 and thumb.content == thumbnail(data)
    page = app.get("/")
    assert page.status_code == 200 and "changed since its images were located" in page.text


def test_without_recorded_locations_the_overview_says_to_locate(app_client: TestClient) -> None:
    overview = app_client.get("/api/overview").json()["image_locations"]
    assert (overview["recorded"], overview["tar headers"]) == (0, 3)
    (reason,) = overview["reasons"]
    assert reason.startswith("no 'image_offset' column: run `dask-clip locate`")


def test_concurrent_text_queries_each_get_their_own_results(app_client: TestClient, deduplicated: Path) -> None:
    import asyncio

    import httpx

    texts = ["a photo of a cat", "a dog", "the sea at night", "a red car"]
    alone = [app_client.get("/api/search", params={"text": text, "k": 5}).json()["results"] for text in texts]
    app = create_app(str(deduplicated))

    async def together() -> list[dict]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=LOOPBACK) as http:
            answers = await asyncio.gather(*(http.get("/api/search", params={"text": t, "k": 5}) for t in texts))
        return [answer.json() for answer in answers]

    for text, expected, answer in zip(texts, alone, asyncio.run(together()), strict=True):
        assert answer["query"] == {"text": text}
        assert [(r["stem"], r["key"]) for r in answer["results"]] == [(r["stem"], r["key"]) for r in expected]
        assert [r["score"] for r in answer["results"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)


def test_the_app_deletes_the_thumbnails_it_cached_when_it_stops(deduplicated: Path) -> None:
    app = create_app(str(deduplicated))
    with TestClient(app, base_url=LOOPBACK) as running:
        hit = running.get("/api/search", params={"text": "a photo", "k": 1}).json()["results"][0]
        assert running.get(hit["thumbnail"]).status_code == 200
        folder = app.state.thumbnail_cache.folder
        assert folder.parent == Path(tempfile.gettempdir()) and len(list(folder.rglob("*.jpg"))) == 1
    assert not folder.exists()


def test_the_command_refuses_a_negative_thumbnail_cache(deduplicated: Path, cli) -> None:
    refused = cli("serve", str(deduplicated), "--thumbnail-cache-mb", "-1")
    assert refused.returncode == 2 and "--thumbnail-cache-mb must be 0 or more, not -1" in refused.stderr
