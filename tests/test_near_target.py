"""Image-based filtering (DataComp): rows near planted target clusters are near, the others not, in both modes;
the same given the seed; the target's identity, k, seed and threshold recorded; bad target input refused naming the
file; a target embedded by another model refused."""

from __future__ import annotations

import itertools
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_clip import ImageTextPairDataset, NearTargetFilter, keep_near_target
from dask_clip.errors import DataError, UsageError

DIM = 16
GROUPS = 6
"""Directions of planted groups: the first ``TARGETED`` are the target task's, the others only in the pool."""
TARGETED = 2


def directions(seed: int) -> np.ndarray:
    """``GROUPS`` orthonormal directions ``float64 (GROUPS, DIM)``: far apart (cosine 0)."""
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(DIM, GROUPS)))[0].T


def around(direction: np.ndarray, count: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` vectors within about ``spread`` of ``direction`` (cosine about ``1 - spread**2 * DIM / 2``)."""
    return direction + rng.normal(scale=spread, size=(count, DIM))


def write_pool(folder: Path, seed: int = 0, per_group: int = 12, shards: int = 3) -> pd.DataFrame:
    """Shards of ``GROUPS * per_group`` rows around the planted directions plus one without an embedding, whose
    parquets pandas wrote (another tool's list column), with empty tars; the rows, ``planted`` True near a target."""
    rng = np.random.default_rng(seed)
    vectors = np.concatenate([around(d, per_group, 0.05, rng) for d in directions(seed)])
    frame = pd.DataFrame(
        {
            "key": [f"k{i:03d}" for i in range(len(vectors) + 1)],
            "image_embedding": [*list(vectors.astype(np.float32)), None],
            "planted": [*(np.arange(len(vectors)) < TARGETED * per_group), False],
        }
    ).sample(frac=1, random_state=seed)
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(frame), shards + 1).astype(int)
    for number, (start, end) in enumerate(itertools.pairwise(bounds)):
        frame.iloc[start:end].drop(columns="planted").to_parquet(folder / f"{number:05d}.parquet", index=False)
        tarfile.open(folder / f"{number:05d}.tar", "w").close()
    return frame.set_index("key")


def write_target(path: Path, seed: int = 0, per_group: int = 50) -> Path:
    """A target set: ``per_group`` vectors around each of the first ``TARGETED`` planted directions."""
    rng = np.random.default_rng(seed + 100)
    np.save(path, np.concatenate([around(d, per_group, 0.05, rng) for d in directions(seed)[:TARGETED]]))
    return path


def decided(dataset: ImageTextPairDataset) -> pd.DataFrame:
    return dataset.metadata.compute().set_index("key").sort_index()


@pytest.mark.parametrize(("mode", "options"), [("centroids", {"k": 4, "threshold": 0.8}), ("pool", {"k": 12})])
def test_rows_near_the_planted_target_clusters_are_near_and_the_others_not(
    tmp_path: Path, client, mode: str, options: dict
) -> None:
    pool = write_pool(tmp_path / "pool")
    target = write_target(tmp_path / "target.npy")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "pool"))
    filtered = keep_near_target(dataset, target, mode=mode, seed=3, **options)
    result = decided(filtered)
    expected = pool["planted"].sort_index()
    assert result["near_target"].astype(bool).tolist() == expected.tolist()
    embedded = pool["image_embedding"].notna().sort_index()
    assert result["target_similarity"].notna().tolist() == embedded.tolist()  # null only without an embedding
    similarity = result["target_similarity"].astype("float64")
    assert similarity[expected].min() > 0.9 > 0.5 > similarity[~expected & embedded].max()
    config = filtered.operation_config("near_target")
    assert config["target"]["source"] == str(target)
    recorded = (config["target"]["rows"], config["target"]["width"], config["k"], config["seed"])
    assert recorded == (100, DIM, options["k"], 3)
    assert config.get("threshold") == options.get("threshold")


def test_the_same_seed_gives_the_same_decisions_and_record(tmp_path: Path, client) -> None:
    write_pool(tmp_path / "pool", per_group=8)
    target = write_target(tmp_path / "target.npy")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "pool"))
    runs = [keep_near_target(dataset, target, mode="pool", k=10, seed=seed) for seed in (7, 7, 8)]
    first, again, other = (decided(run) for run in runs)
    pd.testing.assert_frame_equal(first, again)
    configs = [run.operation_config("target_cluster") for run in runs]
    assert configs[0] == configs[1]
    assert configs[2]["seed"] == 8 and configs[2]["centroids_digest"] != configs[0]["centroids_digest"]
    assert not first["target_cluster"].equals(other["target_cluster"])  # k-means of another seed numbers clusters anew


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.ones((5, DIM + 1)), r"17-d vectors but 'image_embedding' holds 16-d"),
        (np.zeros((0, DIM)), "the target set is empty"),
        (np.ones(DIM), r"shape \(16,\), not rows of vectors"),
        (np.concatenate([np.ones((2, DIM)), np.zeros((1, DIM))]), "row 2 .* is zero or not finite"),
    ],
)
def test_bad_target_input_is_refused_naming_the_file(tmp_path: Path, client, array: np.ndarray, message: str) -> None:
    write_pool(tmp_path / "pool", per_group=2, shards=1)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "pool"))
    path = tmp_path / "bad target.npy"
    np.save(path, array)
    with pytest.raises(DataError, match=message) as raised:
        keep_near_target(dataset, path, threshold=0.5).metadata.compute()
    assert str(path) in str(raised.value)


def test_mode_and_threshold_must_agree(tmp_path: Path) -> None:
    target = write_target(tmp_path / "target.npy")
    with pytest.raises(UsageError, match="needs threshold="):
        NearTargetFilter(target)
    with pytest.raises(UsageError, match="takes no threshold"):
        NearTargetFilter(target, mode="pool", threshold=0.5)


def test_a_target_column_of_the_model_recorded_is_used_and_of_another_refused(
    embedded_shards: Path, tmp_path: Path, client
) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(embedded_shards))
    result = decided(keep_near_target(dataset, dataset, k=100, threshold=0.999))
    embedded = result["image_embedding"].notna()
    assert result["near_target"].astype(bool).tolist() == embedded.tolist()  # each row is near itself
    other = tmp_path / "other"
    write_pool(other, per_group=2, shards=1)  # a list column another tool wrote: it records no model
    with pytest.raises(UsageError, match="embedded by another model") as raised:
        NearTargetFilter(ImageTextPairDataset.from_webdataset(str(other)), threshold=0.5)(dataset)
    assert str(other) in str(raised.value) and "ClipImageEmbedder" in str(raised.value)


def test_the_cli_marks_rows_near_a_target_file(tmp_path: Path, cli) -> None:
    pool = write_pool(tmp_path / "pool", per_group=4)
    target = write_target(tmp_path / "target.npy")
    done = cli("target-filter", str(tmp_path / "pool"), "--target", str(target), "--k", "4", "--threshold", "0.8")
    assert done.returncode == 0, done.stderr
    assert f"{len(pool)} rows, {int(pool['planted'].sum())} near the target (near_target=True)" in done.stdout
    saved = decided(ImageTextPairDataset.from_webdataset(str(tmp_path / "pool")))
    assert saved["near_target"].astype(bool).tolist() == pool["planted"].sort_index().tolist()
    refused = cli(
        "target-filter", str(tmp_path / "pool"), "--target", str(target), "--mode", "pool", "--threshold", "1"
    )
    assert refused.returncode == 2 and "takes no threshold" in refused.stderr
