"""Shards and outputs on object storage: a real S3-protocol server (moto) on loopback, read with s3fs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

BUCKET = "datasets"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def point_fsspec_at(endpoint: str) -> tuple[dict[str, str], dict[str, dict]]:
    """Point this process's s3fs at the server on ``endpoint``, through fsspec's environment variables and its
    config; returns what to restore."""
    import fsspec.config

    saved = dict(os.environ), {k: dict(v) for k, v in fsspec.config.conf.items()}
    os.environ.update(
        {
            "FSSPEC_S3_ENDPOINT_URL": endpoint,
            "FSSPEC_S3_KEY": "testing",
            "FSSPEC_S3_SECRET": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    fsspec.config.conf.setdefault("s3", {}).update(endpoint_url=endpoint, key="testing", secret="testing")
    return saved


def restore_fsspec(saved: tuple[dict[str, str], dict[str, dict]]) -> None:
    import fsspec.config

    environment, conf = saved
    os.environ.clear()
    os.environ.update(environment)
    fsspec.config.conf.clear()
    fsspec.config.conf.update(conf)


@pytest.fixture(scope="module")
def s3_endpoint(client):
    """A moto S3 server on 127.0.0.1, configured for s3fs through fsspec's settings here and on the session's
    workers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    saved, saved_on_workers = point_fsspec_at(endpoint), client.run(point_fsspec_at, endpoint)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "moto server did not start"
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        server.terminate()
        server.wait(timeout=30)
        restore_fsspec(saved)
        for worker, state in saved_on_workers.items():
            client.run(restore_fsspec, state, workers=[worker])


@pytest.mark.slow
def test_embed_shards_on_s3_and_write_parquet_back(s3_endpoint: str, pristine_shards: Path, tiny_model: Path) -> None:
    import pyarrow.parquet as pq
    import s3fs

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset

    s3 = s3fs.S3FileSystem()
    s3.mkdir(BUCKET)
    for path in pristine_shards.iterdir():
        s3.put(str(path), f"{BUCKET}/shards/{path.name}")

    dataset = ImageTextPairDataset.from_webdataset(f"s3://{BUCKET}/shards")
    assert dataset.tar_files[0] == f"s3://{BUCKET}/shards/00000.tar"
    summary = ClipImageEmbedder(str(tiny_model), autocast=False)(dataset).save_metadata(f"s3://{BUCKET}/embeddings")
    assert summary["rows"].sum() == 18 and summary["errors"].sum() == 3

    s3.invalidate_cache()
    assert sorted(s3.ls(f"{BUCKET}/embeddings", detail=False)) == [
        f"{BUCKET}/embeddings/{s}.parquet" for s in ("00000", "00001", "00003")
    ]
    with s3.open(f"{BUCKET}/embeddings/00001.parquet", "rb") as file:
        table = pq.read_table(file)
    assert table.num_rows == 6 and "image_embedding" in table.column_names
    back = ImageTextPairDataset.from_webdataset(f"s3://{BUCKET}/shards")  # inputs are untouched
    assert "image_embedding" not in back.metadata.columns


@pytest.mark.slow
def test_locks_and_the_overwrite_rule_on_object_storage(s3_endpoint: str, tmp_path: Path) -> None:
    import numpy as np
    import s3fs

    from dask_clip import FolderLockedError, ImageTextPairDataset, UsageError, testing
    from dask_clip.io.locks import writer_lock

    s3 = s3fs.S3FileSystem()
    s3.mkdir("outputs")
    vectors = {f"k{i}": np.random.default_rng(i).standard_normal(8).astype(np.float32) for i in range(6)}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=3)
    for path in (tmp_path / "shards").iterdir():
        s3.put(str(path), f"outputs/shards/{path.name}")
    before = sorted(s3.ls("outputs/shards", detail=False))

    lock = "s3://outputs/shards/.dask_clip.lock"
    refused = pytest.raises(FolderLockedError, match=f"{lock}: another run writes into this folder: pid {os.getpid()}")
    with writer_lock(lock, "save_metadata"), refused, writer_lock(lock, "save_metadata"):  # read back, compared
        pass
    s3.invalidate_cache()
    assert not s3.exists(lock)

    dataset = ImageTextPairDataset.from_webdataset("s3://outputs/shards")
    for output in ("s3://outputs/shards", "s3://outputs/shards/", "s3://outputs/x/../shards", "s3://outputs"):
        with pytest.raises(UsageError, match="holds the dataset s3://outputs/shards"):
            dataset.export_clip_retrieval(output, overwrite=True)
    dataset.export_clip_retrieval("s3://outputs/export")
    dataset.export_clip_retrieval("s3://outputs/export", overwrite=True)
    s3.invalidate_cache()
    assert sorted(s3.ls("outputs/shards", detail=False)) == before
    assert sorted(s3.ls("outputs", detail=False)) == ["outputs/export", "outputs/shards"]  # no scratch, no lock
    assert s3.exists("outputs/export/.dask_clip-output.json") and len(s3.ls("outputs/export/img_emb")) == 2


@pytest.mark.slow
def test_images_located_on_s3_are_read_with_one_ranged_read(s3_endpoint: str, pristine_shards: Path) -> None:
    import hashlib

    import s3fs

    from dask_clip import ImageTextPairDataset, LocateImages
    from dask_clip.io.image_access import read_member, recorded_tar_identity

    s3 = s3fs.S3FileSystem()
    s3.mkdir("located")
    for path in pristine_shards.iterdir():
        s3.put(str(path), f"located/shards/{path.name}")
    LocateImages()(ImageTextPairDataset.from_webdataset("s3://located/shards")).save_metadata()
    s3.invalidate_cache()
    frame = ImageTextPairDataset.from_webdataset("s3://located/shards").metadata.compute()
    row = frame[frame["image_offset"].notna()].iloc[-1]
    shard = f"s3://located/shards/{row['key'][:5]}"
    identity = recorded_tar_identity(f"{shard}.parquet")
    assert identity is not None and "etag" in identity
    data = read_member(f"{shard}.tar", row["image_offset"], row["image_size"], key=row["key"], tar_identity=identity)
    assert hashlib.sha256(data).hexdigest() == row["sha256"]


@pytest.mark.slow
def test_an_index_on_object_storage_keeps_its_lists_in_index_faiss(s3_endpoint: str, tmp_path: Path) -> None:
    """Lists cannot be memory-mapped from an object store: they are merged into index.faiss, read into memory."""
    import numpy as np
    import s3fs

    from dask_clip import ImageTextPairDataset, ann, testing

    s3 = s3fs.S3FileSystem()
    s3.mkdir("indexes")
    rng = np.random.default_rng(0)
    vectors = {f"k{i:04d}": rng.standard_normal(8).astype(np.float32) for i in range(600)}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=200)
    for path in (tmp_path / "shards").iterdir():
        s3.put(str(path), f"indexes/shards/{path.name}")
    dataset = ImageTextPairDataset.from_webdataset("s3://indexes/shards")
    dataset.build_index("s3://indexes/index", index_key="IVF4,Flat")
    s3.invalidate_cache()
    names = sorted(path.rsplit("/", 1)[1] for path in s3.ls("indexes/index", detail=False))
    assert names == [".dask_clip-output.json", "ids.arrow", "index.faiss", "index.json"]
    opened = dataset.open_index("s3://indexes/index")
    assert opened.manifest["index"]["lists"] == "in_memory" and not ann.lists_on_disk(opened.index)
    query = rng.standard_normal(8).astype(np.float32)
    exact = dataset.search(image=query, k=5)["key"].tolist()
    assert dataset.search(image=query, k=5, index=opened, nprobe=4)["key"].tolist() == exact
