"""SemanticDeduplicator's bounded-memory passes (sample -> clusters, assign -> P2P shuffle -> decide, join)
against an in-memory brute-force reference on the same clusters, on a real 2-worker LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_clip import ImageTextPairDataset, SemanticDeduplicator, embeddings_to_numpy, testing
from dask_clip.errors import ShardError
from dask_clip.ops.clustering import ClusterTree

DIM = 32


def planted(rng: np.random.Generator, background: int, groups: int, per_group: int) -> dict[str, np.ndarray | None]:
    """Random unit vectors (pairwise cosine about 0 +- 0.18) plus ``groups`` groups of ``per_group`` near-copies
    (pairwise cosine > 0.995), keys shuffled so that every group spreads over shards; two rows without a vector."""
    vectors: dict[str, np.ndarray | None] = {}
    for i in range(background):
        vectors[f"bg{i:04d}"] = unit(rng.normal(size=DIM))
    for g in range(groups):
        centre = unit(rng.normal(size=DIM))
        for j in range(per_group):
            vectors[f"g{g:03d}-{j}"] = unit(centre + rng.normal(size=DIM) * 0.01)
    vectors["none-a"] = None
    vectors["none-b"] = np.full(DIM, np.nan)
    keys = list(rng.permutation(list(vectors)))
    return {key: vectors[key] for key in keys}


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def shards_of(folder: Path, vectors: dict[str, np.ndarray | None], rows_per_shard: int = 60) -> ImageTextPairDataset:
    testing.write_embedding_shards(folder, vectors, rows_per_shard)
    return ImageTextPairDataset.from_webdataset(str(folder))


def brute_force(frame: pd.DataFrame, tree: ClusterTree, threshold: float, which_to_keep: str) -> pd.DataFrame:
    """The reference, all rows in memory: each row's leaf from ``tree``; within a leaf, rows sorted by id and
    ranked by cosine to the leaf's centroid; each row compared with every earlier-ranked row of its leaf."""
    vectors = embeddings_to_numpy(frame["image_embedding"]).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    unit_rows = (vectors[usable] / norms[usable, None]).astype(np.float32)
    leaf, cosine, _ = tree.assign(unit_rows)
    keys = frame["key"].to_numpy()[usable]
    out = pd.DataFrame({"key": frame["key"], "keep": True, "duplicate_of": None, "similarity": np.nan}).set_index("key")
    for cluster in np.unique(leaf):
        members = np.flatnonzero(leaf == cluster)
        members = members[np.argsort(keys[members], kind="stable")]
        rank = np.argsort(cosine[members] if which_to_keep == "hard" else -cosine[members], kind="stable")
        members = members[rank]
        similarity = unit_rows[members].astype(np.float64) @ unit_rows[members].astype(np.float64).T
        for position in range(1, len(members)):
            best = int(np.argmax(similarity[position, :position]))
            if similarity[position, best] >= threshold:
                key = keys[members[position]]
                out.loc[key] = (False, keys[members[best]], similarity[position, best])
    return out


def decisions(dataset: ImageTextPairDataset) -> pd.DataFrame:
    return dataset.metadata.compute().set_index("key")[["keep", "duplicate_of", "similarity"]]


def assert_agree(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    expected = expected.loc[got.index]
    assert got["keep"].tolist() == expected["keep"].tolist()
    removed = ~expected["keep"].to_numpy(dtype=bool)
    assert got["duplicate_of"][removed].tolist() == expected["duplicate_of"][removed].tolist()
    np.testing.assert_allclose(got["similarity"][removed].astype(float), expected["similarity"][removed], atol=1e-5)
    assert got["duplicate_of"][~removed].isna().all() and got["similarity"][~removed].isna().all()


@pytest.fixture
def dataset(tmp_path: Path) -> ImageTextPairDataset:
    return shards_of(tmp_path / "shards", planted(np.random.default_rng(3), background=400, groups=20, per_group=5))


@pytest.mark.parametrize("which_to_keep", ["hard", "easy"])
def test_streamed_passes_agree_with_the_in_memory_reference_on_the_same_clusters(
    client, dataset: ImageTextPairDataset, which_to_keep: str
) -> None:
    dedup = SemanticDeduplicator(eps=0.01, n_clusters=6, kmeans_sample_size=200, which_to_keep=which_to_keep)
    tree = dedup.cluster_tree(dataset).compute()
    assert tree.roots == 6 and not tree.children
    got = decisions(dedup(dataset))
    assert_agree(got, brute_force(dataset.metadata.compute(), tree, 0.99, which_to_keep))

    groups = got[got.index.str.startswith("g")].groupby(lambda key: key.split("-")[0])["keep"]
    assert (groups.sum() == 1).all() and len(groups) == 20  # every planted group: one kept, four removed
    assert got.loc[~got.index.str.startswith("g"), "keep"].all()  # background and rows without a vector kept


def test_without_a_client_the_same_passes_run_on_threads(dataset: ImageTextPairDataset, monkeypatch) -> None:
    """No Dask client: the shuffle is a tasks shuffle on this process's threads (P2P needs workers)."""
    monkeypatch.setattr("dask_clip.execution.current_client", lambda: None)  # the tests' session client hidden
    dedup = SemanticDeduplicator(eps=0.01, n_clusters=3, max_cluster_size=100, kmeans_sample_size=300)
    tree = dedup.cluster_tree(dataset).compute(scheduler="threads")
    got = dedup(dataset).metadata.compute(scheduler="threads").set_index("key")
    frame = dataset.metadata.compute(scheduler="threads")
    assert_agree(got[["keep", "duplicate_of", "similarity"]], brute_force(frame, tree, 0.99, "hard"))


def test_oversized_clusters_are_split_and_agree_within_each_piece(client, dataset: ImageTextPairDataset) -> None:
    dedup = SemanticDeduplicator(eps=0.01, n_clusters=2, max_cluster_size=60, kmeans_sample_size=10_000)
    tree = dedup.cluster_tree(dataset).compute()
    assert tree.children, "no cluster was split"
    frame = dataset.metadata.compute()
    vectors = embeddings_to_numpy(frame["image_embedding"])
    usable = np.isfinite(vectors).all(axis=1)
    leaf = tree.assign(vectors[usable] / np.linalg.norm(vectors[usable], axis=1, keepdims=True))[0]
    sizes = np.bincount(leaf)
    # the sample is every row here, so the estimated sizes are exact and every piece is within the cap
    assert sizes.max() <= 60 and len(np.unique(leaf)) >= 500 / 60
    assert set(np.unique(leaf)) <= set(tree.leaves.tolist())
    got = decisions(dedup(dataset))
    assert_agree(got, brute_force(frame, tree, 0.99, "hard"))
    groups = got[got.index.str.startswith("g")].groupby(lambda key: key.split("-")[0])["keep"]
    assert (groups.sum() == 1).all()  # tight groups stay within one piece


def test_a_cluster_of_identical_vectors_cannot_be_split_and_is_still_deduplicated(client, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    copy = unit(rng.normal(size=DIM))
    vectors = {f"copy{i:02d}": copy for i in range(30)} | {f"bg{i:02d}": unit(rng.normal(size=DIM)) for i in range(30)}
    dataset = shards_of(tmp_path, vectors, rows_per_shard=7)
    got = decisions(SemanticDeduplicator(n_clusters=2, max_cluster_size=10, which_to_keep="easy")(dataset))
    copies = got[got.index.str.startswith("copy")]
    assert copies["keep"].sum() == 1
    assert (copies.loc[~copies["keep"], "duplicate_of"] == copies.index[copies["keep"]][0]).all()
    assert got.loc[got.index.str.startswith("bg"), "keep"].all()


def test_a_rerun_and_a_resumed_run_agree_with_a_fresh_one(
    client, dataset: ImageTextPairDataset, tmp_path: Path
) -> None:
    def dedup() -> SemanticDeduplicator:
        return SemanticDeduplicator(eps=0.01, n_clusters=4, kmeans_sample_size=150, max_cluster_size=80, seed=5)

    first = tmp_path / "first"
    assert dedup()(dataset).save_metadata(str(first))["written"].all()
    fresh = ImageTextPairDataset.from_webdataset(str(dataset.path))
    saved = pd.concat(pd.read_parquet(p, dtype_backend="pyarrow") for p in sorted(first.glob("*.parquet"))).set_index(
        "key"
    )
    assert (~saved["keep"]).sum() >= 80  # the planted duplicates were found

    assert not dedup()(fresh).save_metadata(str(first))["written"].any()  # finished: nothing recomputed
    (first / "00002.parquet").unlink()  # an interrupted run: one shard missing
    resumed = dedup()(fresh).save_metadata(str(first))
    assert resumed["written"].all()  # a cross-shard decision is recomputed as a whole
    again = pd.concat(pd.read_parquet(p, dtype_backend="pyarrow") for p in sorted(first.glob("*.parquet"))).set_index(
        "key"
    )
    pd.testing.assert_frame_equal(
        again[["keep", "duplicate_of", "similarity"]], saved[["keep", "duplicate_of", "similarity"]]
    )
    pd.testing.assert_frame_equal(decisions(dedup()(fresh)), saved[["keep", "duplicate_of", "similarity"]])


def test_a_vector_of_another_width_names_its_shard_and_row(client, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vectors = [unit(rng.normal(size=DIM)).tolist() for _ in range(12)]
    vectors[6] = vectors[6][:-1]  # row k06, in shard 00001
    testing.write_embedding_shards(tmp_path, {f"k{i:02d}": np.zeros(DIM) for i in range(12)}, rows_per_shard=4)
    for shard in range(3):  # the same rows as list columns (their width not fixed by the type)
        rows = range(4 * shard, 4 * shard + 4)
        frame = pd.DataFrame({"key": [f"k{i:02d}" for i in rows], "image_embedding": [vectors[i] for i in rows]})
        frame.to_parquet(tmp_path / f"{shard:05d}.parquet")
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    with pytest.raises(ShardError, match=r"00001\.tar.*'k06'.*31 values"):
        SemanticDeduplicator(n_clusters=2)(dataset).metadata.compute()
