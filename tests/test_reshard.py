"""dataset.to_webdataset: filtered resharding with new ids, members copied byte for byte, on a 2-worker cluster."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import webdataset as wds

from dask_clip import ColumnError, ImageTextPairDataset, UsageError, testing


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """``{key: {extension: bytes}}`` of a tar, checking that each key's members are contiguous."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    with tarfile.open(path) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            if not order or order[-1] != key:
                assert key not in samples, f"{path}: members of {key} are not contiguous"
                order.append(key)
            samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    return samples


def add_extra_members(folder: Path) -> None:
    """Give every sample of every tar two more members (``.cls`` and ``.seg.png``), as other datasets have."""
    segmentation = testing.encode_jpeg(testing.sample_photos(["coins"])["coins"][:20, :20])
    for tar in sorted(folder.glob("*.tar")):
        samples = read_tar(tar)
        with tarfile.open(tar, "w") as archive:
            for key, members in samples.items():
                members = {**members, "cls": key[-2:].encode(), "seg.png": segmentation}
                for extension, payload in members.items():
                    info = tarfile.TarInfo(f"{key}.{extension}")
                    info.size = len(payload)
                    archive.addfile(info, io.BytesIO(payload))


def with_keep_column(dataset: ImageTextPairDataset, keep) -> ImageTextPairDataset:
    """``dataset`` plus a ``bool[pyarrow]`` column ``keep`` computed per shard by ``keep(key) -> bool | None``."""

    def add(rows: pd.DataFrame) -> pd.DataFrame:
        values = [keep(key) for key in rows["key"]]
        return rows.assign(keep=pd.array(values, dtype=pd.ArrowDtype(pa.bool_())))

    meta = dataset.metadata._meta.assign(keep=pd.Series([], dtype=pd.ArrowDtype(pa.bool_())))
    return dataset.with_metadata(dataset.metadata.map_partitions(add, meta=meta))


def input_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    return {key: members for tar in sorted(folder.glob("*.tar")) for key, members in read_tar(tar).items()}


def test_all_rows_reshard_into_new_ids_with_members_copied(client, shards: Path, tmp_path: Path) -> None:
    add_extra_members(shards)
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    original = dataset.metadata.compute()
    before = input_samples(shards)
    output = tmp_path / "out"

    summary = dataset.to_webdataset(str(output), samples_per_shard=4, max_shards=3, old_id_col="old_key")

    assert summary["stem"].tolist() == ["000", "001", "002", "003", "004"]
    assert summary["rows"].tolist() == [4, 4, 4, 4, 2]
    assert summary["samples"].sum() == 15 and summary["samples"].tolist() == [
        sum(o in before for o in original["key"][i : i + 4]) for i in range(0, 18, 4)
    ]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        [".dask_clip-output.json", *(f"{s:03d}.{e}" for s in range(5) for e in ("tar", "parquet"))]
    )

    resharded = ImageTextPairDataset.from_webdataset(str(output))
    frame = resharded.metadata.compute()
    assert frame["old_key"].tolist() == original["key"].tolist()  # every row, in input order
    assert frame["key"].tolist() == [testing.img2dataset_key(i // 4, i % 4, 3, 1) for i in range(18)]
    pd.testing.assert_frame_equal(
        frame.drop(columns=["key", "old_key"]).reset_index(drop=True),
        original.drop(columns=["key"]).reset_index(drop=True),
    )

    after = input_samples(output)
    assert len(after) == 15
    for new_key, old_key in zip(frame["key"], frame["old_key"], strict=True):
        if old_key not in before:  # a failed download: a row without tar members
            assert new_key not in after
            continue
        members = after[new_key]
        assert sorted(members) == sorted(before[old_key])
        for extension in ("jpg", "txt", "cls", "seg.png"):
            assert members[extension] == before[old_key][extension], (new_key, extension)
        sidecar = json.loads(members["json"])
        assert sidecar["key"] == new_key and sidecar["old_key"] == old_key
        assert {k: v for k, v in sidecar.items() if k not in ("key", "old_key")} == {
            k: v for k, v in json.loads(before[old_key]["json"]).items() if k != "key"
        }
    assert not (output / ".staging").exists()


def test_filter_keeps_true_rows_only_and_an_input_shard_can_vanish(client, shards: Path, tmp_path: Path) -> None:
    def keep(key: str) -> bool | None:
        if key.startswith("00001"):
            return False  # this whole input shard filters down to nothing
        return None if key.endswith("5") else int(key) % 2 == 0  # null counts as not kept

    dataset = with_keep_column(ImageTextPairDataset.from_webdataset(str(shards)), keep)
    original = dataset.metadata.compute()
    expected_old = [k for k in original["key"] if keep(k)]
    output = tmp_path / "filtered"

    summary = dataset.to_webdataset(str(output), filter_column="keep", samples_per_shard=2, max_shards=2)

    frame = ImageTextPairDataset.from_webdataset(str(output)).metadata.compute()
    assert len(frame) == len(expected_old) == summary["rows"].sum() == 6
    assert frame["keep"].all()
    assert frame["url"].tolist() == original.set_index("key").loc[expected_old, "url"].tolist()
    assert frame["key"].tolist() == [testing.img2dataset_key(i // 2, i % 2, 2, 1) for i in range(6)]
    keys_with_image = {k for k, status in zip(frame["key"], frame["status"], strict=True) if status == "success"}

    # the webdataset library reads the output, and every sample is a kept row with an image
    urls = [str(output / f"{stem}.tar") for stem in summary["stem"]]
    seen = {sample["__key__"]: sample for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert set(seen) == keys_with_image
    for key, sample in seen.items():
        assert json.loads(sample["json"])["key"] == key
        assert sample["txt"].decode() == frame.set_index("key").loc[key, "caption"]


def test_nothing_kept_writes_nothing(client, shards: Path, tmp_path: Path) -> None:
    dataset = with_keep_column(ImageTextPairDataset.from_webdataset(str(shards)), lambda key: False)
    output = tmp_path / "empty"
    summary = dataset.to_webdataset(str(output), filter_column="keep")
    assert len(summary) == 0
    assert [p.name for p in output.iterdir()] == [".dask_clip-output.json"]  # the manifest alone


def test_only_failed_downloads_kept_gives_a_valid_empty_tar(client, shards: Path, tmp_path: Path) -> None:
    failed = set(
        ImageTextPairDataset.from_webdataset(str(shards)).metadata.compute().query("status != 'success'")["key"]
    )
    dataset = with_keep_column(ImageTextPairDataset.from_webdataset(str(shards)), lambda key: key in failed)
    output = tmp_path / "failed-only"
    summary = dataset.to_webdataset(str(output), filter_column="keep", old_id_col="old_key")
    assert summary[["stem", "rows", "samples"]].values.tolist() == [["00000", 3, 0]]
    with tarfile.open(output / "00000.tar") as archive:
        assert archive.getmembers() == []
    frame = ImageTextPairDataset.from_webdataset(str(output)).metadata.compute()
    assert set(frame["old_key"]) == failed


def test_argument_errors_name_the_problem(shards: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    with pytest.raises(ValueError, match="no filter column 'keep'"):
        dataset.to_webdataset(str(tmp_path / "a"), filter_column="keep")
    with pytest.raises(ColumnError, match=r"filter column 'url' is .*not boolean"):
        dataset.to_webdataset(str(tmp_path / "a"), filter_column="url")
    with pytest.raises(ValueError, match="'caption' is already a column"):
        dataset.to_webdataset(str(tmp_path / "a"), old_id_col="caption")
    with pytest.raises(UsageError, match="shards: holds the dataset"):
        dataset.to_webdataset(str(shards.parent / "shards"), overwrite=True)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("someone's")
    with pytest.raises(
        UsageError, match=r"used: is not empty: it holds 1 entry \(1 file\), e\.g\. notes\.txt; nothing shows"
    ):
        dataset.to_webdataset(str(tmp_path / "used"))
    with pytest.raises(ValueError, match=r"need 18 shards of 1, more than max_shards=1 digits can name"):
        dataset.to_webdataset(str(tmp_path / "b"), samples_per_shard=1, max_shards=1)
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "used"]  # no half-made folder left behind


def test_output_shards_span_input_shards_by_prefix_counts() -> None:
    from dask_clip.dataset.reshard import Segment, plan_output_shards

    assert plan_output_shards([0, 5, 3, 0, 4], 4) == [
        [Segment(1, 0, 4)],
        [Segment(1, 4, 5), Segment(2, 0, 3)],
        [Segment(4, 0, 4)],
    ]
    assert plan_output_shards([0, 0], 4) == []


def test_an_unreadable_tar_is_named_and_leaves_no_staging(client, shards: Path, tmp_path: Path) -> None:
    from dask_clip.errors import ShardReadError

    (shards / "00001.tar").write_bytes(b"not a tar at all" * 100)
    output = tmp_path / "out"
    with pytest.raises(ShardReadError, match=r"00001\.tar"):
        ImageTextPairDataset.from_webdataset(str(shards)).to_webdataset(str(output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no output, staging or half-made folder
