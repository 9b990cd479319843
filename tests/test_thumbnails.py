"""Thumbnails: small, upright JPEGs under the embedding's pixel limit, cached by tar identity, key and size."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dask_clip import ImageLocationError, ImageTextPairDataset, LocateImages, testing
from dask_clip.errors import ImageDecodeError
from dask_clip.images import thumbnails
from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess
from dask_clip.images.thumbnails import ThumbnailCache, row_thumbnail, thumbnail
from dask_clip.io.image_access import recorded_tar_identity


def encoded(pixels: np.ndarray, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, image_format, **options)
    return buffer.getvalue()


def test_a_thumbnail_is_a_jpeg_at_most_max_side_keeping_the_aspect_ratio() -> None:
    photo = next(iter(testing.sample_photos().values()))  # 512 x 512
    wide = np.ascontiguousarray(photo[:200])  # 512 wide, 200 high
    image = Image.open(io.BytesIO(thumbnail(testing.encode_jpeg(wide), max_side=128)))
    assert image.format == "JPEG" and image.size == (128, 50)


def test_the_exif_orientation_is_applied() -> None:
    wide = np.zeros((40, 100, 3), np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = Image.open(io.BytesIO(thumbnail(encoded(wide, "JPEG", exif=exif.tobytes()), max_side=50)))
    assert image.size == (20, 50)


def test_an_image_over_max_image_pixels_gets_the_error_embedding_gives_it() -> None:
    data = encoded(np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(ImageDecodeError) as embedding:
        decode_and_preprocess(data, PreprocessConfig(max_image_pixels=5000))
    with pytest.raises(ImageDecodeError) as thumbnailing:
        thumbnail(data, max_image_pixels=5000)
    assert str(thumbnailing.value) == str(embedding.value) and "over the limit of 5000" in str(embedding.value)


@pytest.fixture
def located(shards: Path) -> pd.DataFrame:
    LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    return frame[frame["key"].str.startswith("00000") & frame["image_offset"].notna()]


def test_a_rows_thumbnail_is_read_once_then_served_from_the_cache(
    shards: Path, located: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    row, tar = located.iloc[0], str(shards / "00000.tar")
    identity = recorded_tar_identity(str(shards / "00000.parquet"))
    cache = ThumbnailCache(tmp_path / "cache")
    first = row_thumbnail(tar, row["image_offset"], row["image_size"], row["key"], tar_identity=identity, cache=cache)
    assert max(Image.open(io.BytesIO(first)).size) == 256
    assert len(list((tmp_path / "cache").rglob("*.jpg"))) == 1

    def no_reads(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("the tar was read for a cached thumbnail")

    monkeypatch.setattr(thumbnails, "read_member", no_reads)
    again = row_thumbnail(tar, row["image_offset"], row["image_size"], row["key"], tar_identity=identity, cache=cache)
    assert again == first
    with pytest.raises(AssertionError, match="the tar was read"):  # another size is another thumbnail
        row_thumbnail(tar, row["image_offset"], row["image_size"], row["key"], max_side=64, cache=cache)


def test_a_replaced_tar_serves_no_thumbnail_of_the_tar_before(
    shards: Path, located: pd.DataFrame, tmp_path: Path
) -> None:
    identity = recorded_tar_identity(str(shards / "00000.parquet"))
    cache, tar = ThumbnailCache(tmp_path / "cache"), str(shards / "00000.tar")
    for row in located.itertuples():
        row_thumbnail(tar, row.image_offset, row.image_size, row.key, tar_identity=identity, cache=cache)
    shutil.copyfile(testing.make_img2dataset_shards(tmp_path / "other", seed=7)[0], tar)
    for row in located.itertuples():
        with pytest.raises(ImageLocationError, match="the tar changed since its images were located"):
            row_thumbnail(tar, row.image_offset, row.image_size, row.key, tar_identity=identity, cache=cache)


def test_the_default_cache_is_in_the_users_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ThumbnailCache().folder == tmp_path / "dask_clip" / "thumbnails"


def test_a_bounded_cache_deletes_the_least_recently_used_files_it_wrote(tmp_path: Path) -> None:
    cache = ThumbnailCache(tmp_path / "cache", max_bytes=250)
    for name in ("a", "b"):
        cache.put({"key": name}, name.encode() * 100)
    assert cache.get({"key": "a"}) == b"a" * 100  # read: now more recently used than b
    cache.put({"key": "c"}, b"c" * 100)
    assert cache.get({"key": "b"}) is None and not cache.path({"key": "b"}).exists()
    assert cache.get({"key": "a"}) == b"a" * 100 and cache.get({"key": "c"}) == b"c" * 100
    assert cache.bytes_written == 200
    cache.put({"key": "huge"}, b"h" * 300)  # over the bound alone: not kept, nothing evicted for it
    assert cache.get({"key": "huge"}) is None and cache.bytes_written == 200
    assert sum(path.stat().st_size for path in (tmp_path / "cache").rglob("*.jpg")) == 200


def test_a_bounded_cache_never_deletes_a_file_it_did_not_write(tmp_path: Path) -> None:
    earlier = ThumbnailCache(tmp_path / "cache")  # another process, or an earlier run, in the same folder
    earlier.put({"key": "theirs"}, b"t" * 100)
    notes = tmp_path / "cache" / "notes.txt"
    notes.write_text("not a thumbnail")
    cache = ThumbnailCache(tmp_path / "cache", max_bytes=150)
    assert cache.get({"key": "theirs"}) == b"t" * 100  # a hit, but not the cache's to delete
    for number in range(10):
        cache.put({"key": number}, b"m" * 100)
    assert cache.get({"key": "theirs"}) == b"t" * 100 and notes.exists()
    assert cache.get({"key": 9}) == b"m" * 100 and cache.get({"key": 8}) is None
    cache.clear()
    assert cache.get({"key": 9}) is None and cache.bytes_written == 0
    assert cache.get({"key": "theirs"}) == b"t" * 100 and notes.read_text() == "not a thumbnail"
