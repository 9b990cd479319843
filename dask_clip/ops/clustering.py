"""Clusters for semantic deduplication, fitted on a sample and applied to any number of rows.

A ``ClusterTree`` is fitted on a seeded sample of unit vectors (a few per shard, each row weighted by how
many rows of its shard it stands for), with faiss's spherical k-means:

1. ``n_clusters`` top-level centroids;
2. a cluster whose estimated size (the sum of its sample rows' weights) exceeds ``max_cluster_size`` is
   split by a second k-means on its own sample rows into ``ceil(size / max_cluster_size)`` sub-clusters,
   and so on while a piece is still too big. A cluster whose sample rows all lie within ``max_radius``
   (an angle) of their mean direction is not split: within half the duplicate angle of it, every two of
   its rows are duplicates of each other, and pieces would only separate them;
3. the leaves (clusters that were not split) are packed into ``partitions`` groups of about equal
   estimated size (largest first, each to the lightest group), one group per partition of the shuffle.

``assign`` then gives every row its leaf (nearest top-level centroid, then nearest sub-centroid, down
the tree), its cosine to that leaf's centroid, and its partition. ``neighbours`` gives the other leaves
where a row could have a duplicate (see its docstring for the bound). Everything here works on NumPy
``float32`` arrays in memory: the sample and one shard's vectors at a time.
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

ANGLE_TOLERANCE = 1e-3
"""Radians added to an angle bound computed from ``float32`` cosines (the angle of a cosine near 1 rounded to
``float32`` is off by up to about 3.5e-4 rad)."""


@dataclass(frozen=True)
class ClusterTree:
    """Centroids of every cluster and sub-cluster, how they nest, and the shuffle partition of each leaf.

    ``centroids``: ``float32 (nodes, D)`` unit vectors; nodes ``0 .. roots - 1`` are the top-level clusters.
    ``children``: for each split node, its sub-clusters' node numbers (``int64``, all larger than its own).
    ``partition_of``: ``int64 (nodes,)``, the shuffle partition of each leaf (``-1`` for a split node).
    ``estimated_sizes``: ``float64 (nodes,)``, rows per node estimated from the sample.
    """

    centroids: np.ndarray
    roots: int
    children: dict[int, np.ndarray]
    partition_of: np.ndarray
    estimated_sizes: np.ndarray

    @property
    def width(self) -> int:
        """``D``, the width of the vectors it clusters."""
        return self.centroids.shape[1]

    @property
    def leaves(self) -> np.ndarray:
        """The node numbers of the clusters rows are assigned to: ``int64 (leaves,)``."""
        return np.flatnonzero(self.partition_of >= 0)

    def assign(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit vectors ``float32 (n, D)`` -> each row's leaf ``int64 (n,)``, its cosine to that leaf's
        centroid ``float32 (n,)`` and its partition ``int64 (n,)``. Without centroids every row is in leaf -1."""
        return self.place(vectors, 0.0, 0)[:3]

    def place(
        self, vectors: np.ndarray, slack: float, most: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``assign`` and ``neighbours`` at once: each row's leaf, cosine and partition, then the row numbers and
        leaves of its neighbours (``neighbours(vectors, leaf, slack, most)``). One search of the top-level
        centroids, for the ``most + 1`` nearest, serves both: the nearest is the row's own."""
        if self.roots == 0:
            return (
                np.full(len(vectors), -1, np.int64),
                np.zeros(len(vectors), np.float32),
                np.zeros(len(vectors), np.int64),
                *no_neighbours(),
            )
        top = search(vectors, self.centroids[: self.roots], most + 1)
        leaf, cosine = top[1][:, 0].astype(np.int64), top[0][:, 0].copy()
        for node in sorted(self.children):  # children are numbered after their parent: one pass reaches the leaves
            rows = np.flatnonzero(leaf == node)
            if len(rows):
                kids = self.children[node]
                sub, cosine[rows] = nearest(vectors[rows], self.centroids[kids])
                leaf[rows] = kids[sub]
        copies = self._neighbours(vectors, leaf, top, slack, most) if most else no_neighbours()
        return leaf, cosine, self.partition_of[leaf], *copies

    def neighbours(
        self, vectors: np.ndarray, leaf: np.ndarray, slack: float, most: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The leaves other than their own (``leaf``, ``int64 (n,)`` from ``assign``) where each of the unit vectors
        ``float32 (n, D)`` could have a duplicate: ``int64 (m,)`` row numbers and ``int64 (m,)`` leaves, at most
        ``most`` per row, nearest centroid first.

        ``slack`` is twice the duplicate angle ``theta`` (``arccos(1 - eps)``). On the sphere the angle is a
        distance, so for a duplicate ``x`` of ``y`` (angle at most ``theta``) and ``c_x`` the centroid ``x``
        is nearest to among some siblings, ``c_y`` the one ``y`` is nearest to among the same siblings::

            angle(y, c_x) <= angle(y, x) + angle(x, c_x) <= theta + angle(x, c_y) <= 2 theta + angle(y, c_y)

        So, level by level down the tree, ``x``'s leaf is among the nodes within ``angle(y, c_y) + slack`` of
        ``y``: those are followed (at most ``most + 1`` per node, nearest first) and their leaves, less ``y``'s
        own, are returned. The bound is symmetric: ``y``'s leaf is among ``x``'s too. Rows have no
        neighbours when ``most`` is 0 or there are no centroids."""
        if most == 0 or self.roots == 0 or len(vectors) == 0:
            return no_neighbours()
        return self._neighbours(vectors, leaf, search(vectors, self.centroids[: self.roots], most + 1), slack, most)

    def _neighbours(
        self,
        vectors: np.ndarray,
        leaf: np.ndarray,
        top: tuple[np.ndarray, np.ndarray],
        slack: float,
        most: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``neighbours``, from ``top``: ``search``'s cosines and labels of the ``most + 1`` nearest top-level
        centroids."""
        rows, node, cosine = within_slack_of(*top, np.arange(self.roots), slack)
        for parent in sorted(self.children):  # children are numbered after their parent: one pass reaches the leaves
            at = node == parent
            if at.any():
                kids = self.children[parent]
                found, sub, sub_cosine = within_slack(vectors[rows[at]], self.centroids[kids], kids, slack, most + 1)
                rows = np.concatenate([rows[~at], rows[at][found]])
                node = np.concatenate([node[~at], sub])
                cosine = np.concatenate([cosine[~at], sub_cosine])
        other = node != leaf[rows]
        rows, node, cosine = rows[other], node[other], cosine[other]
        order = np.lexsort((node, -cosine, rows))  # per row, nearest first (ties by node number)
        rows, node = rows[order], node[order]
        first = np.searchsorted(rows, rows)  # where each row's run starts, in the sorted rows
        nearest_first = np.arange(len(rows)) - first < most
        return rows[nearest_first], node[nearest_first]


def no_neighbours() -> tuple[np.ndarray, np.ndarray]:
    """``neighbours``'s answer for no row: empty row numbers and leaves."""
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def within_slack(
    vectors: np.ndarray, centroids: np.ndarray, nodes: np.ndarray, slack: float, most: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each unit vector ``float32 (n, D)``, the ``nodes`` (numbers of ``centroids``, ``float32 (k, D)``) whose
    angle to it is at most its angle to its nearest one plus ``slack``, at most ``most``, nearest first: ``int64``
    row numbers, ``int64`` nodes and ``float32`` cosines, one element per (row, node) found."""
    return within_slack_of(*search(vectors, centroids, most), nodes, slack)


def within_slack_of(
    cosine: np.ndarray, label: np.ndarray, nodes: np.ndarray, slack: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``within_slack`` from a ``search``'s cosines and labels (``(n, k)``, nearest first) of centroids numbered
    ``nodes``."""
    angle = np.arccos(np.clip(cosine.astype(np.float64), -1.0, 1.0))
    near = (label >= 0) & (angle <= angle[:, :1] + slack + ANGLE_TOLERANCE)
    rows = np.nonzero(near)[0].astype(np.int64)
    return rows, nodes[label[near]].astype(np.int64), cosine[near]


def nearest(vectors: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each unit vector's most cosine-similar centroid: ``int64 (n,)`` and that cosine ``float32 (n,)``."""
    cosine, label = search(vectors, centroids, 1)
    return label[:, 0].astype(np.int64), cosine[:, 0]


def search(vectors: np.ndarray, centroids: np.ndarray, most: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(most, k)`` most cosine-similar of ``centroids`` ``float32 (k, D)`` to each unit vector ``float32
    (n, D)``, nearest first: cosines ``float32 (n, min(most, k))`` and centroid numbers (faiss's ``int64`` labels)."""
    import faiss  # only where k-means or a search runs: import dask_clip stays light

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(most, len(centroids)))


@contextmanager
def faiss_threads(count: int) -> Iterator[None]:
    """faiss's OpenMP threads (its k-means and searches) set to ``count`` in the calling thread for the block, then
    set back. OpenMP keeps the setting per thread: other threads (a worker's other tasks) keep theirs."""
    import faiss  # only where k-means or a search runs: import dask_clip stays light

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    """faiss's spherical k-means of unit vectors ``float32 (n, D)`` -> ``float32 (min(k, n), D)`` unit centroids,
    using every row given (no subsampling inside faiss)."""
    import faiss  # only where k-means or a search runs: import dask_clip stays light

    k = min(k, len(vectors))
    kmeans = faiss.Kmeans(
        vectors.shape[1],
        k,
        niter=max_iter,
        seed=seed,
        spherical=True,
        min_points_per_centroid=1,
        max_points_per_centroid=max(1, math.ceil(len(vectors) / k)),
    )
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return kmeans.centroids


def fit_cluster_tree(
    vectors: np.ndarray,
    weights: np.ndarray,
    n_clusters: int,
    max_cluster_size: int | None,
    partitions: int,
    seed: int,
    max_iter: int,
    max_radius: float = 0.0,
) -> ClusterTree:
    """Fit the tree on sample rows ``float32 (n, D)`` standing for ``weights`` ``float64 (n,)`` rows each.

    ``max_cluster_size=None`` never splits; nor is a cluster split whose sample rows all lie within ``max_radius``
    radians of their mean direction. See the module's docstring for the steps.
    """
    if len(vectors) == 0:
        empty = np.zeros(0, np.int64)
        return ClusterTree(np.zeros((0, vectors.shape[1]), np.float32), 0, {}, empty, np.zeros(0))
    centroids = [spherical_kmeans(vectors, n_clusters, seed, max_iter)]
    roots = len(centroids[0])
    leaf = nearest(vectors, centroids[0])[0]
    children: dict[int, np.ndarray] = {}
    sizes = list(np.bincount(leaf, weights=weights, minlength=roots))
    node = 0
    while node < len(sizes):
        members = np.flatnonzero(leaf == node)
        oversized = max_cluster_size is not None and sizes[node] > max_cluster_size and len(members) > 1
        if oversized and radius(vectors[members]) > max_radius:
            pieces = math.ceil(sizes[node] / max_cluster_size)
            sub = spherical_kmeans(vectors[members], pieces, seed + node + 1, max_iter)
            sub_leaf = nearest(vectors[members], sub)[0]
            used = np.unique(sub_leaf)
            if len(used) > 1:  # else the members are one point: no split can make it smaller
                kids = np.arange(len(sizes), len(sizes) + len(used), dtype=np.int64)
                children[node] = kids
                centroids.append(sub[used])
                leaf[members] = kids[np.searchsorted(used, sub_leaf)]
                sizes += list(np.bincount(leaf[members] - kids[0], weights=weights[members], minlength=len(kids)))
        node += 1
    estimated = np.asarray(sizes, dtype=np.float64)
    return ClusterTree(
        np.concatenate(centroids).astype(np.float32),
        roots,
        children,
        pack(estimated, set(children), partitions),
        estimated,
    )


def radius(vectors: np.ndarray) -> float:
    """The largest angle (radians) of unit vectors ``float32 (n, D)`` to their mean direction (pi when they
    cancel out)."""
    mean = vectors.astype(np.float64).sum(axis=0)
    norm = np.linalg.norm(mean)
    if norm == 0:
        return math.pi
    cosine = vectors.astype(np.float64) @ (mean / norm)
    return float(np.arccos(np.clip(cosine.min(), -1.0, 1.0)))


def pack(sizes: np.ndarray, split: set[int], partitions: int) -> np.ndarray:
    """Leaves (nodes not in ``split``) into ``partitions`` groups of about equal total ``sizes``, largest first,
    each into the lightest group so far -> ``int64 (nodes,)`` group of each node (``-1`` for split nodes)."""
    group = np.full(len(sizes), -1, dtype=np.int64)
    loads = [(0.0, number) for number in range(partitions)]
    for node in sorted((n for n in range(len(sizes)) if n not in split), key=lambda n: (-sizes[n], n)):
        load, number = heapq.heappop(loads)
        group[node] = number
        heapq.heappush(loads, (load + sizes[node], number))
    return group
