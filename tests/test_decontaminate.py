"""decontaminate: training rows that copy an evaluation photo (re-encoded, resized) are flagged, naming it, and
distinct photos are not, at a threshold measured for the tests' random-weight model
(benchmarks/decontamination_scores.py); the index agrees with exact search; the evaluation set may be images,
a dataset or an embeddings file, and bad ones are refused naming the file."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ClipImageEmbedder, Decontaminator, ImageTextPairDataset, decontaminate, testing
from dask_clip.columns import embeddings_to_numpy
from dask_clip.dataset.consistency import rerun_command
from dask_clip.dataset.report import write_report
from dask_clip.errors import ImageDecodeError, UsageError
from dask_clip.images.thumbnails import ThumbnailCache
from dask_clip.ops.evaluation_set import check_same_model

THRESHOLD = 0.998
"""Measured with the tiny random CLIP (seed 0): re-encoded and resized copies score >= 0.9994, distinct photos
<= 0.9965 (benchmarks/decontamination_scores.py)."""
COLUMNS = ["decontaminated", "contamination_match", "contamination_similarity"]


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, client) -> tuple[Path, pd.DataFrame]:
    """The evaluation folder and embedded training shards of ``testing.make_contamination_case`` (no crops: 108
    re-encoded or resized copies of 9 evaluation photos, 96 rows of 8 other photos), and what each row is."""
    folder = tmp_path_factory.mktemp("contamination")
    rows = pd.DataFrame(testing.make_contamination_case(folder, crops=()))
    embedder = ClipImageEmbedder(str(tiny_model), autocast=False)
    embedder(ImageTextPairDataset.from_webdataset(str(folder / "shards"))).save_metadata()
    return folder, rows


def decisions(dataset: ImageTextPairDataset) -> pd.DataFrame:
    frame = dataset.metadata.compute().set_index("key")
    return frame[COLUMNS].assign(decontaminated=frame["decontaminated"].astype(bool))


def test_copies_are_flagged_with_their_photo_and_distinct_photos_are_not(planted) -> None:
    folder, rows = planted
    dataset = ImageTextPairDataset.from_webdataset(str(folder / "shards"))
    result = decontaminate(dataset, against=folder / "eval", threshold=THRESHOLD)
    found = rows.join(decisions(result), on="key")
    copies, distinct = found[found["copy"]], found[~found["copy"]]
    assert len(copies) >= 100 and len(distinct) >= 90
    recall = (~copies["decontaminated"]).mean()
    assert recall >= 0.99, copies[copies["decontaminated"]]
    flagged = copies[~copies["decontaminated"]]
    assert (flagged["contamination_match"] == flagged["photo"] + ".jpg").all()
    assert (flagged["contamination_similarity"].astype(float) >= THRESHOLD).all()
    assert distinct["decontaminated"].all(), distinct[~distinct["decontaminated"]]
    assert distinct["contamination_match"].isna().all() and distinct["contamination_similarity"].isna().all()
    assert str(result.meta["contamination_similarity"].dtype) == "float[pyarrow]"

    recorded = result.operation_config("decontaminated")
    assert recorded["function"] == "decontaminate" and recorded["threshold"] == THRESHOLD
    assert recorded["against"]["kind"] == "images" and recorded["against"]["items"] == 9
    assert recorded["model"]["model_dir"] == dataset.operation_config("image_embedding")["model_dir"]
    assert recorded["search"] == "exact"
    assert rerun_command(recorded, "shards") == (
        f"dask-clip decontaminate shards --against {os.path.realpath(folder / 'eval')} --threshold {THRESHOLD} "
        "--embedding-column image_embedding"
    )
    (folder / "eval" / "extra.jpg").write_bytes((folder / "eval" / "moon.jpg").read_bytes())
    try:  # another evaluation set: another recorded identity
        again = Decontaminator(folder / "eval", threshold=THRESHOLD).fitted(dataset)
    finally:
        (folder / "eval" / "extra.jpg").unlink()
    assert again.config()["against"]["digest"] != recorded["against"]["digest"]


def test_index_and_exact_search_agree(planted, tmp_path: Path) -> None:
    folder, _ = planted
    dataset = ImageTextPairDataset.from_webdataset(str(folder / "shards"))
    dataset.build_index(str(tmp_path / "index"), index_key="Flat")  # written in its own folder only
    exact = decisions(decontaminate(dataset, folder / "eval", threshold=THRESHOLD))
    through_index = decontaminate(dataset, folder / "eval", threshold=THRESHOLD, index=str(tmp_path / "index"))
    indexed = decisions(through_index)
    assert (~exact["decontaminated"]).sum() > 0
    pd.testing.assert_series_equal(indexed["decontaminated"], exact["decontaminated"])
    pd.testing.assert_series_equal(indexed["contamination_match"], exact["contamination_match"])
    np.testing.assert_allclose(
        indexed["contamination_similarity"].astype(float), exact["contamination_similarity"].astype(float), atol=1e-5
    )
    assert through_index.operation_config("decontaminated")["search"]["key"] == "IDMap,Flat"


def test_evaluation_embeddings_file_and_dataset(planted, tmp_path: Path) -> None:
    folder, _ = planted
    dataset = ImageTextPairDataset.from_webdataset(str(folder / "shards"))
    frame = dataset.metadata.compute()
    chosen = frame.iloc[[3, 40, 100]]
    vectors = embeddings_to_numpy(chosen["image_embedding"])
    np.save(tmp_path / "eval.npy", vectors)
    (tmp_path / "eval.txt").write_text("\n".join(f"item-{key}" for key in chosen["key"]) + "\n")
    pq.write_table(
        pa.table({"name": [f"item-{key}" for key in chosen["key"]], "embedding": vectors.tolist()}),
        tmp_path / "eval.parquet",
    )
    for against in (tmp_path / "eval.npy", tmp_path / "eval.parquet"):
        found = decisions(decontaminate(dataset, against, threshold=0.99999))
        for key in chosen["key"]:
            assert not found.loc[key, "decontaminated"] and found.loc[key, "contamination_match"] == f"item-{key}"
    itself = decontaminate(dataset, dataset, threshold=0.99999)
    found = decisions(itself)
    assert (~found["decontaminated"]).all()  # each row copies itself, at least
    assert itself.operation_config("decontaminated")["against"]["kind"] == "dataset"
    assert found["contamination_match"].str.contains("/").all()  # <stem>/<id>


def test_bad_evaluation_sets_are_refused_naming_the_file(planted, tmp_path: Path) -> None:
    folder, _ = planted
    dataset = ImageTextPairDataset.from_webdataset(str(folder / "shards"))
    images = Path(shutil.copytree(folder / "eval", tmp_path / "eval"))
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        decontaminate(dataset, images, threshold=THRESHOLD)
    (images / "notes.csv").write_text("a,b")
    with pytest.raises(UsageError, match=r"notes\.csv"):
        decontaminate(dataset, images, threshold=THRESHOLD)
    np.save(tmp_path / "wide.npy", np.ones((2, 7), np.float32))
    (tmp_path / "wide.txt").write_text("a\nb\n")
    with pytest.raises(UsageError, match=r"wide\.npy: holds 7-d vectors"):
        decontaminate(dataset, tmp_path / "wide.npy", threshold=THRESHOLD)
    np.save(tmp_path / "unnamed.npy", np.ones((2, 32), np.float32))
    with pytest.raises(UsageError, match=r"unnamed\.txt"):
        decontaminate(dataset, tmp_path / "unnamed.npy", threshold=THRESHOLD)
    with pytest.raises(UsageError, match="threshold"):
        Decontaminator(images, threshold=1.5)


def test_an_evaluation_dataset_of_another_model_is_refused() -> None:
    recorded = {"model_dir": "/m/a", "family": "CLIP", "embedding_dim": 32, "model_version": {"files": {"w": 1}}}
    check_same_model("image_embedding", recorded, "eval", dict(recorded, model_version={"files": {"w": 1, "t": 2}}))
    for other in ({"model_dir": "/m/b"}, {"model_version": {"files": {"w": 2}}}, {"embedding_dim": 64}):
        with pytest.raises(UsageError, match=r"'emb' of /data/eval was embedded by another model.*'/m/a'"):
            check_same_model("image_embedding", recorded, "'emb' of /data/eval", {**recorded, **other})
    with pytest.raises(UsageError, match="no model recorded"):
        check_same_model("image_embedding", recorded, "'emb' of /data/eval", {})


def test_cli_end_to_end_then_the_matches_are_shown_beside_their_evaluation_image(planted, cli, tmp_path: Path) -> None:
    folder, rows = planted
    shards = Path(shutil.copytree(folder / "shards", tmp_path / "shards"))
    result = cli("decontaminate", str(shards), "--against", str(folder / "eval"), "--threshold", str(THRESHOLD))
    assert result.returncode == 0, result.stderr
    saved = decisions(ImageTextPairDataset.from_webdataset(str(shards)))
    flagged = int((~saved["decontaminated"]).sum())
    assert flagged >= 0.99 * int(rows["copy"].sum())
    assert f"{flagged} flagged (decontaminated=False)" in result.stdout and "9 evaluation items" in result.stdout

    dataset = ImageTextPairDataset.from_webdataset(str(shards))
    pairs = dataset.contamination_matches(n=3, cache=ThumbnailCache(tmp_path / "thumbnails"))
    assert len(pairs) == 3 and pairs.total == flagged
    lowest = saved["contamination_similarity"].astype(float).nsmallest(3).to_numpy()
    np.testing.assert_allclose([frame["similarity"].iloc[0] for frame in pairs], lowest)
    for frame, grid in zip(pairs, pairs.grids, strict=True):
        assert list(frame["role"]) == ["training", "evaluation"]
        assert [tile.jpeg is not None for tile in grid.tiles] == [True, True], grid
        assert grid.tiles[1].lines == ("evaluation", frame["name"].iloc[0])
    write_report(dataset, tmp_path / "report.html", cache=ThumbnailCache(tmp_path / "thumbnails"))
    page = (tmp_path / "report.html").read_text()
    assert f"20 of {flagged} contamination matches" in page and page.count(" matches ") >= 20

    wrong = cli("decontaminate", str(shards), "--against", str(tmp_path / "missing"), "--threshold", "0.9")
    assert wrong.returncode == 2 and "missing: no such file or folder" in wrong.stderr
