"""Shards written by img2dataset itself (offline, from file:// URLs) embed without any conversion."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, LocateImages, embeddings_to_numpy, testing

img2dataset = pytest.importorskip("img2dataset")


@pytest.fixture(scope="module")
def img2dataset_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("img2dataset")
    rows = []
    for name, pixels in testing.sample_photos().items():
        Image.fromarray(pixels).save(root / f"{name}.png")
        rows.append({"url": f"file://{root}/{name}.png", "caption": f"a photo of {name}", "source": "skimage"})
    rows.append({"url": f"file://{root}/missing.png", "caption": "a missing photo", "source": "nowhere"})
    pd.DataFrame(rows).to_parquet(root / "urls.parquet")
    img2dataset.download(
        url_list=str(root / "urls.parquet"),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["source"],
        output_folder=str(root / "shards"),
        output_format="webdataset",
        processes_count=1,
        thread_count=2,
        number_sample_per_shard=6,
        image_size=256,
        resize_mode="keep_ratio",
        distributor="multiprocessing",
        enable_wandb=False,
    )
    return root / "shards"


@pytest.mark.slow
def test_embeds_img2dataset_output(client, img2dataset_shards: Path, tiny_model: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(img2dataset_shards))
    assert dataset.metadata.npartitions == 3
    ClipImageEmbedder(str(tiny_model), autocast=False)(dataset).save_metadata()
    frame = ImageTextPairDataset.from_webdataset(str(img2dataset_shards)).metadata.compute()
    assert len(frame) == 17 and set(frame["source"]) == {"skimage", "nowhere"}
    ok = frame["status"] == "success"
    assert ok.sum() == 16
    assert frame.loc[ok, "embedding_error"].isna().all()
    assert not pd.isna(embeddings_to_numpy(frame.loc[ok, "image_embedding"])).any()
    assert frame.loc[~ok, "embedding_error"].str.contains("failed_to_download").all()


def test_img2dataset_tars_are_located(img2dataset_shards: Path) -> None:
    """img2dataset's ``sha256`` hashes the image as downloaded, before its resize: the members are compared instead."""
    frame = LocateImages()(ImageTextPairDataset.from_webdataset(str(img2dataset_shards))).metadata.compute()
    ok = frame["status"] == "success"
    assert frame.loc[~ok, "image_offset"].isna().all() and frame.loc[ok, "image_offset"].notna().all()
    for row in frame[ok].itertuples():
        with tarfile.open(img2dataset_shards / f"{row.key[:5]}.tar") as archive:
            member = archive.extractfile(f"{row.key}.jpg").read()
            archive.fileobj.seek(row.image_offset)
            assert archive.fileobj.read(row.image_size) == member, row.key
