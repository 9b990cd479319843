"""``dask-clip report``: one self-contained HTML file, bounded in size, with the groups, histograms and failures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dask_clip import ImageTextPairDataset, testing
from dask_clip.dataset.report import write_report
from dask_clip.images.thumbnails import ThumbnailCache
from tests.test_review import PLACEHOLDER, inline_jpegs, write_deduplicated_shards

MAX_THUMBNAIL_BYTES = 20_000
"""A 128 px JPEG as base64 stays far under this."""


def assert_offline(document: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", document, re.IGNORECASE)
    assert "<script" not in document.lower()


def test_the_report_holds_the_largest_groups_and_histograms_within_its_bound(tmp_path: Path) -> None:
    write_deduplicated_shards(tmp_path / "shards")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    out = tmp_path / "report.html"
    size = write_report(dataset, out, groups=2, removed_per_group=1, cache=ThumbnailCache(tmp_path / "cache"))
    document = out.read_text()

    assert size == out.stat().st_size
    assert_offline(document)
    assert "kept 00000/a: 2 removed" in document and "kept 00000/d: 1 removed" in document
    assert "kept 00001/f" not in document  # only the 2 largest groups
    assert len(inline_jpegs(document)) == 2 * (1 + 1)  # capped: the kept row and one removed per group
    assert size < 4 * MAX_THUMBNAIL_BYTES + 20_000
    assert re.search(r'<h3>similarity</h3><svg class="histogram"[^>]*>(<rect [^>]*>.*?</rect>)+', document)
    assert "<p>2 shards, 7 rows</p>" in document


def test_the_command_writes_failures_with_their_reasons(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "dask_clip.cli", "report", str(shards), str(out), "--n-workers", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    document = out.read_text()
    assert_offline(document)
    assert "<h3>HTTP Error 404: Not Found: 3 rows</h3>" in document and "3 with a reason in error_message" in document
    assert PLACEHOLDER.findall(document) == ["HTTP Error 404: Not Found"] * 3


def test_a_file_that_is_no_report_is_never_replaced(tmp_path: Path) -> None:
    from dask_clip.errors import UsageError

    notes = tmp_path / "notes.html"
    notes.write_text("<html>my notes</html>")
    dataset = ImageTextPairDataset.from_webdataset(str(testing.make_img2dataset_shards(tmp_path / "s")[0].parent))
    with pytest.raises(UsageError, match="exists; pass overwrite=True"):
        write_report(dataset, notes)
    with pytest.raises(UsageError, match="is not a dask_clip report"):
        write_report(dataset, notes, overwrite=True)
    assert notes.read_text() == "<html>my notes</html>"
    report = tmp_path / "report.html"
    write_report(dataset, report)
    assert write_report(dataset, report, overwrite=True) == report.stat().st_size
