"""Rows and duplicate groups as thumbnail grids (``dask_clip.show``, ``dataset.duplicate_groups``): one inline JPEG
per row, the row's own image, placeholders that say why, groups in the order asked with the kept image first."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from dask_clip import ColumnError, ExactDeduplicator, ImageTextPairDataset, LocateImages, UsageError, show, testing
from dask_clip.images.thumbnails import ThumbnailCache, thumbnail
from dask_clip.io import image_access

IMAGE = re.compile(r'<img src="data:image/jpeg;base64,([A-Za-z0-9+/=]+)"')
PLACEHOLDER = re.compile(r'<div class="dask-clip-missing"[^>]*>([^<]*)</div>')


def inline_jpegs(html: str) -> list[bytes]:
    return [base64.b64decode(data) for data in IMAGE.findall(html)]


def member_thumbnail(tar: Path, key: str, max_side: int) -> bytes:
    """The thumbnail made directly from the row's member, read from its tar by name."""
    with tarfile.open(tar) as archive:
        return thumbnail(archive.extractfile(f"{key}.jpg").read(), max_side)


def assert_same_images(html: str, tars_and_keys: list[tuple[Path, str]], max_side: int) -> None:
    shown = inline_jpegs(html)
    assert len(shown) == len(tars_and_keys)
    for jpeg, (tar, key) in zip(shown, tars_and_keys, strict=True):
        expected = member_thumbnail(tar, key, max_side)
        assert Image.open(io.BytesIO(jpeg)).size == Image.open(io.BytesIO(expected)).size
        assert hashlib.sha256(jpeg).digest() == hashlib.sha256(expected).digest(), key


def test_show_gives_each_row_its_own_image_and_a_placeholder_with_the_reason(shards: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    rows = dataset.metadata.compute()
    rows = rows[rows["key"].str.startswith("00000")]
    grid = show(rows, dataset, max_side=96, cache=ThumbnailCache(tmp_path / "cache"))
    html = grid._repr_html_()

    with_image = rows[rows["status"] == "success"]
    assert_same_images(html, [(shards / "00000.tar", key) for key in with_image["key"]], 96)
    failed = rows[rows["status"] != "success"]
    assert PLACEHOLDER.findall(html) == list(failed["error_message"]) and len(failed) == 1
    assert [tile.jpeg is None for tile in grid.tiles] == list(rows["status"] != "success")
    assert all(f"caption: {caption}" in html for caption in rows["caption"])
    assert f"ThumbnailGrid({len(rows)} rows, 1 without an image)" in repr(grid)


def test_unlocated_rows_are_located_from_their_tars_headers_only(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes, reads = [], []
    iter_members, read_member = image_access.iter_tar_members, image_access.read_member

    def recording_pass(url: str, headers_only: bool = False):
        passes.append((Path(url).name, headers_only))
        return iter_members(url, headers_only)

    monkeypatch.setattr(image_access, "iter_tar_members", recording_pass)
    monkeypatch.setattr(
        "dask_clip.images.thumbnails.read_member", lambda *a, **k: reads.append(a) or read_member(*a, **k)
    )
    keys = [testing.img2dataset_key(0, 0), testing.img2dataset_key(1, 2), testing.img2dataset_key(0, 4)]
    stems = [key[:5] for key in keys]
    frame = pd.DataFrame({"key": keys, "tar_url": [str(shards / f"{stem}.tar") for stem in stems], "score": 0.5})
    frame = frame[[(shards / f"{s}.tar").exists() for s in stems]]
    grid = show(frame, cache=ThumbnailCache(tmp_path / "cache"))

    assert sorted(passes) == [("00000.tar", True), ("00001.tar", True)]  # one header pass per tar
    located = [tile.jpeg is not None for tile in grid.tiles]
    assert len(reads) == sum(located)  # one ranged read per image shown
    assert_same_images(
        grid._repr_html_(), [(shards / f"{key[:5]}.tar", key) for key, ok in zip(keys, located, strict=True) if ok], 160
    )
    assert "score: 0.500" in grid._repr_html_()


def test_located_rows_are_read_at_their_recorded_places_without_a_pass(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    monkeypatch.setattr(image_access, "iter_tar_members", lambda *a, **k: pytest.fail("a tar was scanned"))
    frame = pd.DataFrame({"key": [testing.img2dataset_key(1, 1), testing.img2dataset_key(1, 3)], "stem": "00001"})
    frame = frame[frame["key"].isin(dataset.metadata.compute()["key"])]
    grid = show(frame, dataset, cache=ThumbnailCache(tmp_path / "cache"))
    shown = [tile.jpeg is not None for tile in grid.tiles]
    expected = [(shards / "00001.tar", key) for key, ok in zip(grid.frame["key"], shown, strict=True) if ok]
    assert len(expected) >= 1
    assert_same_images(grid._repr_html_(), expected, 160)


def test_show_says_how_to_find_the_rows_when_it_cannot() -> None:
    with pytest.raises(UsageError, match="tar_url"):
        show(pd.DataFrame({"key": ["a"]}))


def write_deduplicated_shards(folder: Path) -> dict[str, Path]:
    """Two shards whose dedup columns are written by hand: groups of known sizes, similarities and a chain."""
    schema = pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("keep", pa.bool_()),
            ("duplicate_of", pa.string()),
            ("duplicate_of_shard", pa.string()),
            ("similarity", pa.float64()),
        ]
    )
    photos = list(testing.sample_photos().values())
    decisions = {  # key: (shard, duplicate_of, duplicate_of_shard, similarity)
        "a": (0, None, None, None),
        "b": (0, "a", "00000", 0.99),
        "c": (0, "b", "00000", 0.97),  # closest to a removed row: in a's group
        "d": (0, None, None, None),
        "f": (1, None, None, None),
        "g": (1, "f", "00001", 0.95),
        "h": (1, "d", "00000", 0.999),  # across shards
    }
    tars = {}
    for shard in (0, 1):
        keys = [key for key, decision in decisions.items() if decision[0] == shard]
        rows = [
            {
                "key": key,
                "caption": f"photo {key}",
                "keep": decisions[key][1] is None,
                "duplicate_of": decisions[key][1],
                "duplicate_of_shard": decisions[key][2],
                "similarity": decisions[key][3],
            }
            for key in keys
        ]
        members = {key: {"jpg": testing.encode_jpeg(photos["abcdfgh".index(key)])} for key in keys}
        tars[f"{shard:05d}"], _ = testing.write_shard(folder, shard, rows, members, schema=schema)
    return tars


def test_duplicate_groups_in_the_order_asked_with_the_kept_image_first(tmp_path: Path) -> None:
    tars = write_deduplicated_shards(tmp_path / "shards")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    cache = ThumbnailCache(tmp_path / "cache")

    by_size = dataset.duplicate_groups(cache=cache)
    assert [list(frame["key"]) for frame in by_size] == [["a", "b", "c"], ["d", "h"], ["f", "g"]]
    assert list(by_size[0]["role"]) == ["kept", "removed", "removed"]
    assert list(by_size[0]["similarity"].iloc[1:]) == [0.99, 0.97]
    assert list(by_size[0]["duplicate_of"].iloc[1:]) == ["a", "b"]
    assert list(by_size[1]["stem"]) == ["00000", "00001"]
    by_similarity = dataset.duplicate_groups(sort="similarity", cache=cache)
    assert [frame["key"].iloc[0] for frame in by_similarity] == ["f", "a", "d"]
    tighter = dataset.duplicate_groups(min_similarity=0.98, cache=cache)
    assert [list(frame["key"]) for frame in tighter] == [["a", "b"], ["d", "h"]] and tighter.total == 2
    first = dataset.duplicate_groups(n=1, cache=cache)
    assert len(first) == 1 and first.total == 3
    capped = dataset.duplicate_groups(max_removed=1, cache=cache)
    assert len(capped[0]) == 3 and len(capped.grids[0].tiles) == 2 and capped[0]["caption"].iloc[2] == "photo c"

    html = by_size._repr_html_()
    shown = [(tars[stem], key) for frame in by_size for stem, key in zip(frame["stem"], frame["key"], strict=True)]
    assert_same_images(html, shown, 128)
    assert html.index("kept 00000/a") < html.index("kept 00000/d") < html.index("kept 00001/f")
    assert "similarity: 0.990" in html and "caption: photo h" in html


def test_exact_duplicates_group_under_the_kept_copy(tmp_path: Path) -> None:
    photo = testing.sample_photos()["chelsea"]
    payloads = {"x": testing.encode_jpeg(photo), "y": testing.encode_jpeg(photo[:200]), "z": testing.encode_jpeg(photo)}
    rows = [
        {"key": key, "caption": key, "status": "success", "sha256": hashlib.sha256(data).hexdigest()}
        for key, data in payloads.items()
    ]
    testing.write_shard(tmp_path / "shards", 0, rows, {key: {"jpg": data} for key, data in payloads.items()})
    deduplicated = ExactDeduplicator()(ImageTextPairDataset.from_webdataset(str(tmp_path / "shards")))
    groups = deduplicated.duplicate_groups(cache=ThumbnailCache(tmp_path / "cache"))
    assert len(groups) == 1 and list(groups[0]["key"]) == ["x", "z"] and groups[0]["similarity"].iloc[1] == 1.0


def test_a_dataset_not_deduplicated_names_the_missing_columns(shards: Path) -> None:
    with pytest.raises(ColumnError, match=r"\['keep', 'duplicate_of', 'duplicate_of_shard', 'similarity'\]"):
        ImageTextPairDataset.from_webdataset(str(shards)).duplicate_groups()
