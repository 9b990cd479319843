"""SemanticDeduplicator on a real 2-worker LocalCluster: constructed vectors with known cosines, keep
policies, clusters spanning shards, a near-duplicate pair across a cluster boundary, and the
plumbing on real photos embedded by a random-weight CLIP."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, SemanticDeduplicator, embeddings_to_numpy, testing
from dask_clip.errors import ColumnError
from dask_clip.execution import ShardTask, map_shards


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def write_vector_shards(
    folder: Path, vectors: dict[str, np.ndarray | None], rows_per_shard: int
) -> ImageTextPairDataset:
    """Shards whose parquets hold ``key`` and ``image_embedding`` (None -> null), in the given order; tars empty."""
    testing.write_embedding_shards(folder, vectors, rows_per_shard)
    return ImageTextPairDataset.from_webdataset(str(folder))


def reference_decisions(
    vectors: dict[str, np.ndarray], order: list[str], threshold: float
) -> dict[str, tuple[str, float] | None]:
    """Brute force, one cluster: each item's most similar earlier-ranked item when that cosine >= threshold."""
    result: dict[str, tuple[str, float] | None] = {}
    for i, key in enumerate(order):
        earlier = [(float(unit(vectors[key]) @ unit(vectors[other])), other) for other in order[:i]]
        best = max(earlier, default=(-1.0, ""))
        result[key] = (best[1], best[0]) if best[0] >= threshold else None
    return result


def decisions_of(frame: pd.DataFrame) -> dict[str, tuple[str, float] | None]:
    out = {}
    for key, keep, duplicate_of, similarity in frame[["key", "keep", "duplicate_of", "similarity"]].itertuples(
        index=False
    ):
        out[key] = None if keep else (duplicate_of, similarity)
    return out


def spread_group(direction: int, count: int, dim: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Points around basis vector ``direction``, pairwise cosine about 0.75: no two are duplicates."""
    points = []
    for _ in range(count):
        noise = np.zeros(dim)
        noise[8:] = rng.normal(size=dim - 8) / np.sqrt(dim - 8) * 0.6
        points.append(unit(np.eye(dim)[direction] + noise))
    return points


@pytest.fixture
def group_with_known_ranks() -> dict[str, np.ndarray | None]:
    """Six unit vectors ``u + t w_k`` (``w_k`` orthogonal): pairwise cosine >= 0.99, larger ``t`` = farther
    from the centroid. Keys are not in ``t`` order; one row has no embedding."""
    dim = 16
    ts = {"k3": 0.05, "k0": 0.01, "k5": 0.08, "k1": 0.02, "k4": 0.065, "k2": 0.035}
    vectors: dict[str, np.ndarray | None] = {}
    for position, (key, t) in enumerate(ts.items()):
        vectors[key] = unit(np.eye(dim)[0] + t * np.eye(dim)[position + 1])
    vectors["none"] = None
    return vectors


@pytest.mark.parametrize("which_to_keep, expected_kept", [("hard", "k5"), ("easy", "k0")])
def test_keep_policies_match_a_brute_force_reference(
    client, tmp_path: Path, group_with_known_ranks, which_to_keep: str, expected_kept: str
) -> None:
    vectors = group_with_known_ranks
    dataset = write_vector_shards(tmp_path, vectors, rows_per_shard=2)  # the one cluster spans 4 shards
    result = SemanticDeduplicator(eps=0.01, n_clusters=1, which_to_keep=which_to_keep)(dataset)
    assert result.metadata.npartitions == 4
    frame = result.metadata.compute()
    assert frame["key"].tolist() == list(vectors)
    assert frame["keep"].tolist() == [key in (expected_kept, "none") for key in vectors]

    present = {k: v for k, v in vectors.items() if v is not None}
    t_order = sorted(present, key=lambda k: int(k[1]), reverse=which_to_keep == "hard")  # k0..k5 is t ascending
    expected = reference_decisions(present, t_order, 0.99)
    got = decisions_of(frame[frame["key"] != "none"])
    assert {k: v and v[0] for k, v in got.items()} == {k: v and v[0] for k, v in expected.items()}
    for key, decision in got.items():
        if decision is not None:
            assert decision[1] == pytest.approx(expected[key][1], abs=1e-5)
    row = frame.set_index("key").loc["none"]
    assert row["keep"] and pd.isna(row["duplicate_of"]) and pd.isna(row["similarity"])


def test_random_policy_is_seeded(client, tmp_path: Path, group_with_known_ranks) -> None:
    dataset = write_vector_shards(tmp_path, group_with_known_ranks, rows_per_shard=3)

    def kept(seed: int) -> list[str]:
        frame = SemanticDeduplicator(n_clusters=1, which_to_keep="random", seed=seed)(dataset).metadata.compute()
        return frame.loc[frame["keep"] & (frame["key"] != "none"), "key"].tolist()

    runs = {seed: kept(seed) for seed in range(5)}
    assert all(len(keys) == 1 for keys in runs.values())
    assert kept(3) == runs[3]
    assert len({keys[0] for keys in runs.values()}) > 1  # the seed, not the data, picks the survivor


def test_eps_sets_the_threshold(client, tmp_path: Path) -> None:
    dim = 8
    # two orthogonal pairs: cosines exactly 0.995 and 0.97, and nothing else similar
    vectors = {
        "a1": np.eye(dim)[0],
        "a2": 0.995 * np.eye(dim)[0] + np.sqrt(1 - 0.995**2) * np.eye(dim)[1],
        "b1": np.eye(dim)[2],
        "b2": 0.97 * np.eye(dim)[2] + np.sqrt(1 - 0.97**2) * np.eye(dim)[3],
        "c": np.eye(dim)[4],
    }
    dataset = write_vector_shards(tmp_path, vectors, rows_per_shard=2)
    for eps, removed in [(0.001, set()), (0.01, {"a"}), (0.05, {"a", "b"})]:
        frame = SemanticDeduplicator(eps=eps, n_clusters=1, which_to_keep="easy")(dataset).metadata.compute()
        dropped = frame[~frame["keep"]]
        assert {key[0] for key in dropped["key"]} == removed, eps
        assert len(dropped) == len(removed)
        for key, duplicate_of, similarity in dropped[["key", "duplicate_of", "similarity"]].itertuples(index=False):
            assert duplicate_of[0] == key[0] and duplicate_of != key
            assert similarity == pytest.approx(0.995 if key[0] == "a" else 0.97, abs=1e-5)


def test_big_cluster_across_shards_and_a_pair_split_by_a_cluster_boundary(client, tmp_path: Path) -> None:
    """Three well-separated groups, k = 3, 4 rows per shard, eps = 0.05:

    - ``dup*``: 10 near-copies (pairwise cosine > 0.999) spread over several shards: one kept, nine removed.
    - ``left*`` / ``right*``: 16 points around each of two orthogonal directions, pairwise cosine about
      0.75 (below 0.93): all kept.
    - ``x`` and ``y`` (cosine 0.96, a duplicate pair at eps=0.05) sit 8 degrees either side of the bisector
      of the left and right groups, so k-means puts ``x`` with the left cluster and ``y`` with the right one.
      Each is also compared in the other's cluster (the angle bound), so one of them is removed; with
      ``max_copies=0`` (rows compared only within their own cluster) both are kept, which shows the boundary
      is between them.
    """
    dim = 32
    rng = np.random.default_rng(7)
    vectors: dict[str, np.ndarray] = {}
    for i in range(10):
        noise = np.zeros(dim)
        noise[8:] = rng.normal(size=dim - 8) * 0.004
        vectors[f"dup{i}"] = unit(np.eye(dim)[2] + noise)
    vectors.update({f"left{i}": v for i, v in enumerate(spread_group(0, 16, dim, rng))})
    vectors.update({f"right{i}": v for i, v in enumerate(spread_group(1, 16, dim, rng))})
    half_angle = np.arccos(0.96) / 2
    middle, across = unit(np.eye(dim)[0] + np.eye(dim)[1]), unit(np.eye(dim)[0] - np.eye(dim)[1])
    vectors["x"] = np.cos(half_angle) * middle + np.sin(half_angle) * across
    vectors["y"] = np.cos(half_angle) * middle - np.sin(half_angle) * across
    assert float(vectors["x"] @ vectors["y"]) == pytest.approx(0.96)
    order = list(rng.permutation(list(vectors)))
    dataset = write_vector_shards(tmp_path, {k: vectors[k] for k in order}, rows_per_shard=4)

    dedup = SemanticDeduplicator(eps=0.05, n_clusters=3, seed=1)
    tree = dedup.cluster_tree(dataset).compute()
    home = tree.assign(np.stack([vectors["x"], vectors["y"]]).astype(np.float32))[0]
    assert home[0] != home[1]
    removed = decisions_of(dedup(dataset).metadata.compute())
    assert sum(v is not None for k, v in removed.items() if k.startswith("dup")) == 9
    assert all(v is None for k, v in removed.items() if k.startswith(("left", "right")))
    assert (removed["x"] is None) != (removed["y"] is None)  # the pair across the boundary is found
    for key, (duplicate_of, similarity) in ((k, v) for k, v in removed.items() if v is not None):
        assert duplicate_of.startswith("dup") or {key, duplicate_of} == {"x", "y"}
        assert similarity == pytest.approx(float(vectors[key] @ vectors[duplicate_of]), abs=1e-5)

    own_cluster_only = SemanticDeduplicator(eps=0.05, n_clusters=3, seed=1, max_copies=0)
    lost = decisions_of(own_cluster_only(dataset).metadata.compute())
    assert lost["x"] is None and lost["y"] is None
    one_cluster = decisions_of(SemanticDeduplicator(eps=0.05, n_clusters=1)(dataset).metadata.compute())
    assert (one_cluster["x"] is None) != (one_cluster["y"] is None)


def unit_rows(array: np.ndarray) -> np.ndarray:
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_photo_copies_plumbing(client, tmp_path: Path, tiny_model: Path) -> None:
    """Real photos plus a byte-identical copy, a resize, a re-encode and a crop, embedded by a random-weight
    CLIP (meaningless embeddings: only identical bytes have a known outcome, similarity 1)."""
    photos = testing.sample_photos(["astronaut", "coffee", "chelsea", "rocket", "camera"])
    astronaut = photos["astronaut"]
    jpeg = testing.encode_jpeg(astronaut)
    variants = {
        "astronaut": jpeg,
        "astronaut_copy": jpeg,
        "astronaut_resized": testing.encode_jpeg(np.asarray(Image.fromarray(astronaut).resize((256, 256)))),
        "astronaut_reencoded": testing.encode_jpeg(np.asarray(Image.open(io.BytesIO(jpeg))), quality=60),
        "astronaut_cropped": testing.encode_jpeg(np.ascontiguousarray(astronaut[40:-40, 40:-40])),
        **{name: testing.encode_jpeg(pixels) for name, pixels in photos.items() if name != "astronaut"},
    }
    names = [*list(variants), "failed"]
    keys = {
        name: testing.img2dataset_key(shard, i) for shard in range(3) for i, name in enumerate(names) if i // 4 == shard
    }
    for shard in range(3):
        batch = [name for i, name in enumerate(names) if i // 4 == shard]
        rows = [
            {"key": keys[n], "caption": n, "status": "failed_to_download" if n == "failed" else "success"}
            for n in batch
        ]
        members = {keys[n]: {"jpg": variants[n]} for n in batch if n != "failed"}
        testing.write_shard(tmp_path, shard, rows, members)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path))
    embedded = ClipImageEmbedder(str(tiny_model), autocast=False)(dataset)
    embedded.save_metadata()
    saved = ImageTextPairDataset.from_webdataset(str(tmp_path))

    result = SemanticDeduplicator(eps=1e-4, n_clusters=2)(saved)
    assert result.metadata.npartitions == 3
    frame = result.metadata.compute().set_index("caption")
    assert frame["key"].tolist() == [keys[n] for n in names]
    assert frame.loc["failed", "keep"] and pd.isna(frame.loc["failed", "duplicate_of"])
    # identical bytes -> identical embeddings -> similarity 1: the later id is removed, naming the earlier
    assert not frame.loc["astronaut_copy", "keep"]
    assert frame.loc["astronaut_copy", "duplicate_of"] == keys["astronaut"]
    assert frame.loc["astronaut_copy", "similarity"] == pytest.approx(1.0, abs=1e-5)
    vectors = embeddings_to_numpy(frame["image_embedding"])
    assert np.array_equal(vectors[0], vectors[1])
    assert str(result.metadata.dtypes["keep"]) == "bool[pyarrow]"
    assert set(result.provenance) >= {"keep", "duplicate_of", "similarity"}
    result.save_metadata()
    reread = ImageTextPairDataset.from_webdataset(str(tmp_path)).metadata.compute()
    assert reread["keep"].tolist() == frame["keep"].tolist()
    assert reread["duplicate_of"].tolist() == frame["duplicate_of"].tolist()


def test_each_shard_is_computed_once_per_pass_and_nothing_runs_before_compute(
    client, tmp_path: Path, group_with_known_ranks
) -> None:
    """Three passes (sample, assign, join), each with its own read of every shard: no pass keeps a shard's
    rows in memory for a later one."""
    dataset = write_vector_shards(tmp_path / "shards", group_with_known_ranks, rows_per_shard=3)
    marks = tmp_path / "marks"
    marks.mkdir()

    def mark(rows: pd.DataFrame, task: ShardTask) -> pd.DataFrame:
        (marks / f"{task.shard.stem}-{np.random.default_rng().integers(1 << 60)}").touch()
        return rows

    counted = dataset.with_metadata(map_shards(mark, dataset.metadata, dataset.shards, dataset.meta, id_col="key"))
    result = SemanticDeduplicator(n_clusters=2)(counted)
    assert list(marks.iterdir()) == []
    result.metadata.compute()
    assert sorted(p.name.split("-")[0] for p in marks.iterdir()) == sorted(["00000", "00001", "00002"] * 3)


def test_bad_arguments_and_columns(tmp_path: Path, group_with_known_ranks) -> None:
    dataset = write_vector_shards(tmp_path, group_with_known_ranks, rows_per_shard=3)
    with pytest.raises(ValueError, match="which_to_keep"):
        SemanticDeduplicator(which_to_keep="first")
    with pytest.raises(ValueError, match="eps"):
        SemanticDeduplicator(eps=1.5)
    with pytest.raises(ColumnError, match="'text_embedding'"):
        SemanticDeduplicator(embedding_column="text_embedding")(dataset)
    with pytest.raises(ColumnError, match="'key'"):
        SemanticDeduplicator(embedding_column="key")(dataset)


def test_rows_without_a_usable_embedding_are_kept(client, tmp_path: Path) -> None:
    dataset = write_vector_shards(
        tmp_path, {"a": None, "zero": np.zeros(4), "b": None, "c": np.ones(4)}, rows_per_shard=2
    )
    frame = SemanticDeduplicator(n_clusters=3)(dataset).metadata.compute()
    assert frame["keep"].tolist() == [True] * 4
    assert frame["duplicate_of"].isna().all() and frame["similarity"].isna().all()


def test_ids_repeated_across_shards_name_the_kept_row_s_shard(client, tmp_path: Path) -> None:
    """Shard 00001 is a copy of 00000 (same ids, same vectors): each of its rows duplicates the row of that id in
    00000, and says so with ``duplicate_of_shard``; ``duplicate_of`` keeps its meaning (the kept row's id)."""
    vectors = {key: np.eye(8)[i] + 0.1 for i, key in enumerate(["a", "b", "c"])}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=3)
    for suffix in (".tar", ".parquet"):
        (tmp_path / "shards" / f"00001{suffix}").write_bytes((tmp_path / "shards" / f"00000{suffix}").read_bytes())
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    frame = SemanticDeduplicator(n_clusters=1)(dataset).metadata.compute()
    first, copy = frame.iloc[:3], frame.iloc[3:]
    assert first["keep"].all() and first["duplicate_of_shard"].isna().all()
    assert not copy["keep"].any() and copy["duplicate_of"].tolist() == ["a", "b", "c"]
    assert copy["duplicate_of_shard"].tolist() == ["00000"] * 3
    np.testing.assert_allclose(copy["similarity"].astype(float), 1.0, atol=1e-6)
