"""Image-based filtering (DataComp): mark the rows whose image embeddings lie near a target set's.

The target set is the embeddings of a downstream task's images (DataComp used ImageNet-1k's training images), from a
``.npy`` file or another dataset's embedding column. Two modes, both on the spherical k-means of ``ops.clustering``
(faiss, seeded):

- ``"centroids"`` (the default): the *target* embeddings are clustered into ``k`` centroids; a row is near the target
  when its cosine to the nearest centroid is ``>= threshold``. Each shard is decided on its own (``k`` comparisons a
  row), so the result does not depend on the other shards.
- ``"pool"`` (DataComp's own rule, Gadre et al. 2023, section 3.4 and appendix: k = 100,000 on the pool): the
  *dataset's* embeddings are clustered into ``k`` clusters (fitted on a seeded sample, as semantic dedup's are);
  each target embedding picks its nearest pool cluster, and a row is near the target when its own cluster is one
  picked. No threshold: the share kept follows from ``k`` and the target, and depends on every shard (the clusters
  are fitted when the filter is applied, and provenance records the result as cross-shard).

In both modes the *target centroids* are the centroids a row can be near: the target's k-means centroids, or the
pool clusters some target embedding picked. Each row gets ``target_similarity``, its cosine to the nearest target
centroid, and ``target_cluster``, that centroid's number (among the target's centroids, or among the pool's
clusters). In ``"pool"`` mode a row is near exactly when that centroid is its own cluster's.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_clip.arguments import at_least, one_of
from dask_clip.columns import BOOL, FLOAT32, INT64, embedding_width, empty_column, nullable, unit_embeddings
from dask_clip.errors import DataError, UsageError
from dask_clip.execution import ShardTask, compute
from dask_clip.io.npy import read_npy_header, read_npy_rows
from dask_clip.models.loading import same_weights
from dask_clip.operation import Operation
from dask_clip.ops.clustering import nearest, spherical_kmeans
from dask_clip.ops.semantic_dedup import sampled_cluster_tree
from dask_clip.provenance import describe_operation

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

MODES = ("centroids", "pool")
MODEL_KEYS = ("model_dir", "model_name", "family", "embedding_dim")
"""What names the model of an embedding column in its recorded configuration (with ``model_version``)."""


@dataclass(frozen=True)
class TargetSet:
    """Target embeddings: ``vectors`` unit ``float32 (n, D)``, and ``identity`` (JSON: where they come from, how many,
    their width and a digest of their values), which provenance records."""

    vectors: np.ndarray
    identity: dict[str, Any]
    model: dict[str, Any] | None = None
    """The recorded configuration of the column they were read from (None for a file)."""


def load_target(target: str | Path | ImageTextPairDataset, column: str) -> TargetSet:
    """The target set in ``target``: a ``.npy`` file of rows of vectors (local or fsspec URL), or a dataset whose
    embedding ``column`` holds them (computed here). ``DataError`` naming the file (or dataset and column) when it
    holds no vector, or a vector that is zero or not finite."""
    if isinstance(target, (str, Path)):
        url = str(target)
        header = read_npy_header(url)
        raw = read_npy_rows(url, header, range(header.rows))
        return TargetSet(_unit(raw, url), _identity(url, raw), None)
    from dask_clip.dataset import ImageTextPairDataset

    if not isinstance(target, ImageTextPairDataset):
        raise UsageError(f"target must be a .npy file or an ImageTextPairDataset, not {type(target).__name__}")
    where = f"{target.path} (column {column!r})"
    embedding_width(target.meta, column, "the target set")
    values = compute(target.metadata[column])
    valid, vectors = unit_embeddings(values)
    if not valid.any():
        raise DataError(f"{where}: holds no embedding to use as the target set")
    return TargetSet(vectors, _identity(where, vectors), target.operation_config(column) or {})


def _unit(raw: np.ndarray, url: str) -> np.ndarray:
    """Rows ``float32 (n, D)`` of ``url`` -> unit vectors; ``DataError`` for none, or one zero or not finite."""
    if len(raw) == 0 or raw.shape[1] == 0:
        raise DataError(f"{url}: holds {raw.shape[0]} vectors of width {raw.shape[1]}: the target set is empty")
    norms = np.linalg.norm(raw, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise DataError(f"{url}: row {int(bad[0])} (and {len(bad) - 1} more) is zero or not finite: not a direction")
    return (raw / norms[:, None]).astype(np.float32)


def _identity(source: str, vectors: np.ndarray) -> dict[str, Any]:
    """A target set's identity: its ``source``, its shape and the digest of its vectors."""
    return {"source": source, "rows": int(vectors.shape[0]), "width": int(vectors.shape[1]), "digest": _digest(vectors)}


def _digest(vectors: np.ndarray) -> str:
    """16 hex digits of the sha256 of ``vectors`` as ``float32`` bytes."""
    return hashlib.sha256(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class TargetCentroids:
    """What a ``NearTargetFilter`` fits: ``centroids`` unit ``float32 (c, D)`` (the target's k-means, or every pool
    cluster's), ``picked`` (``"pool"``: the pool clusters some target embedding is nearest to, ``int64 (p,)``
    ascending; None otherwise) and ``threshold`` (``"centroids"``: the cosine that counts as near)."""

    centroids: np.ndarray
    picked: np.ndarray | None
    threshold: float | None

    def recorded(self) -> dict[str, Any]:
        """What provenance records of them: their digest and number (and how many clusters were picked)."""
        found = {"centroids": len(self.centroids), "centroids_digest": _digest(self.centroids)}
        return found if self.picked is None else {**found, "picked_clusters": len(self.picked)}

    def decide(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit vectors ``float32 (n, D)`` -> the nearest target centroid ``int64 (n,)``, the cosine to it
        ``float32 (n,)`` and whether they are near ``bool (n,)``."""
        if self.picked is None:
            cluster, similarity = nearest(vectors, self.centroids)
            return cluster, similarity, similarity >= self.threshold
        own, own_similarity = nearest(vectors, self.centroids)
        near = np.isin(own, self.picked)
        sub, similarity = nearest(vectors, self.centroids[self.picked])
        return np.where(near, own, self.picked[sub]), np.where(near, own_similarity, similarity), near


class NearTargetFilter(Operation):
    """Adds ``near_column`` (``bool``), ``similarity_column`` (``float32``) and ``cluster_column`` (``int64``): whether
    each row's ``embedding_column`` lies near the ``target`` set, its cosine to the nearest target centroid, and that
    centroid's number (the module docstring says both ``mode`` s).

    ``target``: a ``.npy`` file (rows of vectors) or a dataset whose ``target_column`` (default: ``embedding_column``)
    holds them, read when the filter is built. A dataset's must come from the model recorded for
    ``embedding_column`` (``UsageError`` naming both otherwise); a file records no model: only its width is checked.
    ``k`` clusters (``seed``, ``max_iter``): of the target (``"centroids"``), or of a seeded sample of
    ``kmeans_sample_size`` of the dataset's rows (``"pool"``); ``threshold``: the cosine of ``"centroids"`` mode
    (``"pool"`` takes none). Rows without a usable embedding are not near, with a null similarity and cluster. The
    columns are this step's own: combine them with others yourself (``combine_decisions``). Provenance records the
    target's identity (source, rows, width, a digest of its values) and what fitting found (``TargetCentroids``).
    """

    function_name = "keep_near_target"

    def __init__(
        self,
        target: str | Path | ImageTextPairDataset,
        *,
        mode: str = "centroids",
        k: int = 100,
        threshold: float | None = None,
        embedding_column: str = "image_embedding",
        target_column: str | None = None,
        seed: int = 0,
        max_iter: int = 30,
        kmeans_sample_size: int = 100_000,
        near_column: str = "near_target",
        similarity_column: str = "target_similarity",
        cluster_column: str = "target_cluster",
    ) -> None:
        self.mode = one_of("mode", mode, MODES)
        if (threshold is None) == (mode == "centroids"):
            raise UsageError(
                "mode='centroids' needs threshold= (the cosine to the nearest target centroid that counts as near)"
                if threshold is None
                else "mode='pool' takes no threshold: a row is near when its pool cluster is one a target picked"
            )
        if threshold is not None and not -1 <= threshold <= 1:
            raise UsageError(f"threshold is a cosine, in [-1, 1], not {threshold}")
        self.k = at_least("k", k)
        self.threshold = None if threshold is None else float(threshold)
        self.embedding_column = embedding_column
        self.seed = at_least("seed", seed, 0)
        self.max_iter = at_least("max_iter", max_iter)
        self.kmeans_sample_size = at_least("kmeans_sample_size", kmeans_sample_size)
        self.near_column = near_column
        self.similarity_column = similarity_column
        self.cluster_column = cluster_column
        self.cross_shard = self.mode == "pool"
        self.target = load_target(target, target_column or embedding_column)
        self.found: TargetCentroids | None = None

    def config(self) -> dict[str, Any]:
        by_mode = {"threshold": self.threshold} if self.mode == "centroids" else {"sample": self.kmeans_sample_size}
        found = self.found.recorded() if self.found is not None else {}
        return {
            "embedding_column": self.embedding_column,
            "mode": self.mode,
            "k": self.k,
            "seed": self.seed,
            "max_iter": self.max_iter,
            **by_mode,
            "target": self.target.identity,
            **found,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        width = dataset.embedding_width(self.embedding_column, self.name)  # a list column's: its first vector's
        if self.target.model is not None:
            check_same_model(self.embedding_column, dataset.operation_config(self.embedding_column) or {}, self.target)
        self._check_width(width)

    def _check_width(self, width: int | None) -> None:
        target_width = self.target.identity["width"]
        if width is not None and width != target_width:
            raise DataError(
                f"{self.target.identity['source']}: holds {target_width}-d vectors but {self.embedding_column!r} "
                f"holds {width}-d ones: the target set must be embedded by the model that embedded the column"
            )

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {
            self.near_column: empty_column(BOOL),
            self.similarity_column: empty_column(FLOAT32),
            self.cluster_column: empty_column(INT64),
        }

    def fitted(self, dataset: ImageTextPairDataset) -> NearTargetFilter:
        """This filter with its ``TargetCentroids``: the target's k-means, or (``"pool"``) the dataset's, clustered
        now, and the picked clusters."""
        fitted = copy.copy(self)
        target = self.target.vectors
        if self.mode == "centroids":
            fitted.found = TargetCentroids(
                spherical_kmeans(target, self.k, self.seed, self.max_iter), None, self.threshold
            )
            return fitted
        options = {"n_clusters": self.k, "max_cluster_size": None, "partitions": 1, "max_iter": self.max_iter}
        tree = compute(
            sampled_cluster_tree(
                dataset, self.embedding_column, self.kmeans_sample_size, self.name, seed=self.seed, **options
            )
        )
        self._check_width(tree.width)
        picked = np.unique(nearest(target, tree.centroids)[0]) if tree.roots else np.zeros(0, np.int64)
        fitted.found = TargetCentroids(tree.centroids, picked, None)
        return fitted

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """Each shard decided by ``decide_shard``; the centroids enter the graph once, not once per task."""
        if self.found is None:
            raise RuntimeError("NearTargetFilter built before it was fitted: apply it to the dataset")
        return dataset.map_shards(
            decide_shard,
            output_meta,
            label=self.label,
            found=dask.delayed(self.found, pure=True, traverse=False),
            embedding_column=self.embedding_column,
            width=self.target.identity["width"],
            columns=(self.near_column, self.similarity_column, self.cluster_column),
        )


def decide_shard(
    rows: pd.DataFrame,
    task: ShardTask,
    found: TargetCentroids,
    embedding_column: str,
    width: int,
    columns: tuple[str, str, str],
) -> pd.DataFrame:
    """One shard's rows with the near, similarity and cluster ``columns`` that ``found`` decides for their
    ``embedding_column`` (of ``width``); rows without a usable embedding are not near, the others null."""
    valid, vectors = unit_embeddings(rows[embedding_column], width, rows[task.id_col])
    cluster = np.zeros(len(rows), np.int64)
    similarity = np.zeros(len(rows), np.float32)
    near = np.zeros(len(rows), bool)
    if len(found.centroids) and (found.picked is None or len(found.picked)):
        cluster[valid], similarity[valid], near[valid] = found.decide(vectors)
    else:  # no centroid to be near (a pool without embeddings, or no target picked a cluster)
        valid = np.zeros(len(rows), bool)
    near_column, similarity_column, cluster_column = columns
    return rows.assign(
        **{
            near_column: pd.array(near, dtype=BOOL),
            similarity_column: pd.Series(nullable(similarity, valid, FLOAT32), index=rows.index),
            cluster_column: pd.Series(nullable(cluster, valid, INT64), index=rows.index),
        }
    )


def check_same_model(column: str, recorded: dict[str, Any], target: TargetSet) -> None:
    """``UsageError`` naming both unless ``target`` was read from a column the model recorded for ``column`` (its
    configuration ``recorded``) embedded: the same model keys and weights. Neither naming a model passes."""
    theirs = target.model or {}
    ours_named = {key: recorded[key] for key in MODEL_KEYS if key in recorded}
    theirs_named = {key: theirs[key] for key in MODEL_KEYS if key in theirs}
    same = ours_named == theirs_named and same_weights(
        recorded.get("model_version") or {}, theirs.get("model_version") or {}
    )
    if not same:
        raise UsageError(
            f"the target set {target.identity['source']} was embedded by another model than {column!r}, so their "
            f"cosines compare two spaces: {column!r}: {describe_operation(recorded or None)}; target: "
            f"{describe_operation(theirs or None)}. Embed both with one model"
        )


def keep_near_target(
    dataset: ImageTextPairDataset,
    target: str | Path | ImageTextPairDataset,
    *,
    mode: str = "centroids",
    k: int = 100,
    threshold: float | None = None,
    embedding_column: str = "image_embedding",
    seed: int = 0,
) -> ImageTextPairDataset:
    """A new dataset with ``near_target``, ``target_similarity`` and ``target_cluster`` (``NearTargetFilter``: its
    centroids are fitted now)."""
    operation = NearTargetFilter(
        target, mode=mode, k=k, threshold=threshold, embedding_column=embedding_column, seed=seed
    )
    return operation(dataset)
