"""The review app's scores page shows each decision made on a score: a top fraction's threshold marked on the
histogram with the rows each side of it, and an image-based filter's rows each side of its boundary."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dask_clip import ImageTextPairDataset, embeddings_to_numpy, keep_near_target, keep_top_fraction
from dask_clip.serve import create_app

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient


def test_the_scores_page_shows_the_rows_each_side_of_each_decision(deduplicated: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(deduplicated, tmp_path / "shards"))
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    vectors = embeddings_to_numpy(dataset.metadata["image_embedding"].compute())
    np.save(tmp_path / "target.npy", vectors[~np.isnan(vectors).any(axis=1)][:2])
    near = keep_near_target(keep_top_fraction(dataset, "similarity", 0.5), tmp_path / "target.npy", k=2, threshold=0.99)
    near.save_metadata()
    with TestClient(create_app(str(folder)), base_url="http://127.0.0.1") as app:
        columns = {c["column"]: c for c in app.get("/api/scores", params={"per_side": 2}).json()["columns"]}
        (top,) = columns["similarity"]["decisions"]
        assert top["column"] == "keep_top_fraction" and top["largest"] and top["threshold"] is not None
        assert 1 <= len(top["kept"]) <= 2 and 1 <= len(top["dropped"]) <= 2
        assert [r["score"] for r in top["kept"]] == sorted((r["score"] for r in top["kept"]), reverse=True)
        assert top["kept"][-1]["score"] == top["threshold"] >= top["dropped"][0]["score"]
        (target,) = columns["target_similarity"]["decisions"]
        assert target["column"] == "near_target" and target["threshold"] == 0.99
        assert [r["score"] >= 0.99 for r in target["kept"] + target["dropped"]] == [True] * 2 + [False] * 2
        assert all(r["thumbnail"].startswith("/thumb/") for r in target["kept"] + target["dropped"])
        page = app.get("/scores", params={"per_side": 2}).text
        assert page.count('<line class="threshold"') == 2 and page.count('<section class="decision"') == 2
        assert "keep_top_fraction: top 0.5 by similarity" in page and top["dropped"][0]["thumbnail"] in page
