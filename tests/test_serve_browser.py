"""``dask-clip serve`` in a real browser: Debian's Chromium driven by Playwright against the app served by uvicorn
on loopback, over the embedded, deduplicated test shards. The tests search, see every thumbnail load, open the
duplicate groups and preview a cut-off, read a histogram, and visit the overview and the failures.

Screenshots of each page are saved under ``$DASK_CLIP_SCREENSHOTS`` (default: the test's temporary folder).
The tests never download a browser: without a ``chromium`` on PATH they skip and say how to get one.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("playwright", reason="needs Playwright's Python package: pip install -e '.[test]'")
import uvicorn
from playwright.sync_api import Browser, Page, Response, sync_playwright

from dask_clip.serve import create_app

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "needs a Chromium on PATH: `apt-get install chromium` (Debian) as root, as ci/test.sh does"


@pytest.fixture(scope="module")
def base_url(deduplicated: Path) -> Iterator[str]:
    """The app over ``deduplicated``, served by uvicorn in a thread on a free loopback port."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(str(deduplicated)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=30)
    listening.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM)
        yield launched
        launched.close()


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the screenshots go: ``$DASK_CLIP_SCREENSHOTS`` or the test's temporary folder."""
    folder = Path(os.environ.get("DASK_CLIP_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def page(browser: Browser, base_url: str) -> Iterator[Page]:
    """A fresh page on the app; the test fails if any request the page makes is answered with an error."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1200, "height": 800})
    opened = context.new_page()
    failed: list[str] = []
    opened.on("response", lambda response: _record_failure(response, failed))
    yield opened
    context.close()
    assert not failed, f"the page's requests failed: {failed}"


def _record_failure(response: Response, failed: list[str]) -> None:
    if response.status >= 400:
        failed.append(f"{response.status} {response.url}")


def thumbnails_loaded(page: Page, selector: str = "img") -> int:
    """Scroll each image of ``selector`` into view (they load lazily), wait until each is decoded, and return
    how many there are; fails on any whose natural width is 0 (a broken image)."""
    images = page.locator(selector)
    for number in range(images.count()):
        images.nth(number).scroll_into_view_if_needed()
    page.wait_for_function("s => [...document.querySelectorAll(s)].every(i => i.complete)", arg=selector)
    widths = images.evaluate_all("images => images.map(i => i.naturalWidth)")
    assert widths and all(width > 0 for width in widths), f"images that did not load: {widths}"
    return len(widths)


def test_search_by_text_shows_ranked_results_whose_thumbnails_load(page: Page, screenshots: Path) -> None:
    page.goto("/search")
    page.fill("input[name=text]", "a photo of a cat")
    page.fill("input[name=k]", "6")
    page.click("text=Search by text")
    page.wait_for_selector("#results .card")
    cards = page.locator("#results .card")
    assert cards.count() == 6
    assert re.match(r"#1 score -?\d\.\d{3}", cards.first.inner_text())
    assert thumbnails_loaded(page, "#results img") == 6
    page.screenshot(path=screenshots / "search.png", full_page=True)
    page.click("text=next")
    page.wait_for_selector("#results .card")
    assert page.locator("#results .card").first.inner_text().startswith("#7 ")
    assert thumbnails_loaded(page, "#results img") >= 1


def test_a_duplicate_group_shows_the_kept_image_beside_the_removed_ones(page: Page, screenshots: Path) -> None:
    page.goto("/duplicates")
    group = page.locator(".group").first
    assert group.locator(".card.kept").count() == 1
    removed = group.locator(".card.removed")
    assert removed.count() >= 1
    similarities = [float(re.search(r"similarity (\S+)", text).group(1)) for text in removed.all_inner_texts()]
    assert all(similarity >= 0.7 for similarity in similarities)  # eps 0.3
    assert thumbnails_loaded(page, ".group img") >= 2
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=screenshots / "duplicates.png")

    total = int(re.search(r"(\d+) rows removed", page.inner_text("body")).group(1))
    page.fill("input[name=min_similarity]", f"{max(similarities):.4f}")  # as the page shows it
    with page.expect_navigation():
        page.click("button:has-text('Show')")
    assert "min_similarity=" in page.url
    preview = int(re.search(r"(\d+) rows removed", page.inner_text("body")).group(1))
    assert 1 <= preview <= total


def test_a_histogram_counts_every_value_with_images_at_its_quantiles(page: Page, screenshots: Path) -> None:
    page.goto("/scores")
    histogram = page.locator("svg[aria-label='histogram of similarity']")
    bars = histogram.locator("rect")
    counts = [int(text.rsplit(":", 1)[1]) for text in bars.locator("title").all_text_contents()]
    summary = histogram.locator("xpath=preceding-sibling::p[1]").inner_text()
    assert sum(counts) == int(re.match(r"(\d+) values", summary).group(1)) >= 1
    tallest = max(bars.nth(n).bounding_box()["height"] for n in range(bars.count()))
    assert tallest == pytest.approx(90, abs=1)  # drawn: the highest bin fills the plot
    assert thumbnails_loaded(page) >= 5  # one image per quantile
    page.screenshot(path=screenshots / "scores.png", full_page=True)


def test_the_overview_and_the_failures_pages(page: Page, screenshots: Path) -> None:
    page.goto("/")
    assert "3 shards, 18 rows" in page.inner_text("body")
    assert page.locator("table td", has_text="ClipImageEmbedder(model_dir=").count() == 1
    page.screenshot(path=screenshots / "overview.png", full_page=True)
    page.click("text=See them")
    page.wait_for_url(re.compile("/failures$"))
    counts = [int(n) for n in re.findall(r": (\d+) rows", " ".join(page.locator("h2").all_inner_texts()))]
    assert sum(counts) == 3
    assert page.locator(".card", has_text="no image in the tar").count() == 3
    page.screenshot(path=screenshots / "failures.png", full_page=True)
