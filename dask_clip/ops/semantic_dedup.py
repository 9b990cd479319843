"""Semantic deduplication (SemDeDup): cluster the embeddings, then drop near-duplicates within each cluster.

Three passes over the shards, each holding one shard's rows at a time:

1. **Sample**: each shard gives a seeded sample of its unit vectors (``kmeans_sample_size`` in all); one task
   fits a ``ClusterTree`` on them (``dask_clip.ops.clustering``: faiss spherical k-means, oversized clusters
   split, leaves packed into as many shuffle partitions as there are shards).
2. **Assign**: each shard's rows get their cluster (a leaf of the tree), their cosine to its centroid and
   their partition; Dask's P2P shuffle (on disk) brings each partition's clusters together, the vectors
   travelling as ``binary`` values. Within a cluster, items are ranked by the keep policy; an item whose
   cosine similarity to an earlier-ranked item is ``>= 1 - eps`` is a duplicate of the most similar one.
3. **Join**: the decisions go back to their shard (a shuffle of small rows, on the shard number) and join
   the rows by id.

Rows without an embedding are kept. Similar images that k-means puts in different clusters are
never compared (the price of clustering); more clusters make that likelier, fewer make clusters
bigger (pairwise cost grows with the square of a cluster's size).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
from dask.delayed import Delayed

from dask_clip.arguments import at_least, one_of
from dask_clip.columns import (
    BOOL,
    STRING,
    binary_to_vectors,
    embedding_width,
    empty_column,
    unit_embeddings,
    vectors_to_binary,
)
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import SHARD_COLUMN, ShardTask, map_shuffled, shuffle_on_disk
from dask_clip.ops.clustering import ClusterTree, fit_cluster_tree
from dask_clip.ops.deduplicator import DUPLICATE_OF, DUPLICATE_OF_SHARD, KEEP, SIMILARITY, STEM, Deduplicator

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

KEEP_POLICIES = ("hard", "easy", "random")
_PARTITION = "_dask_clip_partition"
_CLUSTER = "_dask_clip_cluster"
_CENTROID_COSINE = "_dask_clip_centroid_cosine"
_VECTOR = "_dask_clip_vector"
_ID = "_dask_clip_id"
_WEIGHT = "_dask_clip_weight"
SIMILARITY_BLOCK = 1024
"""Items of a cluster compared against all earlier-ranked ones at once (bounds a ``(block, n)`` matrix)."""


class SemanticDeduplicator(Deduplicator):
    """``deduplicator(dataset)`` -> a new dataset with a keep, a duplicate-of and a similarity column.

    ``eps``: an item is a duplicate when its cosine similarity to an earlier-ranked item of its
    cluster is ``>= 1 - eps``. Common choices: ``eps=0.01`` (0.99+: exact copies, re-encodes),
    ``eps=0.05`` (0.95+: near-duplicates such as crops and resizes), ``eps=0.1`` (0.90+: similar
    images, which removes much more). Check a sample of removed pairs before trusting a threshold.

    ``which_to_keep``: ``"hard"`` keeps the item farthest from its cluster's centroid first (the
    SemDeDup default), ``"easy"`` the closest, ``"random"`` a seeded random one.

    ``n_clusters`` centroids are fitted (faiss spherical k-means, ``max_iter`` iterations, ``seed``) on a
    seeded sample of ``kmeans_sample_size`` unit vectors drawn evenly from the shards. A cluster estimated
    (from the sample) to hold more than ``max_cluster_size`` rows is split by a k-means of its own into
    clusters of at most about that size (None: never split); rows are compared only within their final
    cluster. A cluster of (nearly) identical vectors cannot be split and stays whole.

    Writes the ``Deduplicator`` columns (their names are keyword-only options): a removed row names
    the most similar earlier-ranked item (which may itself be a duplicate), its shard and their cosine.

    Memory per worker: one shard's rows at a time while sampling, assigning and joining; the sample
    (``kmeans_sample_size`` x D float32) in the one task that fits the clusters; and in the within-cluster
    pass one shuffle partition (about as many rows as a shard, or one cluster when that is larger, so at
    most about ``max_cluster_size`` rows) plus a ``SIMILARITY_BLOCK`` x cluster-size matrix. Nothing grows
    with the number of shards: the P2P shuffle keeps the vectors on the workers' disks in between. The
    result is lazy; computing it reads each shard's rows three times (one per pass), so when the
    embeddings come from an embedder, ``save_metadata`` and read them back first.
    """

    def __init__(
        self,
        *,
        eps: float = 0.01,
        n_clusters: int = 1000,
        which_to_keep: str = "hard",
        embedding_column: str = "image_embedding",
        seed: int = 0,
        max_iter: int = 30,
        kmeans_sample_size: int = 100_000,
        max_cluster_size: int | None = 100_000,
        keep_column: str = "keep",
        duplicate_of_column: str = "duplicate_of",
        duplicate_of_shard_column: str = "duplicate_of_shard",
        similarity_column: str = "similarity",
    ) -> None:
        super().__init__(
            keep_column=keep_column,
            duplicate_of_column=duplicate_of_column,
            duplicate_of_shard_column=duplicate_of_shard_column,
            similarity_column=similarity_column,
        )
        if not 0 <= eps < 1:
            raise UsageError(f"eps must be in [0, 1), not {eps}")
        self.eps = eps
        self.n_clusters = at_least("n_clusters", n_clusters)
        self.which_to_keep = one_of("which_to_keep", which_to_keep, KEEP_POLICIES)
        self.embedding_column = embedding_column
        self.seed = at_least("seed", seed, 0)
        self.max_iter = at_least("max_iter", max_iter)
        self.kmeans_sample_size = at_least("kmeans_sample_size", kmeans_sample_size)
        self.max_cluster_size = None if max_cluster_size is None else at_least("max_cluster_size", max_cluster_size)

    def config(self) -> dict[str, Any]:
        """The options that determine the output, recorded next to it in the parquet."""
        return {
            "eps": self.eps,
            "n_clusters": self.n_clusters,
            "which_to_keep": self.which_to_keep,
            "embedding_column": self.embedding_column,
            "seed": self.seed,
            "max_iter": self.max_iter,
            "kmeans_sample_size": self.kmeans_sample_size,
            "max_cluster_size": self.max_cluster_size,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        embedding_width(dataset.meta, self.embedding_column, self.name)

    def cluster_tree(self, dataset: ImageTextPairDataset) -> Delayed:
        """The clusters this deduplicator fits to ``dataset`` (pass 1), lazily: a delayed ``ClusterTree``.

        The vectors' width is the column type's (which a file's footer records, ``io.vectors``); where no type
        says it (a list column of another tool), each shard's sample tells it and the fitting task checks them."""
        dim = embedding_width(dataset.meta, self.embedding_column, self.name)
        per_shard = math.ceil(self.kmeans_sample_size / len(dataset.shards))
        sample_meta = pd.DataFrame(
            {_VECTOR: empty_column(pd.ArrowDtype(pa.large_binary())), _WEIGHT: empty_column("float64")}
        )
        samples = dataset.map_shards(
            sample_shard,
            sample_meta,
            label=f"{self.name}-sample",
            embedding_column=self.embedding_column,
            dim=dim,
            count=per_shard,
            seed=self.seed,
        ).to_delayed()  # optimised apart from the other passes: each shard is read by its own task here
        return dask.delayed(fit_tree)(
            samples,
            dim=dim,
            column=self.embedding_column,
            stems=[shard.stem for shard in dataset.shards],
            n_clusters=self.n_clusters,
            max_cluster_size=self.max_cluster_size,
            partitions=len(dataset.shards),
            seed=self.seed,
            max_iter=self.max_iter,
        )

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """Cluster, decide within clusters, and join the decisions back to each shard's rows."""
        meta = dataset.meta
        id_col = dataset.id_col
        assigned_meta = pd.DataFrame(
            {
                _PARTITION: empty_column("int64"),
                SHARD_COLUMN: empty_column("int64"),
                STEM: empty_column(STRING),
                id_col: meta[id_col].iloc[:0],
                _CLUSTER: empty_column("int64"),
                _CENTROID_COSINE: empty_column("float32"),
                _VECTOR: empty_column(pd.ArrowDtype(pa.large_binary())),
            }
        )
        assigned = dataset.map_shards(
            assign_shard,
            assigned_meta,
            label=f"{self.name}-assign",
            tree=self.cluster_tree(dataset),
            embedding_column=self.embedding_column,
        )
        # optimised apart: each shard is read inside its assign task, which waits for the clusters, so no
        # shard's rows wait in memory for them, nor for the join pass, which reads the shard again
        assigned = dd.from_delayed(assigned.to_delayed(), meta=assigned_meta, verify_meta=False)
        by_partition = shuffle_on_disk(assigned, _PARTITION, len(dataset.shards))
        decisions = map_shuffled(
            cluster_decisions,
            by_partition,
            empty_decisions(id_col, meta[id_col].dtype),
            label=f"{self.name}-decide",
            threshold=1 - self.eps,
            which_to_keep=self.which_to_keep,
            seed=self.seed,
            id_col=id_col,
            id_dtype=meta[id_col].dtype,
        )
        return self.join_decisions(dataset, decisions, output_meta)


def sample_shard(
    rows: pd.DataFrame, task: ShardTask, embedding_column: str, dim: int | None, count: int, seed: int
) -> pd.DataFrame:
    """Up to ``count`` of one shard's usable unit vectors (of width ``dim``; None: its first vector's), chosen with
    a generator seeded by ``(seed, shard)``, each with the number of the shard's usable rows it stands for."""
    vectors = unit_embeddings(rows[embedding_column], dim, rows[task.id_col])[1]
    if len(vectors) > count:
        chosen = np.random.default_rng([seed, task.shard.index]).choice(len(vectors), count, replace=False)
        weight, vectors = len(vectors) / count, vectors[np.sort(chosen)]
    else:
        weight = 1.0
    return pd.DataFrame({_VECTOR: vectors_to_binary(vectors), _WEIGHT: np.full(len(vectors), weight)})


def fit_tree(
    samples: list[pd.DataFrame], dim: int | None, column: str, stems: list[str], **options: Any
) -> ClusterTree:
    """The ``ClusterTree`` of the shards' samples (``fit_cluster_tree``'s ``options``), of vectors of width ``dim``
    (None: the samples' own, which must agree: ``ColumnError`` naming two shards and their widths otherwise, or
    naming ``column`` when no shard holds a vector)."""
    if dim is None:
        widths = {stem: binary_width(sample[_VECTOR]) for stem, sample in zip(stems, samples, strict=True)}
        found = {stem: width for stem, width in widths.items() if width is not None}
        if not found:
            raise ColumnError(f"no shard holds an embedding in {column!r}")
        (first, dim), *others = found.items()
        other = next(((stem, width) for stem, width in others if width != dim), None)
        if other is not None:
            raise ColumnError(
                f"column {column!r} holds {dim}-d embeddings in shard {first} but {other[1]}-d ones in shard "
                f"{other[0]}: every embedding must come from the same model"
            )
    vectors = np.concatenate([binary_to_vectors(s[_VECTOR], dim) for s in samples])
    weights = np.concatenate([s[_WEIGHT].to_numpy() for s in samples])
    return fit_cluster_tree(vectors, weights, **options)


def assign_shard(rows: pd.DataFrame, task: ShardTask, tree: ClusterTree, embedding_column: str) -> pd.DataFrame:
    """One shard's usable rows with their partition, shard number and stem, id, cluster, cosine to its centroid
    and unit vector (``binary``, for the shuffle)."""
    valid, vectors = unit_embeddings(rows[embedding_column], tree.width, rows[task.id_col])
    cluster, cosine, partition = tree.assign(vectors)
    return pd.DataFrame(
        {
            _PARTITION: partition,
            SHARD_COLUMN: np.full(len(vectors), task.shard.index, dtype=np.int64),
            STEM: pd.array([task.shard.stem] * len(vectors), dtype=STRING),
            task.id_col: rows[task.id_col].array[valid],
            _CLUSTER: cluster,
            _CENTROID_COSINE: cosine,
            _VECTOR: vectors_to_binary(vectors),
        }
    )


def keep_order(centroid_cosines: np.ndarray, which_to_keep: str, seed: int, cluster: int) -> np.ndarray:
    """Positions of a cluster's items (sorted by id) in the order the keep policy prefers them."""
    if which_to_keep == "hard":
        return np.argsort(centroid_cosines, kind="stable")
    if which_to_keep == "easy":
        return np.argsort(-centroid_cosines, kind="stable")
    return np.random.default_rng([seed, cluster]).permutation(len(centroid_cosines))


def best_earlier_match(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit vectors ``(n, D)`` in rank order: each one's highest cosine to an earlier row and that row.

    Returns ``float32 (n,)`` (``-inf`` for the first row) and ``int64 (n,)`` (``-1`` for the first row).
    """
    n = vectors.shape[0]
    best = np.full(n, -np.inf, dtype=np.float32)
    match = np.full(n, -1, dtype=np.int64)
    for start in range(1, n, SIMILARITY_BLOCK):
        stop = min(start + SIMILARITY_BLOCK, n)
        cosines = vectors[start:stop] @ vectors[:stop].T
        cosines[np.arange(stop)[None, :] >= np.arange(start, stop)[:, None]] = -np.inf
        match[start:stop] = np.argmax(cosines, axis=1)
        best[start:stop] = cosines[np.arange(stop - start), match[start:stop]]
    return best, match


def binary_width(column: pd.Series) -> int | None:
    """The width of the vectors in a column made by ``vectors_to_binary`` (None when it holds none)."""
    return len(column.iloc[0]) // 4 if len(column) else None


def cluster_decisions(
    frame: pd.DataFrame, threshold: float, which_to_keep: str, seed: int, id_col: str, id_dtype: Any
) -> pd.DataFrame:
    """Whole clusters of rows (vectors as ``binary``) -> one decision per row: shard, id, keep, duplicate_of,
    duplicate_of_shard (a stem), similarity. Ids come back as ``id_dtype`` (the shuffle may have turned them
    into Python objects)."""
    decided = []
    for cluster, group in frame.groupby(_CLUSTER, sort=True):
        # the same order whatever order the shuffle gave, ids repeated across shards included
        group = group.sort_values([id_col, SHARD_COLUMN], kind="stable")
        group = group.iloc[keep_order(group[_CENTROID_COSINE].to_numpy(), which_to_keep, seed, int(cluster))]
        best, match = best_earlier_match(binary_to_vectors(group[_VECTOR], binary_width(group[_VECTOR])))
        duplicate = best >= threshold
        ids = pd.array(group[id_col], dtype=id_dtype)
        stems = pd.array(group[STEM], dtype=STRING)
        decided.append(decision_frame(group[SHARD_COLUMN], ids, stems, ~duplicate, best, match))
    if not decided:
        return empty_decisions(id_col, id_dtype)
    return pd.concat(decided, ignore_index=True).rename(columns={_ID: id_col})


def decision_frame(
    shards: pd.Series, ids: Any, stems: Any, keep: np.ndarray, best: np.ndarray, match: np.ndarray
) -> pd.DataFrame:
    """Decisions for a cluster's rows (``ids`` and their shards' ``stems``, in rank order): removed rows name
    their match (id and stem) and its cosine."""
    similarity = pa.array(np.minimum(best, 1.0).astype(np.float64), mask=keep)
    matched = np.where(keep, -1, match)
    return pd.DataFrame(
        {
            SHARD_COLUMN: shards.to_numpy(dtype=np.int64),
            _ID: ids,
            KEEP: pd.array(keep, dtype=BOOL),
            DUPLICATE_OF: ids.take(matched, allow_fill=True),
            DUPLICATE_OF_SHARD: stems.take(matched, allow_fill=True),
            SIMILARITY: pd.arrays.ArrowExtensionArray(similarity),
        }
    )


def empty_decisions(id_col: str, id_dtype: Any) -> pd.DataFrame:
    """A frame of no decisions, with the columns and types of ``cluster_decisions``' result."""
    empty = decision_frame(
        pd.Series([], dtype="int64"),
        pd.array([], dtype=id_dtype),
        pd.array([], dtype=STRING),
        np.zeros(0, bool),
        np.zeros(0),
        np.zeros(0, np.int64),
    )
    return empty.rename(columns={_ID: id_col})
