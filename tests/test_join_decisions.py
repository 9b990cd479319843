"""How deduplication decisions reach their shards (``Deduplicator.join_decisions``): shards of unequal sizes and
empty ones get exactly their rows' decisions, and the graph grows linearly with the shard count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dask_clip import ImageTextPairDataset, SemanticDeduplicator, testing
from dask_clip.execution import optimized_with_resources

DIM = 8


def unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def write_shards(folder: Path, shards: list[dict[str, np.ndarray]]) -> ImageTextPairDataset:
    """One shard per mapping of key -> vector, in order (an empty mapping: a shard without rows)."""
    schema = pa.schema([("key", pa.string()), ("image_embedding", pa.list_(pa.float32(), DIM))])
    for number, vectors in enumerate(shards):
        rows = [{"key": key, "image_embedding": vector.astype(np.float32).tolist()} for key, vector in vectors.items()]
        testing.write_shard(folder, number, rows, {}, schema=schema, vector_layout="list")
    return ImageTextPairDataset.from_webdataset(str(folder))


def test_unequal_and_empty_shards_get_exactly_their_rows_decisions(client, tmp_path: Path) -> None:
    """Shards of 7, 0, 1, 12, 0 and 3 rows; copies of three vectors spread over them (the copy in the last shard
    of a vector first seen in shard 0 and so on). Every row keeps its shard and order, each copy names the row it
    duplicates and that row's shard, every other row is kept."""
    rng = np.random.default_rng(5)
    originals = {f"o{i}": unit(rng.normal(size=DIM)) for i in range(3)}
    sizes = [7, 0, 1, 12, 0, 3]
    shards: list[dict[str, np.ndarray]] = [{} for _ in sizes]
    copies = {"o0": (0, 5), "o1": (2, 3), "o2": (3, 0)}  # original -> (its shard, the shard of its copy)
    for key, (home, away) in copies.items():
        shards[home][key] = originals[key]
        shards[away][f"copy-of-{key}"] = originals[key]
    for number, size in enumerate(sizes):
        while len(shards[number]) < size:
            shards[number][f"s{number}-{len(shards[number])}"] = unit(rng.normal(size=DIM))
    dataset = write_shards(tmp_path / "shards", shards)
    result = SemanticDeduplicator(n_clusters=1, eps=0.001, which_to_keep="easy")(dataset)
    stem_of = {key: f"{number:05d}" for number, vectors in enumerate(shards) for key in vectors}
    wanted = {f"copy-of-{key}": key for key in copies} | {key: f"copy-of-{key}" for key in copies}
    parts = result.metadata.to_delayed()
    assert len(parts) == len(sizes)
    for number, (part, expected) in enumerate(zip(parts, shards, strict=True)):
        frame = part.compute()
        assert frame["key"].tolist() == list(expected), number
        removed = frame.loc[~frame["keep"]]
        assert set(removed["key"]) <= set(wanted), number
        for key, duplicate_of, shard in removed[["key", "duplicate_of", "duplicate_of_shard"]].itertuples(index=False):
            assert duplicate_of == wanted[key]
            assert shard == stem_of[duplicate_of]
        assert frame.loc[frame["keep"], ["duplicate_of", "duplicate_of_shard", "similarity"]].isna().all().all()
    frame = result.metadata.compute()
    assert (~frame["keep"]).sum() == len(copies)  # one row of each pair removed, whichever ranks later


def tasks(dataset: ImageTextPairDataset) -> int:
    optimized, _ = optimized_with_resources(SemanticDeduplicator(n_clusters=2)(dataset).metadata)
    return len(optimized.__dask_graph__())


@pytest.mark.parametrize("shard_counts", [(10, 40, 160)])
def test_the_graph_grows_linearly_with_the_shard_count(client, tmp_path: Path, shard_counts) -> None:
    """Every pass is a fixed number of tasks per shard, the join included: the task count's growth from one
    shard count to the next is that of the shard count. (A tasks shuffle for the join grows faster: 212, 1,181
    and 6,395 tasks for 10, 40 and 160 shards.)"""
    rng = np.random.default_rng(0)
    counts = []
    for shard_count in shard_counts:
        vectors = [{f"{shard_count}-{i}-{j}": rng.normal(size=DIM) for j in range(2)} for i in range(shard_count)]
        counts.append(tasks(write_shards(tmp_path / str(shard_count), vectors)))
    per_shard = [count / shard_count for count, shard_count in zip(counts, shard_counts, strict=True)]
    assert max(per_shard) - min(per_shard) <= 1, counts
