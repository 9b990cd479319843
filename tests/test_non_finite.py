"""A vector holding NaN or an infinity is no embedding, wherever it comes from: an embedder records a reason,
and search, export and deduplication treat it as missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, SemanticDeduplicator, testing
from dask_clip.embedders.base import NON_FINITE_REASON


def test_an_embedder_whose_model_returns_nan_gives_each_row_a_reason(
    shards: Path, tiny_model: Path, tmp_path: Path
) -> None:
    import shutil

    model = Path(shutil.copytree(tiny_model, tmp_path / "nan-model"))
    weights = load_file(model / "model.safetensors")
    weights["visual_projection.weight"] = torch.full_like(weights["visual_projection.weight"], float("nan"))
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    frame = ClipImageEmbedder(str(model), autocast=False)(dataset).metadata.compute(scheduler="threads")
    assert frame["image_embedding"].isna().all()
    with_image = frame["status"] == "success"
    assert (frame.loc[with_image, "embedding_error"] == NON_FINITE_REASON).all()


@pytest.fixture
def with_nan(tmp_path: Path) -> ImageTextPairDataset:
    vectors = {
        "a": np.array([1.0, 0, 0, 0]),
        "nan": np.array([np.nan, 1, 0, 0]),
        "inf": np.array([np.inf, 0, 0, 0]),
        "b": np.array([0.9, 0.1, 0, 0]),
    }
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=2)
    return ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))


def test_search_never_returns_a_non_finite_vector(with_nan: ImageTextPairDataset) -> None:
    hits = with_nan.search(image=np.array([1.0, 0, 0, 0], dtype=np.float32), k=10)
    assert sorted(hits["key"]) == ["a", "b"]
    assert np.isfinite(hits["score"]).all()


def test_export_leaves_non_finite_vectors_out_and_counts_them(with_nan: ImageTextPairDataset, tmp_path: Path) -> None:
    summary = with_nan.export_clip_retrieval(str(tmp_path / "export"))
    assert summary["rows"].tolist() == [1, 1] and summary["not_finite"].tolist() == [1, 1]
    for path in summary["embeddings_path"]:
        assert np.isfinite(np.load(path)).all()
    kept = pd.concat(pd.read_parquet(path) for path in summary["metadata_path"])
    assert sorted(kept["key"]) == ["a", "b"]


def test_dedup_keeps_non_finite_rows_and_never_names_them(with_nan: ImageTextPairDataset) -> None:
    frame = SemanticDeduplicator(n_clusters=1, eps=0.1)(with_nan).metadata.compute()
    decisions = frame.set_index("key")
    assert decisions.loc[["nan", "inf"], "keep"].tolist() == [True, True]
    assert decisions.loc[["nan", "inf"], "duplicate_of"].isna().all()
    assert not decisions["duplicate_of"].isin(["nan", "inf"]).any()
