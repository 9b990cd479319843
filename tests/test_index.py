"""dataset.build_index and search(index=...): agreement with exact search, files, staleness, on a 2-worker cluster."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dask_clip import ImageTextPairDataset, IndexFileError, StaleIndexError, UsageError, testing
from dask_clip.ann import choose_index, default_nprobe
from dask_clip.provenance import METADATA_KEY, Computed, FileRecords

WIDTH = 16


def unit_rows(count: int, seed: int) -> dict[str, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    return {f"k{i:05d}": rng.standard_normal(WIDTH).astype(np.float32) for i in range(count)}


def clustered_rows(count: int, seed: int) -> dict[str, np.ndarray | None]:
    """Vectors around 40 directions, as embeddings of similar images cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, WIDTH))
    members = centres[rng.integers(0, 40, count)] + 0.35 * rng.standard_normal((count, WIDTH))
    return {f"k{i:05d}": vector.astype(np.float32) for i, vector in enumerate(members)}


@pytest.fixture
def with_gaps(tmp_path: Path) -> Path:
    """3 shards of 100 rows; one row without an embedding, one NaN vector, one zero vector."""
    vectors = unit_rows(300, seed=0)
    vectors["k00003"] = None
    vectors["k00100"] = np.full(WIDTH, np.nan, dtype=np.float32)
    vectors["k00200"] = np.zeros(WIDTH, dtype=np.float32)
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=100)
    return tmp_path / "shards"


def exact_keys(dataset: ImageTextPairDataset, query: np.ndarray, k: int) -> list[str]:
    return dataset.search(image=query, k=k)["key"].tolist()


def test_exhaustive_index_agrees_with_exact_search(client, with_gaps: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    summary = dataset.build_index(str(tmp_path / "index"))
    assert summary["indexed"].tolist() == [99, 99, 99] and summary["without_embedding"].tolist() == [1, 1, 1]
    opened = dataset.open_index(str(tmp_path / "index"))
    assert opened.manifest["index"]["key"] == "IDMap,Flat"
    for seed in range(10):
        query = np.random.default_rng(100 + seed).standard_normal(WIDTH).astype(np.float32)
        exact = dataset.search(image=query, k=7)
        approximate = dataset.search(image=query, k=7, index=opened)
        assert approximate["key"].tolist() == exact["key"].tolist()
        np.testing.assert_allclose(approximate["score"], exact["score"], atol=1e-5)
        assert approximate["stem"].tolist() == exact["stem"].tolist()
        assert approximate["tar_url"].tolist() == exact["tar_url"].tolist()
        assert list(approximate.dtypes) == list(exact.dtypes)
    everything = dataset.search(image=np.ones(WIDTH, dtype=np.float32), k=1000, index=str(tmp_path / "index"))
    assert len(everything) == 297 and not {"k00003", "k00100", "k00200"} & set(everything["key"])


def test_equal_scores_come_in_id_order(client, tmp_path: Path) -> None:
    """Rows of one vector, ids shuffled against the row numbers (the index's labels, which order faiss's ties):
    the frame orders the ties it returns by id, as exact search's frame does."""
    same = np.ones(WIDTH, dtype=np.float32)  # unit after scaling by 1/4: every score exactly equal
    shuffled = np.random.default_rng(0).permutation(120)
    vectors = {f"k{shuffled[i]:05d}": same if i % 2 else -same for i in range(120)}
    testing.write_embedding_shards(tmp_path / "shards", vectors, rows_per_shard=40)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    dataset.build_index(str(tmp_path / "index"))
    for found in (dataset.search(image=same, k=5, index=str(tmp_path / "index")), dataset.search(image=same, k=5)):
        assert found["key"].tolist() == sorted(found["key"]) and len(set(found["key"])) == 5
        assert found["score"].tolist() == [1.0] * 5


def test_ivf_index_recall_on_clustered_vectors(client, tmp_path: Path) -> None:
    testing.write_embedding_shards(tmp_path / "shards", clustered_rows(4000, seed=1), rows_per_shard=1000)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    dataset.build_index(str(tmp_path / "index"), index_key="IVF64,Flat", nprobe=8, seed=3)
    opened = dataset.open_index(str(tmp_path / "index"))
    assert opened.index.ntotal == 4000 and opened.manifest["index"]["train_size"] == 2560
    queries = list(clustered_rows(20, seed=2).values())
    exact = [set(exact_keys(dataset, query, 10)) for query in queries]

    def recall(nprobe: int) -> float:
        found = [
            len(truth & set(dataset.search(image=query, k=10, index=opened, nprobe=nprobe)["key"]))
            for query, truth in zip(queries, exact, strict=True)
        ]
        return sum(found) / (10 * len(queries))

    assert recall(8) >= 0.9
    assert recall(64) == 1.0  # every list scanned: exhaustive
    assert recall(1) < recall(8)


def test_index_files_round_trip(client, with_gaps: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    dataset.build_index(str(tmp_path / "index"), index_key="IVF2,Flat")
    folder = tmp_path / "index"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".dask_clip-output.json",
        "ids.arrow",
        "index.faiss",
        "index.json",
        "lists.ivfdata",
    ]
    manifest = json.loads((folder / "index.json").read_text())
    assert manifest["counts"] == {"rows": 300, "indexed": 297, "without_embedding": 3}
    assert manifest["column"] == "image_embedding" and manifest["dim"] == WIDTH and manifest["format"] == 2
    ids = pa.ipc.open_file(folder / "ids.arrow").read_all().to_pandas()
    frame = dataset.metadata.compute().reset_index(drop=True)
    assert ids["label"].is_monotonic_increasing and len(ids) == 297
    assert frame["key"].iloc[ids["label"]].tolist() == ids["key"].tolist()  # a label is the global row number
    assert ids["shard"].tolist() == [label // 100 for label in ids["label"]]
    opened = dataset.open_index(str(folder))
    assert opened.index.ntotal == 297 and opened.ids.column("label").to_pylist() == ids["label"].tolist()
    with pytest.raises(UsageError, match="is not empty"):
        dataset.build_index(str(folder))
    dataset.build_index(str(folder), overwrite=True)
    assert json.loads((folder / "index.json").read_text())["index"]["key"] == "IDMap,Flat"


def rewrite_record(parquet: Path, operation: dict) -> None:
    """Record ``operation`` as the provenance of the shard's ``image_embedding`` (values unchanged)."""
    table = pq.read_table(parquet)
    records = FileRecords(id_col="key", columns={"image_embedding": {"operation": operation}})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: records.to_json()}), parquet)


def test_a_stale_index_is_refused(client, with_gaps: Path, tmp_path: Path) -> None:
    for parquet in sorted(with_gaps.glob("*.parquet")):
        rewrite_record(parquet, {"model_dir": "clip-a"})
    index = str(tmp_path / "index")
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    dataset.build_index(index)
    query = np.ones(WIDTH, dtype=np.float32)
    assert len(dataset.search(image=query, k=3, index=index)) == 3

    rewrite_record(with_gaps / "00001.parquet", {"model_dir": "clip-b"})  # re-embedded with another model
    with pytest.raises(StaleIndexError, match=r"index: .*shard 00001: its 'image_embedding' was recomputed"):
        ImageTextPairDataset.from_webdataset(str(with_gaps)).search(image=query, k=3, index=index)

    rewrite_record(with_gaps / "00001.parquet", {"model_dir": "clip-a"})
    table = pq.read_table(with_gaps / "00002.parquet")
    pq.write_table(table.slice(0, 99), with_gaps / "00002.parquet")  # a row removed
    with pytest.raises(StaleIndexError, match=r"shard 00002: its rows changed \(100 rows then, 99 now\)"):
        ImageTextPairDataset.from_webdataset(str(with_gaps)).search(image=query, k=3, index=index)


def test_plain_embedding_values_changed_make_the_index_stale(client, with_gaps: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    dataset.build_index(str(tmp_path / "index"))
    table = pq.read_table(with_gaps / "00000.parquet")
    vectors = np.ones((table.num_rows, WIDTH), dtype=np.float32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), WIDTH)
    pq.write_table(table.set_column(1, "image_embedding", column), with_gaps / "00000.parquet")
    with pytest.raises(StaleIndexError, match="shard 00000: its 'image_embedding' was recomputed or replaced"):
        dataset.search(image=np.ones(WIDTH, dtype=np.float32), k=3, index=str(tmp_path / "index"))


def test_bad_calls_name_the_problem(client, with_gaps: Path, tmp_path: Path) -> None:
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    with pytest.raises(UsageError, match="'IVF-nonsense' is not a faiss index factory string"):
        dataset.build_index(str(tmp_path / "a"), index_key="IVF-nonsense")
    with pytest.raises(UsageError, match="no index here"):
        dataset.search(image=np.ones(WIDTH, dtype=np.float32), index=str(tmp_path / "nothing"))
    dataset.build_index(str(tmp_path / "index"))
    with pytest.raises(UsageError, match="indexes column 'image_embedding' by id 'key', not 'other'"):
        dataset.open_index(str(tmp_path / "index"), embedding_column="other")
    computed = dataset.with_metadata(dataset.metadata, {"image_embedding": Computed({"function": "made up"})})
    with pytest.raises(UsageError, match=r"save_metadata\(\) first"):
        computed.build_index(str(tmp_path / "c"))


def test_the_index_is_chosen_from_the_rows_and_the_memory_budget() -> None:
    assert choose_index(10_000, 768, 2**30).key == "IDMap,Flat"
    flat = choose_index(1_000_000, 768, 4 * 2**30)
    assert (flat.key, flat.nlist, flat.nprobe, flat.train_size) == ("IVF2000,Flat", 2000, 33, 80_000)
    assert choose_index(1_000_000, 768, 2**30).key == "IVF2000,SQ8"  # one byte per dimension fits
    pq_choice = choose_index(1_000_000, 768, 2**29)
    assert pq_choice.key.startswith("IVF2000,PQ") and pq_choice.train_size == 80_000
    m = int(pq_choice.key.split("PQ")[1])
    assert 768 % m == 0 and 1_000_000 * (m + 8) <= 2**29
    with pytest.raises(UsageError, match="cannot hold an index of 1000000 vectors"):
        choose_index(1_000_000, 768, 2**20)


def test_the_default_nprobe_scans_a_share_of_the_lists_at_large_n() -> None:
    """About 16,000 vectors a query up to 1.6M rows (104 of 632 lists at 100k), then 1% of the lists: 16,000
    vectors alone (15 of 4,472 lists) lost recall at 5M rows."""
    assert choose_index(100_000, 768, 4 * 2**30).nprobe == 104
    large = choose_index(5_000_000, 768, 4 * 2**30)
    assert (large.key, large.nprobe) == ("IVF4472,SQ8", 45)
    assert choose_index(50_000_000, 768, 2**30).nprobe == 142  # 14,142 lists
    assert default_nprobe(1000, 1000) == 1000  # never more than the lists


def test_index_search_refuses_what_the_index_does_not_hold(client, with_gaps: Path, tmp_path: Path) -> None:
    """A column this run computes (the index holds the saved one), an index opened for another dataset, an index
    file faiss cannot read and a negative seed are refused by name."""
    dataset = ImageTextPairDataset.from_webdataset(str(with_gaps))
    dataset.build_index(str(tmp_path / "index"))
    query = np.ones(WIDTH, dtype=np.float32)
    computed = dataset.with_metadata(dataset.metadata, {"image_embedding": Computed({"function": "made up"})})
    with pytest.raises(UsageError, match="computed in this run, not read from the shards' files"):
        computed.search(image=query, index=str(tmp_path / "index"))

    other_folder = tmp_path / "other"
    testing.write_embedding_shards(other_folder, unit_rows(300, seed=5), rows_per_shard=100)
    other = ImageTextPairDataset.from_webdataset(str(other_folder))
    with pytest.raises(UsageError, match="open_index\\(dataset, path\\) for this one"):
        other.search(image=query, index=dataset.open_index(str(tmp_path / "index")))

    faiss_file = tmp_path / "index" / "index.faiss"
    faiss_file.write_bytes(b"not an index".ljust(faiss_file.stat().st_size))  # the size the manifest records
    with pytest.raises(IndexFileError, match=r"index\.faiss: faiss cannot read this index file"):
        dataset.search(image=query, index=str(tmp_path / "index"))
    with pytest.raises(UsageError, match="seed must be an integer of at least 0"):
        dataset.build_index(str(tmp_path / "seeded"), seed=-1)


@pytest.mark.parametrize(
    ("key", "needs"),
    [("IVF2,PQ8", "256 centroids per PQ sub-vector"), ("IVF64,Flat", "64 IVF lists")],
)
def test_a_key_too_big_for_the_rows_is_refused_before_training(client, tmp_path: Path, key: str, needs: str) -> None:
    testing.write_embedding_shards(tmp_path / "shards", unit_rows(24, seed=0), rows_per_shard=8)
    dataset = ImageTextPairDataset.from_webdataset(str(tmp_path / "shards"))
    with pytest.raises(UsageError, match=rf"index key '{key}' cannot be trained on 24 rows: .*{needs}") as raised:
        dataset.build_index(str(tmp_path / "index"), index_key=key)
    assert "leave index_key out" in str(raised.value)
    assert not (tmp_path / "index").exists()


def test_a_sample_faiss_cannot_train_on_is_a_data_error_naming_the_key() -> None:
    from dask_clip import DataError, ann

    choice = ann.IndexChoice("IVF2,PQ4", 2, 1, 300)
    sample = np.random.default_rng(0).standard_normal((100, WIDTH)).astype(np.float32)  # fewer than 256
    with pytest.raises(DataError, match=r"'IVF2,PQ4' cannot be trained on 100 vectors .* at least 256 training"):
        ann.train(choice, sample, seed=0)
