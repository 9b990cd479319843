"""Every decision can be seen: the rows each side of a top fraction's threshold and of an image-based filter's
boundary, found from what the columns record, in the report (threshold marked on the histogram) and in Python."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dask_clip import ImageTextPairDataset, keep_near_target, keep_top_fraction
from dask_clip.dataset.report import write_report
from dask_clip.errors import ColumnError
from dask_clip.images.thumbnails import ThumbnailCache
from tests.test_near_target import decided, write_pool, write_target
from tests.test_review import inline_jpegs, write_deduplicated_shards


def boundary_section(document: str) -> str:
    return document.split("<h2>Decisions at their boundary</h2>")[1].split("<h2>")[0]


def test_the_rows_at_a_top_fractions_threshold_are_in_the_report(tmp_path: Path) -> None:
    write_deduplicated_shards(tmp_path / "shards")  # similarities 0.999 (h), 0.99 (b), 0.97 (c), 0.95 (g), 3 null
    dataset = keep_top_fraction(ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")), "similarity", 0.5)
    boundary = dataset.decision_boundary("keep_top_fraction", n=1, cache=ThumbnailCache(tmp_path / "cache"))
    assert (boundary.kept["key"].tolist(), boundary.dropped["key"].tolist()) == (["b"], ["c"])
    assert boundary.decision.threshold == 0.99 and "top 0.5 by similarity: 2 of 4 scored rows kept" in repr(boundary)
    wider = dataset.decision_boundary("keep_top_fraction", n=5, cache=ThumbnailCache(tmp_path / "cache"))
    assert (wider.kept["key"].tolist(), wider.dropped["key"].tolist()) == (["h", "b"], ["c", "g"])  # nulls left out

    out = tmp_path / "report.html"
    write_report(dataset, out, groups=1, removed_per_group=1, per_side=1, cache=ThumbnailCache(tmp_path / "cache"))
    document = out.read_text()
    section = boundary_section(document)
    assert "<h4>last 1 kept</h4>" in section and "<h4>first 1 not kept</h4>" in section
    shown = re.findall(r"<figcaption[^>]*>similarity: ([0-9.]+)<br>(\w+)<br>", section)
    assert shown == [("0.990", "b"), ("0.970", "c")]
    assert len(inline_jpegs(section)) == 2
    line = re.search(r'<h3>similarity</h3><svg[^>]*>.*?<line class="threshold" x1="([0-9.]+)"', document)
    assert line is not None and 0 < float(line.group(1)) < 360  # 0.99 within the histogram's range 0.95-0.999


def test_the_rows_each_side_of_an_image_based_filter_are_shown(tmp_path: Path, client) -> None:
    pool = write_pool(tmp_path / "pool", per_group=4)
    target = write_target(tmp_path / "target.npy")
    dataset = keep_near_target(ImageTextPairDataset.from_webdataset(str(tmp_path / "pool")), target, k=4, threshold=0.8)
    boundary = dataset.decision_boundary("near_target", n=3)
    kept, dropped = boundary.kept, boundary.dropped
    rows = decided(dataset)
    similarity = rows["target_similarity"].astype("float64")
    assert kept["key"].tolist() == similarity[rows["near_target"].astype(bool)].sort_values().index[:3][::-1].tolist()
    assert pool.loc[kept["key"], "planted"].all() and not pool.loc[dropped["key"], "planted"].any()
    assert dropped["target_similarity"].is_monotonic_decreasing
    assert kept["target_similarity"].min() >= 0.8 > dropped["target_similarity"].max()

    out = tmp_path / "report.html"
    write_report(dataset, out, per_side=3, cache=ThumbnailCache(tmp_path / "cache"))
    section = boundary_section(out.read_text())
    assert f"near {target} (centroids, k=4: cosine &gt;= 0.8)" in section
    assert section.count("<figure") == 6  # empty tars: each row shows why it has no image
    with pytest.raises(ColumnError, match="'target_similarity' records no decision"):
        dataset.decision_boundary("target_similarity")
