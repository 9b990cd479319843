"""Semantic deduplication (SemDeDup): cluster the embeddings, then drop near-duplicates within each cluster.

Three passes over the shards, each holding one shard's rows at a time:

1. **Sample**: each shard gives a seeded sample of its unit vectors (``kmeans_sample_size`` in all); one task
   fits a ``ClusterTree`` on them (``dask_clip.ops.clustering``: faiss spherical k-means, oversized clusters
   split, leaves packed into as many shuffle partitions as there are shards).
2. **Assign**: each shard's rows get their cluster (a leaf of the tree, their *home*), their rank key and
   their partition, and a copy of each row goes to up to ``max_copies`` other clusters where it could have a
   duplicate (``ClusterTree.neighbours``: by the triangle inequality on the sphere, a duplicate of ``y`` can
   only be at home in a cluster whose centroid is at most ``2 * arccos(1 - eps)`` further from ``y`` than
   ``y``'s own), nearest first. Dask's P2P shuffle (on disk) brings each partition's clusters together, the
   vectors travelling as ``binary`` values.
3. **Decide**: within a cluster, its rows and the copies sent to it are ranked one global way (the keep
   policy's value, then id, then shard: the same order in every cluster); a row at home is compared with every
   earlier-ranked one, a copy with the earlier-ranked rows at home (two copies meet where they are at home).
   A row is removed if and only if an earlier-ranked row it was compared with, in its home or a cluster it was
   copied to, is a duplicate (cosine ``>= 1 - eps``); it names the most similar one. Its home cluster gives its
   one decision; a copy only adds the duplicate it found, if any.
4. **Join**: the decisions go back to their shard (a shuffle of small rows, on the shard number) and join
   the rows by id.

Rows without an embedding are kept. Duplicates that k-means puts in different clusters are compared as long
as each row's candidate clusters fit in ``max_copies``; past that (rows far from every centroid, many
centroids at about the same angle: high-dimensional data without structure) a pair can be missed, rarely
(see the README for measurements). More copies cost shuffle volume and comparisons in proportion.
"""

from __future__ import annotations

import logging
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
from dask_clip.execution import SHARD_COLUMN, ShardTask, compute, map_shuffled, shuffle_on_disk
from dask_clip.ops.clustering import ClusterTree, faiss_threads, fit_cluster_tree, usable_cores
from dask_clip.ops.deduplicator import DUPLICATE_OF, DUPLICATE_OF_SHARD, KEEP, SIMILARITY, STEM, Deduplicator

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

logger = logging.getLogger(__name__)

KEEP_POLICIES = ("hard", "easy", "random")
_PARTITION = "_dask_clip_partition"
_CLUSTER = "_dask_clip_cluster"
_RANK = "_dask_clip_rank"
_COPY = "_dask_clip_copy"
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

    ``which_to_keep``: ``"hard"`` keeps the item farthest from its (home) cluster's centroid first (the
    SemDeDup default), ``"easy"`` the closest, ``"random"`` a seeded random one (a draw per row, seeded by
    ``seed`` and its shard). Ties go to the smaller id, then the earlier shard.

    ``n_clusters`` centroids are fitted (faiss spherical k-means, ``max_iter`` iterations, ``seed``) on a
    seeded sample of ``kmeans_sample_size`` unit vectors drawn evenly from the shards. A cluster estimated
    (from the sample) to hold more than ``max_cluster_size`` rows is split by a k-means of its own into
    clusters of at most about that size (None: never split). A cluster whose sample rows all lie within half
    the duplicate angle (``arccos(1 - eps) / 2``) of their mean direction is not split: its rows are all
    duplicates of each other, and it stays whole.

    ``max_copies``: besides its own cluster, a row is compared in up to that many other clusters (nearest
    first) where it could have a duplicate by the angle bound in ``ClusterTree.neighbours``. 0 compares rows
    only within their own cluster (pairs across a cluster boundary are missed); the default, 2, found every
    planted pair in the benchmarks, where 1 missed some on data without structure (README). ``copy_counts``
    reports how many rows were copied.

    Writes the ``Deduplicator`` columns (their names are keyword-only options): a removed row names
    the most similar earlier-ranked item (which may itself be a duplicate), its shard and their cosine.

    Memory per worker: one shard's rows at a time while sampling, assigning and joining; the sample
    (``kmeans_sample_size`` x D float32) in the one task that fits the clusters; and in the within-cluster
    pass one shuffle partition (about as many rows as a shard, or one cluster when that is larger, so at
    most about ``max_cluster_size`` rows, plus the copies sent to it: up to ``max_copies`` times as many) plus a
    ``SIMILARITY_BLOCK`` x cluster-size matrix. Nothing grows
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
        max_copies: int = 2,
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
        self.max_copies = at_least("max_copies", max_copies, 0)

    @property
    def duplicate_angle(self) -> float:
        """``arccos(1 - eps)``: the largest angle (radians) between two duplicates."""
        return math.acos(1 - self.eps)

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
            "max_copies": self.max_copies,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        embedding_width(dataset.meta, self.embedding_column, self.name)

    def cluster_tree(self, dataset: ImageTextPairDataset) -> Delayed:
        """The clusters this deduplicator fits to ``dataset`` (pass 1), lazily: a delayed ``ClusterTree``.

        The vectors' width is the column type's (which a file's footer records, ``io.vectors``); where no type
        says it (a list column of another tool), each shard's sample tells it and the fitting task checks them."""
        return sampled_cluster_tree(
            dataset,
            self.embedding_column,
            self.kmeans_sample_size,
            self.name,
            n_clusters=self.n_clusters,
            max_cluster_size=self.max_cluster_size,
            partitions=len(dataset.shards),
            seed=self.seed,
            max_iter=self.max_iter,
            max_radius=self.duplicate_angle / 2,
        )

    def copy_counts(self, dataset: ImageTextPairDataset) -> pd.DataFrame:
        """How many of each shard's rows are compared in other clusters than their own, computed now (the sample
        and the assign passes: it reads every shard twice): one row per shard, ``stem``, ``rows`` (with a usable
        embedding), ``copied_rows`` and ``copies`` (at most ``max_copies`` per row)."""
        counts_meta = pd.DataFrame(
            {
                "stem": empty_column(STRING),
                "rows": empty_column("int64"),
                "copied_rows": empty_column("int64"),
                "copies": empty_column("int64"),
            }
        )
        return compute(self.with_neighbours(dataset, count_copies, counts_meta, "copies")).reset_index(drop=True)

    def with_neighbours(
        self, dataset: ImageTextPairDataset, function: Any, meta: pd.DataFrame, label: str, **options: Any
    ) -> dd.DataFrame:
        """``function(rows, task, tree, embedding_column, slack, max_copies, **options)`` on each shard, with the
        cluster tree of ``dataset`` and the slack of the angle bound (``ClusterTree.neighbours``)."""
        return dataset.map_shards(
            function,
            meta,
            label=f"{self.name}-{label}",
            tree=self.cluster_tree(dataset),
            embedding_column=self.embedding_column,
            slack=2 * self.duplicate_angle,
            max_copies=self.max_copies,
            **options,
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
                _RANK: empty_column("float64"),
                _COPY: empty_column("bool"),
                _VECTOR: empty_column(pd.ArrowDtype(pa.large_binary())),
            }
        )
        assigned = self.with_neighbours(
            dataset, assign_shard, assigned_meta, "assign", which_to_keep=self.which_to_keep, seed=self.seed
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
            id_col=id_col,
            id_dtype=meta[id_col].dtype,
        )
        return self.join_decisions(dataset, decisions, output_meta)

    def _decided(self, rows: pd.DataFrame, task: ShardTask, decisions: pd.DataFrame) -> pd.DataFrame:
        """A row's decision from its home cluster, or a duplicate a copy of it found: ``one_decision_per_row``."""
        return super()._decided(rows, task, one_decision_per_row(decisions, task.id_col))


def sampled_cluster_tree(
    dataset: ImageTextPairDataset, column: str, sample_size: int, purpose: str, **options: Any
) -> Delayed:
    """A delayed ``ClusterTree`` of embedding ``column``, fitted (``fit_cluster_tree``'s ``options``, ``seed``
    among them) on a seeded sample of about ``sample_size`` unit vectors drawn evenly from the shards; ``purpose``
    names the tasks and errors. Each shard is read by its own task, optimised apart from any later pass."""
    dim = embedding_width(dataset.meta, column, purpose)
    per_shard = math.ceil(sample_size / len(dataset.shards))
    sample_meta = pd.DataFrame(
        {_VECTOR: empty_column(pd.ArrowDtype(pa.large_binary())), _WEIGHT: empty_column("float64")}
    )
    samples = dataset.map_shards(
        sample_shard,
        sample_meta,
        label=f"{purpose}-sample",
        embedding_column=column,
        dim=dim,
        count=per_shard,
        seed=options["seed"],
    ).to_delayed()
    stems = [shard.stem for shard in dataset.shards]
    return dask.delayed(fit_tree)(samples, dim=dim, column=column, stems=stems, **options)


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
    # faiss on every core: Dask starts workers with OMP_NUM_THREADS=1, but every later task waits for this one, so
    # the cores it would leave idle have nothing else of this computation to run (same centroids at any count)
    with faiss_threads(usable_cores()):
        return fit_cluster_tree(vectors, weights, **options)


def assign_shard(
    rows: pd.DataFrame,
    task: ShardTask,
    tree: ClusterTree,
    embedding_column: str,
    which_to_keep: str,
    seed: int,
    slack: float,
    max_copies: int,
) -> pd.DataFrame:
    """One shard's usable rows in their home cluster, then their copies in up to ``max_copies`` other clusters
    (``ClusterTree.place`` with ``slack``): partition, shard number and stem, id, cluster, rank key
    (``rank_keys``, a row's own on its copies), whether it is a copy, and unit vector (``binary``, for the
    shuffle). Logs how many rows were copied."""
    valid, vectors = unit_embeddings(rows[embedding_column], tree.width, rows[task.id_col])
    cluster, cosine, _, copied, copy_cluster = tree.place(vectors, slack, max_copies)
    rank = rank_keys(cosine, which_to_keep, seed, task.shard.index, np.flatnonzero(valid))
    logger.info(
        "%s: %d of %d rows copied to other clusters (%d copies)",
        task.shard.stem,
        len(np.unique(copied)),
        len(vectors),
        len(copied),
    )
    instance = np.concatenate([np.arange(len(vectors)), copied])
    cluster = np.concatenate([cluster, copy_cluster])
    return pd.DataFrame(
        {
            _PARTITION: tree.partition_of[cluster],
            SHARD_COLUMN: np.full(len(instance), task.shard.index, dtype=np.int64),
            STEM: pd.array([task.shard.stem] * len(instance), dtype=STRING),
            task.id_col: rows[task.id_col].array[valid].take(instance),
            _CLUSTER: cluster,
            _RANK: rank[instance],
            _COPY: np.arange(len(instance)) >= len(vectors),
            _VECTOR: vectors_to_binary(vectors[instance]),
        }
    )


def count_copies(
    rows: pd.DataFrame, task: ShardTask, tree: ClusterTree, embedding_column: str, slack: float, max_copies: int
) -> pd.DataFrame:
    """One shard's row for ``SemanticDeduplicator.copy_counts``."""
    vectors = unit_embeddings(rows[embedding_column], tree.width, rows[task.id_col])[1]
    copied = tree.place(vectors, slack, max_copies)[3]
    return pd.DataFrame(
        {
            "stem": pd.array([task.shard.stem], dtype=STRING),
            "rows": [len(vectors)],
            "copied_rows": [len(np.unique(copied))],
            "copies": [len(copied)],
        }
    )


def rank_keys(
    centroid_cosines: np.ndarray, which_to_keep: str, seed: int, shard: int, positions: np.ndarray
) -> np.ndarray:
    """Each row's key in the keep policy's order (smaller ranks earlier): ``float64 (n,)`` from its cosine to its home
    centroid (``"hard"``: ascending, ``"easy"``: descending) or, for ``"random"``, a draw of a generator seeded by
    ``(seed, shard)`` for the row at each of ``positions`` in its shard. A row's key is the same in every cluster
    it is compared in."""
    if which_to_keep == "hard":
        return centroid_cosines.astype(np.float64)
    if which_to_keep == "easy":
        return -centroid_cosines.astype(np.float64)
    draws = np.random.default_rng([seed, shard]).random(int(positions.max()) + 1 if len(positions) else 0)
    return draws[positions]


def best_earlier_match(vectors: np.ndarray, copy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit vectors ``(n, D)`` in rank order, some of them copies (``bool (n,)``): each one's highest cosine to an
    earlier row and that row (the earliest of equals). A row at home is compared with every earlier one, a copy
    with the earlier rows at home only: two copies meet in the clusters where they are at home.

    Returns ``float32 (n,)`` (``-inf`` where there is none) and ``int64 (n,)`` (``-1`` there). Cost: a row at home
    times the rows before it, plus rows at home times the copies after them, in ``SIMILARITY_BLOCK`` rows at a time.
    """
    n = vectors.shape[0]
    best = np.full(n, -np.inf, dtype=np.float32)
    match = np.full(n, -1, dtype=np.int64)
    homes, copies = np.flatnonzero(~copy), np.flatnonzero(copy)
    for start in range(0, len(homes), SIMILARITY_BLOCK):
        rows = homes[start : start + SIMILARITY_BLOCK]
        stop = rows[-1] + 1
        cosines = vectors[rows] @ vectors[:stop].T
        cosines[np.arange(stop)[None, :] >= rows[:, None]] = -np.inf
        match[rows] = np.argmax(cosines, axis=1)
        best[rows] = cosines[np.arange(len(rows)), match[rows]]
        later = copies[copies > rows[0]]
        if len(later):
            cosines = vectors[rows] @ vectors[later].T
            cosines[later[None, :] <= rows[:, None]] = -np.inf
            nearest = np.argmax(cosines, axis=0)
            found = cosines[nearest, np.arange(len(later))]
            better = found > best[later]  # earlier blocks hold earlier rows: they win ties
            best[later[better]] = found[better]
            match[later[better]] = rows[nearest[better]]
    match[best == -np.inf] = -1
    return best, match


def binary_width(column: pd.Series) -> int | None:
    """The width of the vectors in a column made by ``vectors_to_binary`` (None when it holds none)."""
    return len(column.iloc[0]) // 4 if len(column) else None


def cluster_decisions(frame: pd.DataFrame, threshold: float, id_col: str, id_dtype: Any) -> pd.DataFrame:
    """Whole clusters of rows and copies (vectors as ``binary``) -> a decision for each row at home here (shard,
    id, keep, duplicate_of, duplicate_of_shard (a stem), similarity) and one for each copy that found a duplicate
    (a removal; ``one_decision_per_row`` merges it with its row's). Ids come back as ``id_dtype`` (the shuffle
    may have turned them into Python objects)."""
    decided = []
    for _, group in frame.groupby(_CLUSTER, sort=True):
        # one global order whatever order the shuffle gave, ids repeated across shards included
        group = group.sort_values([_RANK, id_col, SHARD_COLUMN], kind="stable")
        copy = group[_COPY].to_numpy(dtype=bool)
        best, match = best_earlier_match(binary_to_vectors(group[_VECTOR], binary_width(group[_VECTOR])), copy)
        duplicate = best >= threshold
        reported = ~copy | duplicate
        ids = pd.array(group[id_col], dtype=id_dtype)
        stems = pd.array(group[STEM], dtype=STRING)
        decision = decision_frame(group[SHARD_COLUMN], ids, stems, ~duplicate, best, match)
        decided.append(decision[reported])
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


def one_decision_per_row(decisions: pd.DataFrame, id_col: str) -> pd.DataFrame:
    """One shard's decisions (``cluster_decisions``' rows for it, in any order) -> one per id: a row is removed
    when its home cluster or a copy found a duplicate, naming the most similar one (ties: the smaller id, then
    shard stem, so that the result does not depend on the shuffle's order)."""
    if not decisions[id_col].duplicated().any():
        return decisions
    ordered = decisions.assign(_order_similarity=decisions[SIMILARITY].astype("float64").fillna(-np.inf))
    ordered = ordered.sort_values(
        ["_order_similarity", DUPLICATE_OF, DUPLICATE_OF_SHARD, id_col],
        ascending=[False, True, True, True],
        kind="stable",
        na_position="last",
    )
    return ordered.drop_duplicates(id_col).drop(columns="_order_similarity")


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
