"""ExactDeduplicator: identical image bytes across shards keep the smallest id, on a 2-worker cluster."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dask_clip import ExactDeduplicator, ImageTextPairDataset, testing

# Which photo each sample holds, by shard; "name*" is the same photo re-encoded (other bytes), None a failed download.
LAYOUT = {
    0: ["astronaut", "coffee", "rocket", "camera"],
    1: ["chelsea", "astronaut", "coffee", None],
    2: ["astronaut", "astronaut*", "coins", "coffee"],
    3: [None, "camera", "moon", "moon"],
}
# removed key -> the key it duplicates (the smallest key of its group)
EXPECTED_DUPLICATES = {
    "000010001": "000000000",
    "000020000": "000000000",  # astronaut in three shards
    "000010002": "000000001",
    "000020003": "000000001",  # coffee
    "000030001": "000000003",  # camera
    "000030003": "000030002",  # moon twice in one shard
}


@pytest.fixture(scope="module")
def duplicated_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four shards of real photos where some images are byte-identical copies of others."""
    folder = tmp_path_factory.mktemp("duplicated")
    photos = testing.sample_photos(["astronaut", "coffee", "rocket", "camera", "chelsea", "coins", "moon"])
    encoded = {name: testing.encode_jpeg(pixels) for name, pixels in photos.items()}
    encoded["astronaut*"] = testing.encode_jpeg(photos["astronaut"], quality=80)
    for shard, names in LAYOUT.items():
        rows, members = [], {}
        for index, name in enumerate(names):
            key = testing.img2dataset_key(shard, index)
            if name is None:
                rows.append({"url": f"file:///missing/{key}.jpg", "key": key, "status": "failed_to_download"})
                continue
            jpeg = encoded[name]
            rows.append(
                {
                    "url": f"file:///{name}/{key}.jpg",
                    "caption": name,
                    "key": key,
                    "status": "success",
                    "sha256": hashlib.sha256(jpeg).hexdigest(),
                }
            )
            members[key] = {"jpg": jpeg, "txt": name.encode(), "json": json.dumps({"key": key}).encode()}
        testing.write_shard(folder, shard, rows, members, tar_order=list(reversed(members)))
    return folder


def check_flags(dataset: ImageTextPairDataset) -> None:
    assert dataset.metadata.npartitions == 4
    frames = [dataset.metadata.get_partition(i).compute() for i in range(4)]
    for shard, frame in enumerate(frames):  # one partition per shard, rows in their order
        assert frame["key"].tolist() == [testing.img2dataset_key(shard, i) for i in range(4)]
    frame = dataset.metadata.compute()
    removed = frame[~frame["keep"]]
    assert dict(zip(removed["key"], removed["duplicate_of"], strict=True)) == EXPECTED_DUPLICATES
    assert dict(zip(removed["key"], removed["duplicate_of_shard"], strict=True)) == {
        key: kept[:5]
        for key, kept in EXPECTED_DUPLICATES.items()  # the kept row's shard (its key starts with it)
    }
    assert (removed["similarity"] == 1.0).all()
    kept = frame[frame["keep"]]
    assert kept["duplicate_of"].isna().all() and kept["similarity"].isna().all()
    assert kept["duplicate_of_shard"].isna().all() and str(frame["duplicate_of_shard"].dtype) == "string[pyarrow]"
    assert set(kept["key"]) >= {"000010003", "000030000", "000020001"}  # failed downloads, re-encoded copy
    assert str(frame["keep"].dtype) == "bool[pyarrow]"
    assert str(frame["similarity"].dtype) == "double[pyarrow]"


def test_duplicates_found_across_shards_from_the_sha256_column(client, duplicated_shards: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(duplicated_shards))
    deduplicated = ExactDeduplicator()(dataset)
    check_flags(deduplicated)
    assert set(deduplicated.provenance) == {"keep", "duplicate_of", "duplicate_of_shard", "similarity"}


def test_hash_computed_from_the_tars_when_the_column_is_missing(
    client, duplicated_shards: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "no-hash"
    folder.mkdir()
    for path in duplicated_shards.iterdir():
        if path.suffix == ".parquet":
            pq.write_table(pq.read_table(path).drop_columns(["sha256"]), folder / path.name)
        else:
            (folder / path.name).write_bytes(path.read_bytes())
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    deduplicated = ExactDeduplicator(hash_column="image_sha256")(dataset)
    check_flags(deduplicated)
    frame = deduplicated.metadata.compute()
    expected = ImageTextPairDataset.from_webdataset(str(duplicated_shards)).metadata.compute()["sha256"]
    assert frame["image_sha256"].tolist() == expected.tolist()  # img2dataset's hash, nulls for failed downloads


def test_dedup_then_reshard_keeps_each_image_once(client, duplicated_shards: Path, tmp_path: Path) -> None:
    dataset = ExactDeduplicator()(ImageTextPairDataset.from_webdataset(str(duplicated_shards)))
    dataset.to_webdataset(str(tmp_path / "unique"), filter_column="keep", samples_per_shard=5, old_id_col="old_key")
    frame = ImageTextPairDataset.from_webdataset(str(tmp_path / "unique")).metadata.compute()
    assert len(frame) == 16 - len(EXPECTED_DUPLICATES)
    assert not set(frame["old_key"]) & set(EXPECTED_DUPLICATES)
    hashes = frame["sha256"].dropna()
    assert hashes.is_unique and len(hashes) == 8


def test_a_second_run_replaces_the_flags(client, duplicated_shards: Path) -> None:
    once = ExactDeduplicator()(ImageTextPairDataset.from_webdataset(str(duplicated_shards)))
    twice = ExactDeduplicator()(once)
    assert list(twice.metadata.columns) == list(once.metadata.columns)
    check_flags(twice)


def test_ids_repeated_across_shards_keep_one_copy_and_name_its_shard(
    client, duplicated_shards: Path, tmp_path: Path
) -> None:
    """Shard 00007 is a byte copy of 00000 (same ids, same images): its rows name the same id in shard 00000."""
    folder = tmp_path / "repeated"
    folder.mkdir()
    for stem in ("00000", "00007"):
        for suffix in (".tar", ".parquet"):
            (folder / f"{stem}{suffix}").write_bytes((duplicated_shards / f"00000{suffix}").read_bytes())
    frame = ExactDeduplicator()(ImageTextPairDataset.from_webdataset(str(folder))).metadata.compute()
    first, copy = frame.iloc[:4], frame.iloc[4:]
    assert first["keep"].all() and first["duplicate_of_shard"].isna().all()
    assert not copy["keep"].any()
    assert copy["duplicate_of"].tolist() == copy["key"].tolist()
    assert copy["duplicate_of_shard"].tolist() == ["00000"] * 4
