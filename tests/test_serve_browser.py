"""The README's first commands end to end in a real browser: ``dask-clip demo --random-weights``, then the
``dask-clip serve`` command it prints, each a process of its own, and Debian's Chromium driven by Playwright through
all five pages: search (thumbnails load, results page), a duplicate group (and a cut-off previewed), the
histograms of ``clip_score`` and ``similarity``, the failures, and the overview.

Screenshots of each page are saved under ``$DASK_CLIP_SCREENSHOTS`` (``ci/test.sh``: test-artifacts/screenshots;
default: the test's temporary folder). The tests never download a browser: without a ``chromium`` they skip and say
how to get one. Every demo-using test lives in this file, so the demo runs once per session under ``--dist loadfile``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import DemoRun

pytest.importorskip("fastapi")
pytest.importorskip("playwright", reason="needs Playwright's Python package: pip install -e '.[test]'")
from playwright.sync_api import Browser, Page, Response, sync_playwright

pytestmark = pytest.mark.slow

CHROMIUM = next(
    (path for path in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium") if path),
    None,
)
NO_CHROMIUM = "needs Debian's Chromium: `apt-get install chromium` as root (ci/test.sh does); tests never download one"
SERVE_COMMAND = re.compile(r"see them in a browser: (dask-clip serve \S+)")


def test_the_demo_says_what_it_did_and_how_to_see_it(demo_run: DemoRun) -> None:
    assert "MEANINGLESS" in demo_run.stdout
    assert "embedded 4 shards: 32 rows, 24 with an embedding, 8 without" in demo_run.stdout
    assert "SemDeDup (eps=0.005, similarity >= 0.995) removed 9 of 32 rows" in demo_run.stdout
    assert SERVE_COMMAND.search(demo_run.stdout).group(1) == "dask-clip serve demo_output/shards"
    assert len(list((demo_run.folder / "demo_output" / "shards").glob("*.parquet"))) == 4


def test_the_demo_keeps_its_clip_score_top_30_percent_and_is_decontaminated(
    demo_run: DemoRun, cli, tmp_path: Path
) -> None:
    """Issue 23's curation on the demo's shards, from Python and from the CLI alike: the top 30% by ``clip_score``
    (exactly ceil(0.3 n) of the scored rows), and decontamination against a folder of two of its source photos,
    where the demo's two crops of each photo are flagged at the threshold measured for the random model
    (tests/test_decontaminate.py), and no other row."""
    import math

    import pandas as pd

    from dask_clip import ImageTextPairDataset, decontaminate, keep_top_fraction, testing

    shards = demo_run.folder / "demo_output" / "shards"
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    for name, pixels in testing.sample_photos(("astronaut", "moon")).items():
        (evaluation / f"{name}.jpg").write_bytes(testing.encode_jpeg(pixels))
    dataset = ImageTextPairDataset.from_webdataset(str(shards))

    def read(folder: Path) -> pd.DataFrame:
        frames = [pd.read_parquet(path) for path in sorted(folder.glob("*.parquet"))]
        return pd.concat(frames, ignore_index=True).sort_values("key", ignore_index=True)

    top = keep_top_fraction(dataset, "clip_score", 0.3).metadata.compute().sort_values("key", ignore_index=True)
    scored = top["clip_score"].notna()
    assert top.loc[scored, "keep_top_fraction"].sum() == math.ceil(0.3 * scored.sum())
    kept_scores = top.loc[top["keep_top_fraction"].astype(bool), "clip_score"]
    assert kept_scores.min() >= top.loc[scored & ~top["keep_top_fraction"].astype(bool), "clip_score"].max()
    result = cli(
        "filter", str(shards), "--column", "clip_score", "--top-fraction", "0.3", "--output", str(tmp_path / "top")
    )
    assert result.returncode == 0, result.stderr
    assert read(tmp_path / "top")["keep_top_fraction"].tolist() == top["keep_top_fraction"].tolist()

    frame = decontaminate(dataset, evaluation, threshold=0.998).metadata.compute().sort_values("key", ignore_index=True)
    copies = frame["caption"].isin(["a photo of astronaut", "a photo of moon"]) & frame["image_embedding"].notna()
    flagged = ~frame["decontaminated"].astype(bool)
    assert copies.sum() >= 3 and (flagged == copies).all(), frame[flagged | copies]
    assert set(frame.loc[flagged, "contamination_match"]) == {"astronaut.jpg", "moon.jpg"}
    command = ("decontaminate", str(shards), "--against", str(evaluation), "--threshold", "0.998")
    result = cli(*command, "--output", str(tmp_path / "clean"))
    assert result.returncode == 0, result.stderr
    on_disk = read(tmp_path / "clean")
    assert on_disk["decontaminated"].tolist() == frame["decontaminated"].tolist()
    matches = [m.fillna("").tolist() for m in (on_disk["contamination_match"], frame["contamination_match"])]
    assert matches[0] == matches[1]  # (null read back as None, computed as <NA>)


@pytest.fixture(scope="module")
def base_url(demo_run: DemoRun) -> Iterator[str]:
    """The ``dask-clip serve`` command the demo printed, run in the demo's folder on a free loopback port (a process
    with its own one-worker cluster, as a user runs it); its address once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    _, _, path = SERVE_COMMAND.search(demo_run.stdout).group(1).split()
    command = [sys.executable, "-m", "dask_clip.cli", "serve", path, "--port", str(port)]
    log = demo_run.folder / "serve.log"
    with log.open("w") as output:
        server = subprocess.Popen(command, cwd=demo_run.folder, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answering(f"{url}/api/overview", server, log)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_until_answering(url: str, server: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        assert server.poll() is None, f"dask-clip serve exited with {server.returncode}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"dask-clip serve did not answer within {seconds} s:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None or not os.access(CHROMIUM, os.X_OK):
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
def failed_requests() -> list[str]:
    """``"STATUS URL"`` of each request of ``page`` answered with an error (a test takes out those it expects)."""
    return []


@pytest.fixture
def page(browser: Browser, base_url: str, failed_requests: list[str]) -> Iterator[Page]:
    """A fresh page on the app; the test fails if any request the page makes is answered with an error."""
    context = browser.new_context(base_url=base_url, viewport={"width": 1200, "height": 800})
    # the first text search loads the text model in the server: on 2 loaded cores (CI) that took over Playwright's
    # default 30 s; a wait here catches a page that never answers, not a slow one
    context.set_default_timeout(120_000)
    opened = context.new_page()
    opened.on("response", lambda response: _record_failure(response, failed_requests))
    yield opened
    context.close()
    assert not failed_requests, f"the page's requests failed: {failed_requests}"


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
    assert all(width > 0 for width in widths), f"images that did not load: {widths}"
    return len(widths)


def test_search_by_text_shows_ranked_results_whose_thumbnails_load(page: Page, screenshots: Path) -> None:
    page.goto("/search")
    page.fill("input[name=text]", "a photo of chelsea the cat")
    page.fill("input[name=k]", "6")
    page.click("text=Search by text")
    page.wait_for_selector("#results .card")
    assert "Results 1–6 (exact search)" in page.inner_text("body")
    cards = page.locator("#results .card")
    assert cards.count() == 6
    assert re.match(r"#1 score -?\d\.\d{3}\na photo of ", cards.first.inner_text())
    assert thumbnails_loaded(page, "#results img") == 6
    page.screenshot(path=screenshots / "search.png", full_page=True)
    page.click("text=next")
    page.wait_for_selector("#results .card")
    assert page.locator("#results .card").first.inner_text().startswith("#7 ")
    assert thumbnails_loaded(page, "#results img") == 6


def test_a_duplicate_group_shows_the_kept_image_beside_the_removed_ones(page: Page, screenshots: Path) -> None:
    page.goto("/duplicates")
    assert "9 groups, 9 rows removed by eps=0.005 (similarity ≥ 0.995)" in page.inner_text("body")
    group = page.locator(".group").first
    assert group.locator(".card.kept").count() == 1
    removed = group.locator(".card.removed")
    assert removed.count() == 1  # each photo appears twice in the demo
    kept_caption, removed_caption = (
        group.locator(f".card.{which} div").nth(1).inner_text() for which in ("kept", "removed")
    )
    assert kept_caption == removed_caption  # the same photo, cropped differently
    similarities = [float(re.search(r"similarity (\S+)", text).group(1)) for text in removed.all_inner_texts()]
    assert all(similarity >= 0.995 for similarity in similarities)
    assert thumbnails_loaded(page, ".group img") == 18
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=screenshots / "duplicates.png")

    page.select_option("select[name=sort]", "similarity")
    page.fill("input[name=min_similarity]", "0.9999")  # a smaller eps than the demo's
    with page.expect_navigation():
        page.click("button:has-text('Show')")
    assert "sort=similarity" in page.url and "min_similarity=0.9999" in page.url
    preview = re.search(
        r"Preview: \d+ groups, (\d+) rows removed at similarity ≥ 0.9999 \(the run", page.inner_text("body")
    )
    assert 1 <= int(preview.group(1)) < 9
    lowest = page.locator(".group .card.removed").first.inner_text()
    assert float(re.search(r"similarity (\S+)", lowest).group(1)) >= 0.9999


@pytest.mark.parametrize(("column", "values", "missing"), [("clip_score", 24, 8), ("similarity", 9, 23)])
def test_a_histogram_counts_every_value_with_images_at_its_quantiles(
    page: Page, screenshots: Path, column: str, values: int, missing: int
) -> None:
    page.goto("/scores")
    histogram = page.locator(f"svg[aria-label='histogram of {column}']")
    bars = histogram.locator("rect")
    counts = [int(text.rsplit(":", 1)[1]) for text in bars.locator("title").all_text_contents()]
    summary = histogram.locator("xpath=preceding-sibling::p[1]").inner_text()
    assert summary.startswith(f"{values} values, {missing} missing, from ")
    assert sum(counts) == values
    tallest = max(bars.nth(n).bounding_box()["height"] for n in range(bars.count()))
    assert tallest == pytest.approx(90, abs=1)  # drawn: the highest bin fills the plot
    quantiles = histogram.locator("xpath=following-sibling::div[1]")
    assert quantiles.locator("img").count() == 5  # one image per quantile
    assert thumbnails_loaded(page) == 10
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=screenshots / "scores.png", full_page=True)


def test_the_failures_page_shows_each_failed_row_by_its_reason_with_its_image_where_one_exists(
    page: Page, failed_requests: list[str], screenshots: Path
) -> None:
    page.goto("/failures")
    page.wait_for_load_state("networkidle")
    assert sorted(page.locator("h2").all_inner_texts()) == [
        "no image in the tar (status: failed_to_download, HTTP Error 404: Not Found): 4 rows",
        "not a readable image: Truncated File Read: 4 rows",  # the demo's truncated JPEGs, in the tar
    ]
    undecodable = page.locator(".group", has=page.locator("h2", has_text="not a readable image"))
    not_downloaded = page.locator(".group", has=page.locator("h2", has_text="no image in the tar"))
    # each undecodable image is asked for, refused with the reason (422), and the card says so: no broken image
    assert undecodable.locator("object").count() == 4
    assert undecodable.locator(".noimage", has_text="its image in the tar cannot be shown").count() == 4
    assert all(undecodable.locator(".noimage").nth(n).is_visible() for n in range(4))
    keys = [text.split(" / ")[1] for text in undecodable.locator(".muted").all_inner_texts()]
    asked = {request.split("/thumb/")[1].split("/")[1] for request in failed_requests}
    assert asked == set(keys) and all(request.startswith("422 ") for request in failed_requests)
    failed_requests.clear()
    assert not_downloaded.locator(".card", has_text="no image in the tar").count() == 4
    assert not_downloaded.locator("img, object").count() == 0
    page.screenshot(path=screenshots / "failures.png", full_page=True)


def test_the_overview_names_each_derived_column_s_operation(page: Page, screenshots: Path) -> None:
    page.goto("/")
    assert "4 shards, 32 rows, id column key." in page.inner_text("body")
    produced_by = dict(
        zip(
            page.locator("table").first.locator("tr td:nth-child(1)").all_inner_texts(),
            page.locator("table").first.locator("tr td:nth-child(2)").all_inner_texts(),
            strict=True,
        )
    )
    assert produced_by["image_embedding"].startswith("ClipImageEmbedder(model_dir=")
    assert produced_by["text_embedding"].startswith("ClipTextEmbedder(model_dir=")
    assert produced_by["clip_score"].startswith("clip_score(")
    assert all(produced_by[c].startswith("SemanticDeduplicator(") for c in ("keep", "duplicate_of", "similarity"))
    assert "eps=0.005" in produced_by["keep"]
    page.screenshot(path=screenshots / "overview.png", full_page=True)
    assert page.get_attribute("text=See them", "href") == "/failures"
