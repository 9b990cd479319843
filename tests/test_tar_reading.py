"""Every operation that reads tars reads them by one rule: the same keys for the same rows, the same refusals,
members moved byte for byte, and bounded memory per sample. Each case runs the embedder, exact dedup and
reshard on the same shard."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, ExactDeduplicator, ImageTextPairDataset, ShardReadError, testing
from dask_clip.io.tar_samples import iter_tar_samples

PHOTO = testing.encode_jpeg(next(iter(testing.sample_photos(("astronaut",)).values())))


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))


def write_parquet(path: Path, ids: list, id_type: pa.DataType = pa.string()) -> None:
    table = pa.table({"key": pa.array(ids, type=id_type), "caption": [f"row {i}" for i in range(len(ids))]})
    pq.write_table(table, path)


def run_all_three(folder: Path, tiny_model: Path, tmp_path: Path) -> dict[str, object]:
    """What the embedder, exact dedup (hashing the tar) and reshard make of the shard."""
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    embedded = ClipImageEmbedder(str(tiny_model), autocast=False)(dataset).metadata.compute(scheduler="threads")
    hashed = ExactDeduplicator()(dataset).metadata.compute(scheduler="threads")
    summary = dataset.to_webdataset(str(tmp_path / "resharded"))
    return {"embedded": embedded, "hashed": hashed, "summary": summary}


def test_an_integer_id_column_matches_zero_padded_keys(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "00000.parquet", [1, 2], pa.int64())
    write_tar(folder / "00000.tar", [("0001.jpg", PHOTO), ("0001.txt", b"a"), ("0002.jpg", PHOTO[:-10] + b"xx")])
    results = run_all_three(folder, tiny_model, tmp_path)
    assert results["embedded"]["image_embedding"].notna().tolist() == [True, False]
    assert results["hashed"]["sha256"].notna().tolist() == [True, True]
    assert results["summary"]["samples"].tolist() == [2]


def test_ids_and_keys_that_differ_only_in_unicode_normalisation_match(tiny_model: Path, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    composed = unicodedata.normalize("NFC", "café")
    decomposed = unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    write_parquet(folder / "00000.parquet", [composed])
    write_tar(folder / "00000.tar", [(f"{decomposed}.jpg", PHOTO)])
    results = run_all_three(folder, tiny_model, tmp_path)
    assert results["embedded"]["image_embedding"].notna().all()
    assert results["hashed"]["sha256"].notna().all()
    assert results["summary"]["samples"].tolist() == [1]


def assert_every_operation_refuses(members: list[tuple[str, bytes]], expected: str, tiny_model: Path, tmp_path: Path):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "00000.parquet", ["a"])
    write_tar(folder / "00000.tar", members)
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    with pytest.raises(ShardReadError, match=expected):
        ClipImageEmbedder(str(tiny_model))(dataset).metadata.compute(scheduler="threads")
    with pytest.raises(ShardReadError, match=expected):
        ExactDeduplicator()(dataset).metadata.compute(scheduler="threads")
    with pytest.raises(ShardReadError, match=expected):
        dataset.to_webdataset(str(tmp_path / "out"))


def test_a_key_no_row_has_is_an_error_naming_the_tar_for_every_operation(tiny_model: Path, tmp_path: Path) -> None:
    expected = r"00000\.tar: 1 samples have keys that the shard's parquet lacks .*'stranger'"
    assert_every_operation_refuses([("a.jpg", PHOTO), ("stranger.jpg", PHOTO)], expected, tiny_model, tmp_path)


def test_a_member_twice_in_a_tar_is_refused_by_every_operation(tiny_model: Path, tmp_path: Path) -> None:
    expected = r"00000\.tar: member 'a\.jpg' appears twice in the tar"
    assert_every_operation_refuses([("a.jpg", PHOTO), ("a.jpg", PHOTO[:100])], expected, tiny_model, tmp_path)


def test_reshard_moves_members_byte_for_byte_and_passes_malformed_json_through(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write_parquet(folder / "00000.parquet", ["a", "b"])
    broken_json = b'{"key": "b", "caption": '
    members = [("a.JPG", PHOTO), ("a.json", b'{"key": "a"}'), ("b.Png", b"\x89PNG..."), ("b.json", broken_json)]
    write_tar(folder / "00000.tar", members)
    summary = ImageTextPairDataset.from_webdataset(str(folder)).to_webdataset(str(tmp_path / "out"))
    assert summary["unparsed_json"].tolist() == [1]
    with tarfile.open(tmp_path / "out" / "00000.tar") as archive:
        moved = {member.name: archive.extractfile(member).read() for member in archive.getmembers()}
    assert moved == {
        "000000000.JPG": PHOTO,
        "000000000.json": json.dumps({"key": "000000000"}).encode(),
        "000000001.Png": b"\x89PNG...",
        "000000001.json": broken_json,
    }


def test_members_no_operation_needs_are_skipped_unread(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(path, [("a.npy", os.urandom(1 << 20)), ("a.jpg", PHOTO)])
    (sample,) = iter_tar_samples(str(path), wanted=lambda extension: extension == "jpg")
    assert sample.members == {"jpg": PHOTO} and sample.unread == ["npy"]


def test_the_bytes_held_for_one_sample_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "00000.tar"
    write_tar(path, [(f"a.part{i}", b"x" * 1000) for i in range(300)] + [("a.jpg", PHOTO)])
    (sample,) = iter_tar_samples(str(path), max_sample_bytes=5000)
    assert sum(len(payload) for payload in sample.members.values()) <= 5000
    assert "max_sample_bytes" in sample.problems["jpg"]


def test_a_small_tar_of_sparse_members_does_not_expand_in_memory(tiny_model: Path, tmp_path: Path) -> None:
    """GNU tar stores a 600 MB file of zeros in a few KB; its members count at their expanded size."""
    work = tmp_path / "files"
    work.mkdir()
    (work / "a.jpg").write_bytes(PHOTO)
    for name in ("a.bin", "b.jpg"):
        with open(work / name, "wb") as file:
            file.truncate(600 * 2**20)
    folder = tmp_path / "shards"
    folder.mkdir()
    subprocess.run(
        ["tar", "--sparse", "-cf", str(folder / "00000.tar"), "a.jpg", "a.bin", "b.jpg"], cwd=work, check=True
    )
    assert (folder / "00000.tar").stat().st_size < 100_000
    write_parquet(folder / "00000.parquet", ["a", "b"])
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    frame = ClipImageEmbedder(str(tiny_model), autocast=False)(dataset).metadata.compute(scheduler="threads")
    assert frame["image_embedding"].notna().tolist() == [True, False]
    assert "max_sample_bytes" in frame["embedding_error"].iloc[1]
    with pytest.raises(ShardReadError, match=r"00000\.tar: sample 'a': its members hold more than"):
        dataset.to_webdataset(str(tmp_path / "out"))
