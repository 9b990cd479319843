"""Semantic deduplication (SemDeDup): cluster the embeddings, then drop near-duplicates within each cluster.

1. Spherical k-means on the L2-normalised embeddings (``dask_clip.ops.kmeans``, one lazy graph).
2. Each row goes to its most similar centroid; a Dask shuffle brings every cluster into one partition.
3. Within a cluster, items are ranked by the keep policy; an item whose cosine similarity to an
   earlier-ranked item is ``>= 1 - eps`` is a duplicate of the most similar such item.
4. The decisions go back to their shard (a second shuffle, on the shard number) and join the rows by id.

Rows without an embedding are kept. Similar images that k-means puts in different clusters are
never compared (the price of clustering); more clusters make that likelier, fewer make clusters
bigger (pairwise cost grows with the square of a cluster's size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa

from dask_clip.arguments import at_least, one_of
from dask_clip.columns import (
    BOOL,
    embedding_dtype,
    embedding_width,
    embeddings_to_numpy,
    to_embedding_array,
    unit_embeddings,
)
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import ShardRef, ShardTask, failures_named, map_shards, shuffle_to_shards
from dask_clip.ops.deduplicator import Deduplicator
from dask_clip.ops.kmeans import fit_spherical_kmeans, nearest_centroids

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

KEEP_POLICIES = ("hard", "easy", "random")
_KEEP = "_dask_clip_keep"
_DUPLICATE_OF = "_dask_clip_duplicate_of"
_SIMILARITY = "_dask_clip_similarity"
_SHARD = "_dask_clip_shard"
_CLUSTER = "_dask_clip_cluster"
_CENTROID_COSINE = "_dask_clip_centroid_cosine"
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

    Writes the ``Deduplicator`` columns (their names are keyword-only options): a removed row names
    the most similar earlier-ranked item (which may itself be a duplicate) and their cosine.

    The result is lazy; computing it runs k-means, so every shard's embeddings are held in cluster
    memory while it runs. When the embeddings come from an embedder, ``save_metadata`` and read them
    back first, so the images are not embedded again on every compute.
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
        **columns: str,
    ) -> None:
        super().__init__(**columns)
        if not 0 <= eps < 1:
            raise UsageError(f"eps must be in [0, 1), not {eps}")
        self.eps = eps
        self.n_clusters = at_least("n_clusters", n_clusters)
        self.which_to_keep = one_of("which_to_keep", which_to_keep, KEEP_POLICIES)
        self.embedding_column = embedding_column
        self.seed = seed
        self.max_iter = at_least("max_iter", max_iter)

    def config(self) -> dict[str, Any]:
        """The options that determine the output, recorded next to it in the parquet."""
        return {
            "class": type(self).__name__,
            "eps": self.eps,
            "n_clusters": self.n_clusters,
            "which_to_keep": self.which_to_keep,
            "embedding_column": self.embedding_column,
            "seed": self.seed,
            "max_iter": self.max_iter,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        embedding_width(dataset.meta, self.embedding_column, self.name)

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """Cluster, decide within clusters, and join the decisions back to each shard's rows."""
        meta = dataset.meta
        dim = dataset.embedding_width(self.embedding_column, self.name)
        if dim is None:
            raise ColumnError(f"{self.name}: no shard holds an embedding in {self.embedding_column!r}")
        id_col = dataset.id_col
        parts = dataset.pandas_metadata.to_delayed()  # one graph key per shard: each shard is computed once
        shards = [ShardRef.of(index, shard) for index, shard in enumerate(dataset.shards)]
        blocks = [
            dask.delayed(unit_vectors)(part, shard, self.embedding_column, dim, id_col)
            for part, shard in zip(parts, shards, strict=True)
        ]
        centroids = fit_spherical_kmeans(blocks, self.n_clusters, seed=self.seed, max_iter=self.max_iter)

        assigned_meta = pd.DataFrame(
            {
                _SHARD: pd.Series([], dtype="int64"),
                id_col: meta[id_col].iloc[:0],
                _CLUSTER: pd.Series([], dtype="int64"),
                _CENTROID_COSINE: pd.Series([], dtype="float32"),
                self.embedding_column: pd.Series([], dtype=embedding_dtype(dim)),
            }
        )
        assigned = dd.from_delayed(
            [
                dask.delayed(assign_clusters)(part, centroids, shard, id_col, self.embedding_column, dim)
                for shard, part in zip(shards, parts, strict=True)
            ],
            meta=assigned_meta,
            verify_meta=False,
        )
        # tasks shuffles: P2P cannot move fixed_size_list columns and turns pyarrow strings into objects
        by_cluster = assigned.shuffle(on=_CLUSTER, npartitions=min(self.n_clusters, len(parts)), shuffle_method="tasks")
        decisions_meta = decision_frame(
            assigned_meta, [], np.zeros(0, bool), np.zeros(0), np.zeros(0, np.int64), id_col
        )
        decisions = by_cluster.map_partitions(
            cluster_decisions,
            threshold=1 - self.eps,
            which_to_keep=self.which_to_keep,
            seed=self.seed,
            id_col=id_col,
            embedding_column=self.embedding_column,
            meta=decisions_meta,
            enforce_metadata=False,
        )
        by_shard = shuffle_to_shards(decisions, _SHARD, len(parts))
        rows = dd.from_delayed(parts, meta=meta, verify_meta=False)
        outputs = (self.keep_column, self.duplicate_of_column, self.similarity_column)
        return map_shards(
            join_decisions,
            rows,
            dataset.shards,
            output_meta,
            by_shard,
            id_col=id_col,
            label=self.name,
            outputs=outputs,
        )


def unit_vectors(rows: pd.DataFrame, shard: ShardRef, embedding_column: str, dim: int, id_col: str) -> np.ndarray:
    """One shard's usable ``dim``-wide embeddings, L2-normalised: ``float32 (n, D)``."""
    with failures_named(shard.tar_url):
        return unit_embeddings(rows[embedding_column], dim, rows[id_col])[1]


def assign_clusters(
    rows: pd.DataFrame, centroids: np.ndarray, shard: ShardRef, id_col: str, embedding_column: str, dim: int
) -> pd.DataFrame:
    """The usable rows of one shard with their shard number, cluster, cosine to its centroid and unit vector."""
    with failures_named(shard.tar_url):
        valid, vectors = unit_embeddings(rows[embedding_column], dim, rows[id_col])
        labels, cosines = nearest_centroids(vectors, centroids)
    return pd.DataFrame(
        {
            _SHARD: np.full(len(vectors), shard.index, dtype=np.int64),
            id_col: rows[id_col].array[valid],
            _CLUSTER: labels,
            _CENTROID_COSINE: cosines,
            embedding_column: to_embedding_array(vectors, np.ones(len(vectors), dtype=bool)),
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


def cluster_decisions(
    frame: pd.DataFrame, threshold: float, which_to_keep: str, seed: int, id_col: str, embedding_column: str
) -> pd.DataFrame:
    """Whole clusters of rows -> one decision per row: shard, id, keep, duplicate_of, similarity."""
    decided = []
    for cluster, group in frame.groupby(_CLUSTER, sort=True):
        group = group.sort_values(id_col, kind="stable")  # the same order whatever order the shuffle gave
        group = group.iloc[keep_order(group[_CENTROID_COSINE].to_numpy(), which_to_keep, seed, int(cluster))]
        best, match = best_earlier_match(embeddings_to_numpy(group[embedding_column]))
        duplicate = best >= threshold
        decided.append(decision_frame(group, group[id_col].array, ~duplicate, best, match, id_col))
    if not decided:
        return decision_frame(frame, [], np.zeros(0, bool), np.zeros(0), np.zeros(0, np.int64), id_col)
    return pd.concat(decided, ignore_index=True)


def decision_frame(
    group: pd.DataFrame, ids: Any, keep: np.ndarray, best: np.ndarray, match: np.ndarray, id_col: str
) -> pd.DataFrame:
    """Decisions for ``group``'s rows (in order): removed rows name their match and its cosine."""
    ids = pd.array(ids, dtype=group[id_col].dtype)
    similarity = pa.array(np.minimum(best, 1.0).astype(np.float64), mask=keep)
    return pd.DataFrame(
        {
            _SHARD: group[_SHARD].to_numpy(dtype=np.int64),
            id_col: ids,
            _KEEP: pd.array(keep, dtype=BOOL),
            _DUPLICATE_OF: ids.take(np.where(keep, -1, match), allow_fill=True),
            _SIMILARITY: pd.arrays.ArrowExtensionArray(similarity),
        }
    )


def join_decisions(
    rows: pd.DataFrame, task: ShardTask, decisions: pd.DataFrame, outputs: tuple[str, str, str]
) -> pd.DataFrame:
    """One shard's rows with its decisions joined by id, as ``outputs`` (keep, duplicate-of, similarity).

    Rows without a decision (no usable embedding) are kept.
    """
    id_col = task.id_col
    positions = pd.Index(decisions[id_col]).get_indexer(rows[id_col]) if len(decisions) else np.full(len(rows), -1)
    joined = {
        name: pd.Series(decisions[column].array.take(positions, allow_fill=True), index=rows.index)
        for name, column in zip(outputs, (_KEEP, _DUPLICATE_OF, _SIMILARITY), strict=True)
    }
    joined[outputs[0]] = joined[outputs[0]].fillna(True)
    return rows.assign(**joined)
