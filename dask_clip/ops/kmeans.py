"""Spherical k-means (Lloyd's algorithm on unit vectors) over blocks of vectors held by Dask.

The input is a list of ``dask.delayed`` blocks, one per partition, each a ``float32 (n_i, D)``
array of L2-normalised vectors. Every iteration is a map/reduce: each block gives the per-cluster
sums and counts of its vectors (assigned to the most cosine-similar centroid), a tree of tasks adds
them up and one small task turns the totals into the next centroids. The whole fit is one lazy
graph; once the centroids stop moving, the remaining iterations pass them through without work.

The array code uses only operations NumPy and CuPy share, taking the array module from its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
from dask.delayed import Delayed

ROW_CHUNK = 4096
"""Rows scored against all centroids at once (bounds the ``(rows, k)`` score matrix)."""


def array_module(array: Any) -> Any:
    """The array library of ``array``: ``cupy`` for a CuPy array, else ``numpy``."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_numpy(array: Any) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def nearest_centroids(vectors: Any, centroids: Any) -> tuple[Any, Any]:
    """``(n, D)`` unit vectors, ``(k, D)`` unit centroids -> labels ``int64 (n,)`` and cosines ``float32 (n,)``."""
    xp = array_module(vectors)
    labels, cosines = [], []
    for start in range(0, vectors.shape[0], ROW_CHUNK):
        scores = vectors[start : start + ROW_CHUNK] @ centroids.T
        best = xp.argmax(scores, axis=1)
        labels.append(best)
        cosines.append(xp.take_along_axis(scores, best[:, None], axis=1)[:, 0])
    if not labels:
        return xp.zeros(0, dtype=xp.int64), xp.zeros(0, dtype=xp.float32)
    return xp.concatenate(labels).astype(xp.int64), xp.concatenate(cosines).astype(xp.float32)


def cluster_sums(vectors: Any, centroids: Any) -> tuple[Any, Any]:
    """Per-cluster sums ``float64 (k, D)`` and counts ``int64 (k,)`` of ``vectors`` assigned to ``centroids``."""
    xp = array_module(vectors)
    k = centroids.shape[0]
    sums = xp.zeros((k, vectors.shape[1]), dtype=xp.float64)
    counts = xp.zeros(k, dtype=xp.int64)
    labels, _ = nearest_centroids(vectors, centroids)
    clusters = xp.arange(k)
    for start in range(0, vectors.shape[0], ROW_CHUNK):
        one_hot = labels[start : start + ROW_CHUNK, None] == clusters[None, :]
        sums += one_hot.astype(xp.float64).T @ vectors[start : start + ROW_CHUNK].astype(xp.float64)
        counts += xp.sum(one_hot, axis=0, dtype=xp.int64)
    return sums, counts


def sample_rows(vectors: Any, count: int, seed: int, block_index: int) -> Any:
    """Up to ``count`` distinct rows of ``vectors``, chosen with a generator seeded by ``(seed, block_index)``."""
    if vectors.shape[0] <= count:
        return vectors
    chosen = np.sort(np.random.default_rng([seed, block_index]).choice(vectors.shape[0], count, replace=False))
    return vectors[chosen]


def kmeans_plus_plus(samples: Sequence[Any], n_clusters: int, seed: int) -> Any:
    """k-means++ seeding on the concatenated samples -> ``float32 (min(k, n), D)`` unit centroids."""
    non_empty = [block for block in samples if block.shape[0]]
    if not non_empty:
        return np.zeros((0, samples[0].shape[1] if samples else 0), dtype=np.float32)
    xp = array_module(non_empty[0])
    points = xp.concatenate(non_empty)
    rng = np.random.default_rng(seed)
    k = min(n_clusters, points.shape[0])
    chosen = [int(rng.integers(points.shape[0]))]
    distance = xp.maximum(2 - 2 * (points @ points[chosen[0]]), 0)  # squared Euclidean on the sphere
    for _ in range(1, k):
        total = float(xp.sum(distance))
        if total <= 0:  # every point coincides with a centroid already: pick uniformly
            probabilities = np.full(points.shape[0], 1 / points.shape[0])
        else:
            probabilities = to_numpy(distance).astype(np.float64) / total
        chosen.append(int(rng.choice(points.shape[0], p=probabilities / probabilities.sum())))
        distance = xp.minimum(distance, xp.maximum(2 - 2 * (points @ points[chosen[-1]]), 0))
    return points[chosen].astype(xp.float32)


def _block_sums(vectors: Any, state: tuple[Any, bool]) -> tuple[Any, Any] | None:
    centroids, converged = state
    return None if converged or centroids.shape[0] == 0 else cluster_sums(vectors, centroids)


def _add(*partials: tuple[Any, Any] | None) -> tuple[Any, Any] | None:
    present = [partial for partial in partials if partial is not None]
    if not present:
        return None
    return sum(p[0] for p in present), sum(p[1] for p in present)


def _update(state: tuple[Any, bool], totals: tuple[Any, Any] | None, tol: float) -> tuple[Any, bool]:
    """New centroids: each non-empty cluster's normalised sum (an empty cluster keeps its centroid)."""
    centroids, converged = state
    if converged or totals is None:
        return centroids, True
    xp = array_module(centroids)
    sums, counts = totals
    norms = xp.sqrt(xp.sum(sums**2, axis=1))
    moved = (counts > 0) & (norms > 0)
    updated = xp.where(moved[:, None], sums / xp.where(norms > 0, norms, 1)[:, None], centroids).astype(xp.float32)
    shift = float(xp.max(xp.sum((updated - centroids) ** 2, axis=1))) if centroids.shape[0] else 0.0
    return updated, shift <= tol


def _initial_state(centroids: Any) -> tuple[Any, bool]:
    return centroids, False


def _centroids_of(state: tuple[Any, bool]) -> Any:
    return state[0]


def tree_sum(parts: list[Delayed], fan_in: int = 8) -> Delayed:
    """Add up delayed ``(sums, counts)`` partials with a tree of tasks, ``fan_in`` inputs each."""
    while len(parts) > 1:
        parts = [dask.delayed(_add)(*parts[i : i + fan_in]) for i in range(0, len(parts), fan_in)]
    return parts[0]


def fit_spherical_kmeans(
    blocks: Sequence[Delayed],
    n_clusters: int,
    seed: int = 0,
    max_iter: int = 30,
    tol: float = 1e-7,
    init_sample: int | None = None,
) -> Delayed:
    """Lazily fit ``n_clusters`` centroids to the unit vectors in ``blocks`` -> delayed ``float32 (k', D)``.

    k-means++ seeds from a sample of about ``init_sample`` rows (default ``20 * n_clusters``) drawn
    evenly from the blocks; ``k' = min(n_clusters, rows in that sample)``. Lloyd iterations stop
    after ``max_iter`` or once no centroid moves by more than ``tol`` (squared distance).
    """
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, not {n_clusters}")
    if not blocks:
        raise ValueError("k-means needs at least one block of vectors")
    per_block = max(1, -(-(init_sample or 20 * n_clusters) // len(blocks)))
    samples = [dask.delayed(sample_rows)(block, per_block, seed, i) for i, block in enumerate(blocks)]
    state = dask.delayed(_initial_state)(dask.delayed(kmeans_plus_plus)(samples, n_clusters, seed))
    for _ in range(max_iter):
        totals = tree_sum([dask.delayed(_block_sums)(block, state) for block in blocks])
        state = dask.delayed(_update)(state, totals, tol)
    return dask.delayed(_centroids_of)(state)
