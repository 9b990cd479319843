"""``LocateImages`` records where each row's image lies in its tar, reading headers only, for tars written by
dask_clip's own builders, by the webdataset library and (tests/test_img2dataset.py) by img2dataset."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
from pathlib import Path
from typing import Any

import fsspec
import pandas as pd
import pyarrow as pa
import pytest

from dask_clip import ImageTextPairDataset, LocateImages, ShardReadError, testing
from dask_clip.execution import ShardRef, ShardTask
from dask_clip.io import tar_samples


def located(folder: Path) -> pd.DataFrame:
    return LocateImages()(ImageTextPairDataset.from_webdataset(str(folder))).metadata.compute()


def member_bytes(tar: Path, offset: int, size: int) -> bytes:
    with open(tar, "rb") as file:
        file.seek(offset)
        return file.read(size)


def test_locations_point_at_each_rows_image_and_are_null_without_one(shards: Path) -> None:
    frame = located(shards)
    failed = frame["status"] != "success"
    assert failed.sum() == 3 and frame.loc[failed, ["image_offset", "image_size"]].isna().all().all()
    assert str(frame["image_offset"].dtype) == "int64[pyarrow]"
    for row in frame[~failed].itertuples():
        data = member_bytes(shards / f"{row.key[:5]}.tar", row.image_offset, row.image_size)
        assert hashlib.sha256(data).hexdigest() == row.sha256, row.key


def test_webdataset_tar_writer_tars_are_located_choosing_the_image_member_the_embedders_read(tmp_path: Path) -> None:
    wds = pytest.importorskip("webdataset")
    photo = testing.encode_jpeg(next(iter(testing.sample_photos().values())))
    samples = {
        "a": {"jpg": photo, "txt": b"only a jpg"},
        "b": {"png": b"not the one read", "JPEG": photo + b"b", "txt": b"two images"},
        "c": {"txt": b"no image"},
    }
    folder = tmp_path / "wds"
    folder.mkdir()
    with wds.TarWriter(str(folder / "00000.tar")) as sink:
        for key, members in samples.items():
            sink.write({"__key__": key, **members})
    pd.DataFrame({"key": list(samples)}).to_parquet(folder / "00000.parquet")
    frame = located(folder).set_index("key")
    tar = folder / "00000.tar"
    assert member_bytes(tar, frame.loc["a", "image_offset"], frame.loc["a", "image_size"]) == photo
    assert member_bytes(tar, frame.loc["b", "image_offset"], frame.loc["b", "image_size"]) == photo + b"b"
    assert pd.isna(frame.loc["c", "image_offset"]) and pd.isna(frame.loc["c", "image_size"])


class CountingFileSystem(fsspec.AbstractFileSystem):
    """The local filesystem, counting the bytes read through the files it opens."""

    def __init__(self) -> None:
        super().__init__()
        self.local = fsspec.filesystem("file")
        self.bytes_read = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        counter = self

        class Counting(io.FileIO):
            def read(self, size: int = -1) -> bytes:
                data = super().read(size)
                counter.bytes_read += len(data)
                return data

        return io.BufferedReader(Counting(path, "r"), buffer_size=512)


def test_only_headers_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = {f"{i:03d}": {"jpg": bytes(2_000_000), "txt": b"caption"} for i in range(5)}
    rows = [{"key": key} for key in big]
    tar, _ = testing.write_shard(tmp_path, 0, rows, big, schema=pa.schema([("key", pa.string())]))
    counting = CountingFileSystem()
    monkeypatch.setattr(tar_samples, "filesystem_of", lambda url: (counting, url))
    task = ShardTask(ShardRef(0, "00000", str(tar), ""), "key")
    columns = LocateImages().process_shard(pd.DataFrame(rows), task, None)
    assert list(columns["image_size"]) == [2_000_000] * 5
    assert counting.bytes_read < 20 * 1024, f"read {counting.bytes_read} of {tar.stat().st_size} bytes"


def test_a_replaced_tar_makes_saved_locations_stale_and_a_rerun_locates_again(shards: Path) -> None:
    LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    again = LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    assert not again["written"].any()

    replacement = testing.make_img2dataset_shards(shards.parent / "other", seed=7)[0]  # 00000.tar, other order
    shutil.copyfile(replacement, shards / "00000.tar")
    summary = LocateImages()(ImageTextPairDataset.from_webdataset(str(shards))).save_metadata()
    assert summary.set_index("stem")["written"].to_dict() == {"00000": True, "00001": False, "00003": False}
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    new_hashes = {
        row.key: hashlib.sha256(member_bytes(shards / "00000.tar", row.image_offset, row.image_size)).hexdigest()
        for row in frame[frame["key"].str.startswith("00000") & frame["image_offset"].notna()].itertuples()
    }
    replaced = pd.read_parquet(replacement.with_suffix(".parquet")).set_index("key")["sha256"]
    assert new_hashes == replaced.dropna().to_dict()


def test_a_compressed_tar_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "gz"
    testing.make_img2dataset_shards(folder, shard_numbers=(0,))
    (folder / "00000.tar").write_bytes(gzip.compress((folder / "00000.tar").read_bytes()))
    with pytest.raises(ShardReadError, match=r"00000\.tar: .*located only in uncompressed tars"):
        located(folder)


def test_cli_locate_saves_the_columns(cli, shards: Path) -> None:
    result = cli("locate", str(shards))
    assert result.returncode == 0, result.stderr
    assert "located the images of 18 rows in 3 shards" in result.stdout
    frame = ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute()
    assert frame["image_offset"].notna().sum() == 15
