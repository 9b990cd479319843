"""One image read from its tar with one ranged read, at the recorded location; wrong locations are refused."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import fsspec
import pandas as pd
import pytest

from dask_clip import ImageLocationError, ImageTextPairDataset, LocateImages, testing
from dask_clip.io.image_access import read_member, recorded_tar_identity


@pytest.fixture
def located(shards: Path) -> pd.DataFrame:
    """The shards' rows with images, their locations saved next to them."""
    LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    return frame[frame["image_offset"].notna()]


def test_reads_each_rows_image(shards: Path, located: pd.DataFrame) -> None:
    for row in located.itertuples():
        tar = str(shards / f"{row.key[:5]}.tar")
        identity = recorded_tar_identity(str(shards / f"{row.key[:5]}.parquet"))
        data = read_member(tar, row.image_offset, row.image_size, key=row.key, tar_identity=identity)
        assert hashlib.sha256(data).hexdigest() == row.sha256


def test_reads_through_fsspec_urls(shards: Path, located: pd.DataFrame) -> None:
    memory = fsspec.filesystem("memory")
    memory.put(str(shards / "00001.tar"), "/shards/00001.tar")
    row = located[located["key"].str.startswith("00001")].iloc[0]
    data = read_member("memory://shards/00001.tar", row["image_offset"], row["image_size"], key=row["key"])
    assert hashlib.sha256(data).hexdigest() == row["sha256"]


def test_a_wrong_location_is_refused_naming_tar_key_and_offset(shards: Path, located: pd.DataFrame) -> None:
    first, second = located.iloc[0], located.iloc[1]
    tar = str(shards / f"{first['key'][:5]}.tar")
    offset, size = int(first["image_offset"]), int(first["image_size"])
    for wrong_offset in (offset + 512, offset + 1, 0, 10**9):
        with pytest.raises(ImageLocationError, match=rf"{tar}: key '{first['key']}' at offset {wrong_offset}"):
            read_member(tar, wrong_offset, size, key=first["key"])
    with pytest.raises(ImageLocationError, match=r"has \d+ bytes, not the 7 recorded"):
        read_member(tar, offset, 7, key=first["key"])
    with pytest.raises(ImageLocationError, match="of another key"):
        read_member(tar, offset, size, key=second["key"])


def test_a_tar_replaced_after_locating_is_refused(shards: Path, located: pd.DataFrame) -> None:
    replacement = testing.make_img2dataset_shards(shards.parent / "other", seed=7)[0]
    identity = recorded_tar_identity(str(shards / "00000.parquet"))
    shutil.copyfile(replacement, shards / "00000.tar")
    for row in located[located["key"].str.startswith("00000")].itertuples():
        with pytest.raises(ImageLocationError, match="the tar changed since its images were located"):
            read_member(str(shards / "00000.tar"), row.image_offset, row.image_size, key=row.key, tar_identity=identity)


def test_no_identity_is_recorded_before_locating(shards: Path) -> None:
    assert recorded_tar_identity(str(shards / "00000.parquet")) is None
