"""SemanticDeduplicator's bounded-memory passes (sample -> clusters, assign -> P2P shuffle -> decide, join)
against an in-memory brute-force reference on the same clusters, on a real 2-worker LocalCluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dask_clip import ImageTextPairDataset, SemanticDeduplicator, embeddings_to_numpy, testing
from dask_clip.columns import vectors_to_binary
from dask_clip.errors import ShardError
from dask_clip.ops.clustering import ClusterTree
from dask_clip.ops.semantic_dedup import cluster_decisions, one_decision_per_row

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


@pytest.mark.parametrize("max_cluster_size", [50, 3])
def test_near_identical_vectors_are_not_split_apart(client, tmp_path: Path, max_cluster_size: int) -> None:
    """200 vectors of pairwise cosine 1.00000 (noise 1e-6) are one duplicate group however small the cap: a cluster
    within half the duplicate angle is not split, so one of them is kept (the splits kept 8 and 78 of them)."""
    rng = np.random.default_rng(0)
    base = unit(rng.normal(size=DIM))
    vectors = {f"copy{i:03d}": unit(base + rng.normal(size=DIM) * 1e-6) for i in range(200)}
    dataset = shards_of(tmp_path, vectors, rows_per_shard=40)
    dedup = SemanticDeduplicator(n_clusters=1, max_cluster_size=max_cluster_size, kmeans_sample_size=1000)
    got = decisions(dedup(dataset))
    assert got["keep"].sum() == 1
    assert got.loc[~got["keep"], "duplicate_of"].str.startswith("copy").all()  # the most similar earlier copy
    assert not dedup.cluster_tree(dataset).compute().children


def boundary_reference(
    frame: pd.DataFrame, tree: ClusterTree, eps: float, max_copies: int
) -> tuple[pd.DataFrame, dict[str, int]]:
    """The decision rule with copies, all rows in memory, for a tree without splits: each row at home in its nearest
    leaf and copied to the (at most ``max_copies``, nearest first) other leaves within its home angle plus twice the
    duplicate angle; within a cluster, rows and copies ranked by (cosine to the home centroid, key), a row at home
    compared with every earlier one, a copy with the earlier rows at home; a row is removed iff an earlier-ranked row
    it was compared with, in its home or a cluster it was copied to, is a duplicate, naming the most similar.
    Also returns each key's home leaf."""
    assert not tree.children
    vectors = embeddings_to_numpy(frame["image_embedding"]).astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    rows = vectors[usable] / norms[usable, None]
    keys = frame["key"].to_numpy()[usable]
    cosines = rows @ tree.centroids.astype(np.float64).T
    angles = np.arccos(np.clip(cosines, -1, 1))
    home = np.argmax(cosines, axis=1)
    rank = tree.assign(rows.astype(np.float32))[1]  # the float32 cosine the deduplicator ranks by
    members: dict[int, list[tuple[int, bool]]] = {leaf: [] for leaf in range(len(tree.centroids))}
    for row in range(len(rows)):
        members[home[row]].append((row, False))
        bound = angles[row, home[row]] + 2 * np.arccos(1 - eps)
        others = [leaf for leaf in np.argsort(-cosines[row], kind="stable") if leaf != home[row]]
        for leaf in [leaf for leaf in others if angles[row, leaf] <= bound][:max_copies]:
            members[leaf].append((row, True))
    found: dict[int, tuple[float, int]] = {}
    for cluster_rows in members.values():
        ordered = sorted(cluster_rows, key=lambda member: (rank[member[0]], keys[member[0]]))
        for position, (row, copy) in enumerate(ordered):
            compared = [other for other, other_copy in ordered[:position] if not (copy and other_copy)]
            earlier = [(float(rows[row] @ rows[other]), other) for other in compared]
            best = max(earlier, default=(-1.0, -1))
            if best[0] >= 1 - eps and best[0] > found.get(row, (-1.0, -1))[0]:
                found[row] = best
    out = pd.DataFrame({"key": frame["key"], "keep": True, "duplicate_of": None, "similarity": np.nan}).set_index("key")
    for row, (similarity, other) in found.items():
        out.loc[keys[row]] = (False, keys[other], similarity)
    return out, dict(zip(keys, home, strict=True))


def test_pairs_across_cluster_boundaries_are_found_by_the_copies(client, tmp_path: Path) -> None:
    """Eight groups of 30 spread points (pairwise cosine about 0.75) around orthogonal directions, and 24 planted
    pairs of cosine 0.96 (duplicates at eps = 0.05) whose rows sit 8 degrees either side of the bisector of two
    groups: k-means (8 centroids) puts the two rows of a pair in different clusters. With copies every pair is
    found and the decisions follow the rule exactly (a brute-force reference); compared only within their own
    cluster (``max_copies=0``), rows miss exactly the pairs across a boundary."""
    rng = np.random.default_rng(11)
    eye = np.eye(DIM)
    vectors: dict[str, np.ndarray | None] = {}
    for group in range(8):
        for i in range(30):
            noise = np.zeros(DIM)
            noise[8:] = rng.normal(size=DIM - 8) / np.sqrt(DIM - 8) * 0.6
            vectors[f"g{group}-{i:02d}"] = unit(eye[group] + noise)
    half = np.arccos(0.96) / 2
    for pair in range(24):
        first, second = rng.choice(8, size=2, replace=False)
        offset = np.zeros(DIM)
        offset[8:] = rng.normal(size=DIM - 8) / np.sqrt(DIM - 8) * 0.5
        middle, across = unit(eye[first] + eye[second] + offset), unit(eye[first] - eye[second])
        vectors[f"p{pair:02d}-a"] = np.cos(half) * middle + np.sin(half) * across
        vectors[f"p{pair:02d}-b"] = np.cos(half) * middle - np.sin(half) * across
    vectors = {key: vectors[key] for key in rng.permutation(list(vectors))}
    dataset = shards_of(tmp_path, vectors, rows_per_shard=50)
    frame = dataset.metadata.compute()

    def options(max_copies: int) -> SemanticDeduplicator:
        return SemanticDeduplicator(eps=0.05, n_clusters=8, max_cluster_size=None, max_copies=max_copies)

    tree = options(2).cluster_tree(dataset).compute()
    pairs = [(f"p{pair:02d}-a", f"p{pair:02d}-b") for pair in range(24)]
    for max_copies in (7, 2):
        got = decisions(options(max_copies)(dataset))
        expected, home = boundary_reference(frame, tree, 0.05, max_copies)
        assert_agree(got, expected)
        assert all(not (got.loc[a, "keep"] and got.loc[b, "keep"]) for a, b in pairs), max_copies
        assert got.loc[got.index.str.startswith("g"), "keep"].all()
    across = [home[a] != home[b] for a, b in pairs]
    assert sum(across) >= 20  # the pairs the copies are for
    own_cluster_only = decisions(options(0)(dataset))
    missed = [own_cluster_only.loc[a, "keep"] and own_cluster_only.loc[b, "keep"] for a, b in pairs]
    assert missed == across
    # a seeded draw per row ranks it the same way in every cluster it is compared in: every pair found once
    randomly = decisions(
        SemanticDeduplicator(eps=0.05, n_clusters=8, max_cluster_size=None, which_to_keep="random")(dataset)
    )
    assert all(randomly.loc[a, "keep"] != randomly.loc[b, "keep"] for a, b in pairs)
    assert randomly.loc[randomly.index.str.startswith("g"), "keep"].all()
    counts = options(2).copy_counts(dataset)
    assert counts["stem"].tolist() == [shard.stem for shard in dataset.shards]
    assert counts["rows"].sum() == len(frame) and (counts["copies"] <= 2 * counts["copied_rows"]).all()
    assert 48 >= counts["copied_rows"].sum() >= 2 * sum(across)  # the pairs' rows, and rarely a group's


def test_copies_are_compared_but_never_decided() -> None:
    """Hand-made clusters: a copy removes the row it copies only by finding an earlier-ranked duplicate; it never
    gets a decision of its own, and a row's decisions from several clusters merge into one."""
    x, w = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    near = unit(np.array([1, 0.01, 0, 0])).astype(np.float32)
    rows = [  # cluster, key, shard, rank, copy, vector
        (0, "x", 0, 0.1, False, x),
        (0, "y", 1, 0.2, True, near),  # y's copy finds the earlier x: y is removed, though its home never sees x
        (1, "y", 1, 0.2, False, near),
        (2, "z", 0, 0.0, True, w),  # an earlier copy: z is not decided here, and w names it
        (2, "w", 1, 0.5, False, w),
        (2, "v", 1, 0.9, True, x),  # a copy that finds no duplicate: no row at all
        (3, "s", 0, 0.1, True, x),  # two copies are not compared: they meet where they are at home
        (3, "t", 0, 0.2, True, x),
    ]
    frame = pd.DataFrame(
        {
            "_dask_clip_cluster": [r[0] for r in rows],
            "key": [r[1] for r in rows],
            "_dask_clip_shard": [r[2] for r in rows],
            "_dask_clip_stem": [f"0000{r[2]}" for r in rows],
            "_dask_clip_rank": [r[3] for r in rows],
            "_dask_clip_copy": [r[4] for r in rows],
            "_dask_clip_vector": vectors_to_binary(np.stack([r[5] for r in rows])),
        }
    )
    decided = cluster_decisions(frame, threshold=0.99, id_col="key", id_dtype=pd.StringDtype("pyarrow"))
    assert sorted(decided["key"]) == ["w", "x", "y", "y"]
    merged = one_decision_per_row(decided[decided["_dask_clip_shard"] == 1], "key").set_index("key")
    assert sorted(merged.index) == ["w", "y"]
    assert not merged.loc["y", "_dask_clip_keep"] and merged.loc["y", "_dask_clip_duplicate_of"] == "x"
    assert not merged.loc["w", "_dask_clip_keep"] and merged.loc["w", "_dask_clip_duplicate_of"] == "z"
    assert merged.loc["w", "_dask_clip_duplicate_of_shard"] == "00000"
    x_decision = decided[decided["key"] == "x"]
    assert len(x_decision) == 1 and x_decision["_dask_clip_keep"].all()


def test_best_earlier_match_in_blocks_agrees_with_all_pairs(monkeypatch) -> None:
    """Blocks of 3 rows over 40 rows, a third of them copies, with repeated vectors (ties go to the earliest row)."""
    from dask_clip.ops import semantic_dedup

    monkeypatch.setattr(semantic_dedup, "SIMILARITY_BLOCK", 3)
    rng = np.random.default_rng(5)
    vectors = np.stack([unit(v) for v in rng.normal(size=(20, 6))] * 2).astype(np.float32)[rng.permutation(40)]
    copy = rng.random(40) < 1 / 3
    best, match = semantic_dedup.best_earlier_match(vectors, copy)
    for row in range(40):
        compared = [other for other in range(row) if not (copy[row] and copy[other])]
        cosines = [float(vectors[row] @ vectors[other]) for other in compared]
        if not compared:
            assert best[row] == -np.inf and match[row] == -1
            continue
        top = max(cosines)
        assert best[row] == pytest.approx(top, abs=1e-6)
        assert match[row] == min(o for o, c in zip(compared, cosines, strict=True) if c >= top - 1e-6), row


def split_tree(rng: np.random.Generator, n_clusters: int) -> tuple[np.ndarray, ClusterTree]:
    """3,000 random 8-d unit vectors and the tree fitted on them, with clusters of over 300 rows split (at
    least two)."""
    from dask_clip.ops.clustering import fit_cluster_tree

    sample = rng.normal(size=(3000, 8)).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    tree = fit_cluster_tree(
        sample, np.ones(3000), n_clusters=n_clusters, max_cluster_size=300, partitions=4, seed=0, max_iter=10
    )
    assert len(tree.children) >= 2
    return sample, tree


def test_a_duplicate_s_cluster_is_among_a_row_s_neighbours_down_split_clusters() -> None:
    """The angle bound level by level, on a tree with split clusters: for 400 pairs at just under the duplicate
    angle, each row's cluster is its partner's own or one of its partner's neighbours (none capped), both ways."""
    rng = np.random.default_rng(2)
    sample, tree = split_tree(rng, n_clusters=4)
    theta = np.arccos(1 - 0.05)
    y = sample[:400].astype(np.float64)
    away = rng.normal(size=y.shape)
    away = away - (away * y).sum(axis=1, keepdims=True) * y
    away /= np.linalg.norm(away, axis=1, keepdims=True)
    x = (np.cos(0.999 * theta) * y + np.sin(0.999 * theta) * away).astype(np.float32)
    y = y.astype(np.float32)
    home_x, home_y = tree.assign(x)[0], tree.assign(y)[0]
    assert (home_x != home_y).sum() >= 40
    for rows, home, partner_home in ((y, home_y, home_x), (x, home_x, home_y)):
        row, leaf = tree.neighbours(rows, home, 2 * theta, most=len(tree.centroids))
        reached = set(zip(row.tolist(), leaf.tolist(), strict=True))
        assert all(partner_home[i] == home[i] or (i, partner_home[i]) in reached for i in range(len(rows)))
        capped = tree.neighbours(rows, home, 2 * theta, most=1)[0]
        assert np.bincount(capped).max() == 1


@pytest.mark.parametrize("most", [0, 1, 2, 5])
def test_place_gives_assign_s_and_neighbours_answers_from_one_search(most: int) -> None:
    """``place`` (one search of the top-level centroids, as the assign pass runs it) against ``assign`` and
    ``neighbours`` searched apart, on a tree with split clusters, for rows near boundaries (copied) and not."""
    rng = np.random.default_rng(5)
    tree = split_tree(rng, n_clusters=6)[1]
    rows = rng.normal(size=(2000, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    slack = 2 * np.arccos(1 - 0.05)
    leaf, cosine, partition, copied, copy_leaf = tree.place(rows, slack, most)
    expected_leaf, expected_cosine, expected_partition = tree.assign(rows)
    expected_copied, expected_copy_leaf = tree.neighbours(rows, expected_leaf, slack, most)
    np.testing.assert_array_equal(leaf, expected_leaf)
    np.testing.assert_array_equal(cosine, expected_cosine)
    np.testing.assert_array_equal(partition, expected_partition)
    np.testing.assert_array_equal(copied, expected_copied)
    np.testing.assert_array_equal(copy_leaf, expected_copy_leaf)
    assert (len(np.unique(copied)) > 100) == (most > 0)


def test_faiss_threads_hold_for_the_block_in_the_calling_thread_only() -> None:
    """The fit task's threads: set within the block, set back after it, and not seen by another thread (a
    worker's other tasks)."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    from dask_clip.ops.clustering import faiss_threads

    before = faiss.omp_get_max_threads()
    with ThreadPoolExecutor(1) as pool:
        elsewhere = pool.submit(faiss.omp_get_max_threads).result()
        with faiss_threads(before + 3):
            assert faiss.omp_get_max_threads() == before + 3
            assert pool.submit(faiss.omp_get_max_threads).result() == elsewhere
    assert faiss.omp_get_max_threads() == before


def test_the_fitted_tree_does_not_depend_on_faiss_s_threads() -> None:
    """The fit task runs faiss on every core: the centroids must be those of one thread, bit for bit."""
    from dask_clip.ops.clustering import faiss_threads, fit_cluster_tree

    sample = np.random.default_rng(6).normal(size=(4000, 32)).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    trees = []
    for threads in (1, 2):
        with faiss_threads(threads):
            trees.append(
                fit_cluster_tree(
                    sample, np.ones(4000), n_clusters=30, max_cluster_size=200, partitions=8, seed=0, max_iter=10
                )
            )
    np.testing.assert_array_equal(trees[0].centroids, trees[1].centroids)
    np.testing.assert_array_equal(trees[0].partition_of, trees[1].partition_of)
