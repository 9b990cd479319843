"""Synthetic embeddings for the scale benchmarks: a dask_clip dataset folder of unit vectors with planted
near-duplicate groups, written one shard at a time (memory bounded by one shard, whatever ``n``).

Two kinds of data:

- **clustered** (the default): the vectors look like CLIP embeddings in the way that matters to clustering:
  each row belongs to one of ``topics`` random directions (its cosine to the topic's direction about 0.7, to
  another row of its topic about 0.5, to rows of other topics about 0);
- **isotropic** (``isotropic=True``): rows drawn uniformly on the sphere, no structure for k-means to find, so
  that cluster boundaries cut through the data anywhere (what uniform-looking clutter does to SemDeDup).

``groups`` planted groups of near-copies (``group_sizes``: 2 to 4 members by default) are spread over random
shards: every member is its group's base vector (a row like the others) plus noise orthogonal to it, so that
two members have cosine ``pair_cosine`` (within about 1e-4). Other rows come from 768-d Gaussian draws, so two of
them are never that similar: the planted pairs are the duplicate pairs (``exact_pairs`` checks it on a subset).

Layout: ``00000.tar`` (empty: no images) + ``00000.parquet`` with ``key`` (string, ``SSSSSRRRRR``: shard and
row) and ``image_embedding`` (``fixed_size_list<float32>[D]``), as ``dask_clip`` reads them. The planted groups
are written to ``planted.parquet`` next to (not in) the dataset folder: ``key``, ``group``.
"""

from __future__ import annotations

import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TOPIC_COSINE = 0.7
"""Cosine of a row to its topic's direction."""


@dataclass(frozen=True)
class Synthetic:
    """What was written: the dataset folder, the planted groups' file and the sizes."""

    dataset: Path
    planted: Path
    rows: int
    shards: int
    groups: int
    planted_rows: int


def key_of(shard: int, row: int) -> str:
    return f"{shard:05d}{row:05d}"


def unit_rows(array: np.ndarray) -> np.ndarray:
    return (array / np.linalg.norm(array, axis=1, keepdims=True)).astype(np.float32)


def topic_rows(rng: np.random.Generator, topics: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows, each about one random topic (uniform on the sphere when there are no ``topics``, an array of
    shape ``(0, D)``): ``float32 (count, D)`` unit vectors."""
    dim = topics.shape[1]
    if len(topics) == 0:
        return unit_rows(rng.standard_normal((count, dim), dtype=np.float32))
    spread = math.sqrt(1 / TOPIC_COSINE**2 - 1)  # noise of this norm gives cosine TOPIC_COSINE to the topic
    chosen = topics[rng.integers(len(topics), size=count)]
    noise = rng.standard_normal((count, dim), dtype=np.float32) * np.float32(spread / math.sqrt(dim))
    return unit_rows(chosen + noise)


def group_members(seed: int, group: int, members: int, topics: np.ndarray, pair_cosine: float) -> np.ndarray:
    """The ``members`` vectors of planted ``group`` (a function of the seed and the group only, so any shard can
    make its own members): ``float32 (members, D)``, pairwise cosine ``pair_cosine``."""
    rng = np.random.default_rng([seed, 1, group])
    base = topic_rows(rng, topics, 1)[0].astype(np.float64)
    noise = rng.standard_normal((members, base.shape[0]))
    noise -= np.outer(noise @ base, base)  # orthogonal to the base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    # members base + t * n_i with n_i orthogonal unit noise: cosine of two members = 1 / (1 + t^2)
    t = math.sqrt(1 / pair_cosine - 1)
    return unit_rows(base[None, :] + t * noise)


def write_synthetic(
    folder: Path,
    n: int,
    *,
    dim: int = 768,
    rows_per_shard: int = 10_000,
    topics: int = 1000,
    planted_share: float = 0.01,
    pair_cosine: float = 0.995,
    group_sizes: tuple[int, int] = (2, 4),
    isotropic: bool = False,
    seed: int = 0,
) -> Synthetic:
    """Write ``n`` rows under ``folder/shards`` (see the module's docstring) and ``folder/planted.parquet``.

    About ``planted_share`` of the rows belong to planted groups (``group_sizes[0]`` to ``group_sizes[1]``
    members each, at random rows of the whole dataset: usually in different shards, not always). ``isotropic``:
    no topics, rows uniform on the sphere.
    """
    dataset = folder / "shards"
    dataset.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 0])
    directions = unit_rows(rng.standard_normal((0 if isotropic else topics, dim), dtype=np.float32))
    shards = math.ceil(n / rows_per_shard)
    shard_rows = [min(rows_per_shard, n - s * rows_per_shard) for s in range(shards)]

    # the layout of the planted rows (small: a few per cent of n): group, member, shard and row of each
    mean_size = (group_sizes[0] + group_sizes[1]) / 2
    sizes = rng.integers(group_sizes[0], group_sizes[1] + 1, size=max(1, int(n * planted_share / mean_size)))
    sizes = sizes[np.cumsum(sizes) <= n * planted_share] if n * planted_share >= 2 else sizes[:1]
    slots = rng.permutation(n)[: int(sizes.sum())]  # distinct global rows
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    member_of = np.concatenate([np.arange(size) for size in sizes])
    planted = pd.DataFrame(
        {"shard": slots // rows_per_shard, "row": slots % rows_per_shard, "group": group_of, "member": member_of}
    )
    planted["key"] = [key_of(s, r) for s, r in zip(planted["shard"], planted["row"], strict=True)]

    for shard in range(shards):
        shard_rng = np.random.default_rng([seed, 2, shard])
        vectors = topic_rows(shard_rng, directions, shard_rows[shard])
        here = planted[planted["shard"] == shard]
        for group, members in here.groupby("group"):
            vectors[members["row"].to_numpy()] = group_members(
                seed, int(group), int(sizes[group]), directions, pair_cosine
            )[members["member"].to_numpy()]
        write_shard(dataset, shard, vectors)
    planted[["key", "group"]].to_parquet(folder / "planted.parquet")
    return Synthetic(dataset, folder / "planted.parquet", n, shards, len(sizes), len(planted))


def write_shard(folder: Path, shard: int, vectors: np.ndarray) -> None:
    """``NNNNN.parquet`` (``key``, ``image_embedding``) and an empty ``NNNNN.tar``."""
    stem = f"{shard:05d}"
    embeddings = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
    keys = pa.array([key_of(shard, row) for row in range(len(vectors))], type=pa.string())
    pq.write_table(pa.table({"key": keys, "image_embedding": embeddings}), folder / f"{stem}.parquet")
    with tarfile.open(folder / f"{stem}.tar", "w"):
        pass


def read_vectors(dataset: Path, shards: list[int]) -> tuple[list[str], np.ndarray]:
    """The keys and ``float32 (n, D)`` vectors of some shards of a synthetic dataset."""
    keys, vectors = [], []
    for shard in shards:
        table = pq.read_table(dataset / f"{shard:05d}.parquet")
        column = table.column("image_embedding").combine_chunks()
        keys += table.column("key").to_pylist()
        vectors.append(column.flatten().to_numpy().reshape(len(column), -1))
    return keys, np.concatenate(vectors)
