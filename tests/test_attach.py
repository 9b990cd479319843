"""Embeddings users already have, in clip-retrieval's layout (LAION's published embeddings, or an export):
attached to the shards' rows by id or by url, without embedding again."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from dask_clip import (
    ClipImageEmbedder,
    DataError,
    DatasetLayoutError,
    ImageTextPairDataset,
    SemanticDeduplicator,
    embeddings_to_numpy,
)


@pytest.fixture
def embedded(shards: Path, tiny_model: Path) -> Path:
    ClipImageEmbedder(str(tiny_model), autocast=False)(
        ImageTextPairDataset.from_webdataset(str(shards))
    ).save_metadata()
    return shards


def vectors_of(frame: pd.DataFrame, key: str = "key") -> dict[str, np.ndarray]:
    vectors = embeddings_to_numpy(frame["image_embedding"])
    return {k: v for k, v in zip(frame[key], vectors, strict=True) if not np.isnan(v).all()}


def test_an_export_attached_back_gives_the_same_vectors(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    bare = tmp_path / "bare"
    shutil.copytree(embedded, bare)
    for parquet in bare.glob("*.parquet"):  # the shards as img2dataset wrote them: no embeddings
        table = pq.read_table(parquet)
        pq.write_table(
            table.drop_columns(["image_embedding", "embedding_error"]).replace_schema_metadata(None), parquet
        )

    attached = ImageTextPairDataset.from_webdataset(str(bare)).attach_embeddings(str(exported))
    frame = attached.metadata.compute()
    original = ImageTextPairDataset.from_webdataset(str(embedded)).metadata.compute()
    expected = {k: v.astype(np.float16).astype(np.float32) for k, v in vectors_of(original).items()}  # export's float16
    got = vectors_of(frame)
    assert got.keys() == expected.keys()
    for key, vector in expected.items():
        np.testing.assert_array_equal(got[key], vector, err_msg=key)
    missing = frame[frame["image_embedding"].isna()]
    assert len(missing) == 3 and missing["embedding_error"].str.startswith("no vector for this row in").all()

    summary = attached.save_metadata()
    assert summary["written"].all()
    again = ImageTextPairDataset.from_webdataset(str(bare)).attach_embeddings(str(exported)).save_metadata()
    assert not again["written"].any(), "attached embeddings were not recognised as finished"
    result = SemanticDeduplicator(n_clusters=2)(ImageTextPairDataset.from_webdataset(str(bare))).metadata.compute()
    assert result["keep"].notna().all()  # curation runs on the attached embeddings


def test_vectors_attach_by_url_where_the_ids_differ(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    for metadata in (exported / "metadata").glob("*.parquet"):  # another dataset's ids for the same images
        table = pq.read_table(metadata).to_pandas()
        table["key"] = "laion-" + table["key"]
        table.to_parquet(metadata, index=False)
    frame = (
        ImageTextPairDataset.from_webdataset(str(embedded))
        .attach_embeddings(str(exported), on="url", embedding_column="laion_embedding", error_column="laion_error")
        .metadata.compute()
    )
    assert frame["laion_embedding"].notna().sum() == 15
    both = frame[frame["laion_embedding"].notna()]
    np.testing.assert_allclose(
        embeddings_to_numpy(both["laion_embedding"]), embeddings_to_numpy(both["image_embedding"]), atol=1e-3
    )


def test_a_key_with_two_vectors_and_a_broken_layout_are_named(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    shutil.copy(exported / "img_emb" / "img_emb_0.npy", exported / "img_emb" / "img_emb_3.npy")
    shutil.copy(exported / "metadata" / "metadata_0.parquet", exported / "metadata" / "metadata_3.parquet")
    dataset = ImageTextPairDataset.from_webdataset(str(embedded))
    with pytest.raises(DataError, match=r"has more than one vector \(.*metadata_0\.parquet row 0, .*metadata_3"):
        dataset.attach_embeddings(str(exported)).metadata.compute(scheduler="threads")
    (exported / "metadata" / "metadata_3.parquet").unlink()
    with pytest.raises(DatasetLayoutError, match=r"without their metadata, or the reverse: \['3'\]"):
        dataset.attach_embeddings(str(exported))


def test_the_attach_command_saves_next_to_the_shards(embedded: Path, tmp_path: Path) -> None:
    exported = tmp_path / "export"
    ImageTextPairDataset.from_webdataset(str(embedded)).export_clip_retrieval(str(exported))
    command = [sys.executable, "-m", "dask_clip.cli", "attach", str(embedded), str(exported), "--n-workers", "1"]
    command += ["--embedding-column", "attached"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "attached 15 vectors to 18 rows of 3 shards" in result.stdout
    assert "attached" in pq.read_schema(embedded / "00001.parquet").names
