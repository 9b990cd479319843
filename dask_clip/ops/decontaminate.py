"""Decontamination: flag the training rows whose image duplicates an item of an evaluation set.

A row is flagged when the cosine of its embedding to some evaluation item is at least ``threshold``; it names the
most similar one (ties: the item whose name sorts first in the evaluation set's order). The evaluation set
(``ops.evaluation_set``: a folder of images, another dataset, or an embeddings file) is embedded once, on the
client, in the training column's space, and broadcast once to the workers (one Dask key every shard's task reads).

- **Exact** (default): each shard's task compares its rows with every evaluation item, ``BLOCK_ELEMENTS`` cosines
  at a time (a ``(block, m)`` matrix product).
- **Index** (``index=``, the folder ``build_index`` wrote for the column): each evaluation item is a range query
  (every indexed row scoring at least ``threshold``: ``ann.range_search``), on the client; the matches go to their
  shards. An IVF index scans ``nprobe`` lists, so a copy in a list it does not scan is missed, and PQ codes
  score approximately: the README measures it against exact search.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_clip.arguments import at_least
from dask_clip.columns import BOOL, FLOAT32, STRING, empty_column, nullable, unit_embeddings
from dask_clip.dataset.search import opened_index
from dask_clip.errors import ColumnError, UsageError
from dask_clip.execution import SHARD_COLUMN, ShardTask
from dask_clip.io.shards import resolved_url
from dask_clip.operation import Operation
from dask_clip.ops.evaluation_set import MODEL_KEYS, EvaluationSet, load_evaluation_set

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset
    from dask_clip.dataset.index_files import OpenedIndex

BLOCK_ELEMENTS = 1 << 22
"""Cosines computed at once by exact search (16 MiB of float32): ``BLOCK_ELEMENTS // m`` rows against ``m`` items."""
_MATCH, _SIMILARITY = "_dask_clip_match", "_dask_clip_similarity"


class Decontaminator(Operation):
    """Writes ``keep_column`` (``bool``: False for a row whose ``embedding_column`` has cosine ``>= threshold`` to
    an item of the evaluation set ``against``), ``match_column`` (``string``: that item's name, the most similar;
    null for a row not flagged) and ``similarity_column`` (``float32``: their cosine; null likewise). A row without
    a usable embedding is kept when ``keep_missing`` (its match and similarity null), else not.

    ``against``: a folder of images (embedded by the model the column records, or ``model_dir``, which must be
    that model, on ``device``), an ``ImageTextPairDataset`` or its folder (its ``against_column``, by default
    ``embedding_column``, recording the same model), or an embeddings file (``.npy`` + ``.txt`` of names, or
    ``.parquet``): ``ops.evaluation_set``. ``index``: the folder of the column's index (``build_index``); its IVF
    lists scanned per query are ``nprobe`` (the index's default unless given). ``evaluation`` and ``index_found``
    are what ``fitted`` found (None: found when the operation is applied). The columns are this step's own: they
    replace columns of their names, never combine with them.
    """

    function_name = "decontaminate"

    def __init__(
        self,
        against: Any,
        *,
        threshold: float,
        embedding_column: str = "image_embedding",
        against_column: str | None = None,
        index: str | None = None,
        nprobe: int | None = None,
        model_dir: str | None = None,
        device: str = "cpu",
        keep_missing: bool = True,
        keep_column: str = "decontaminated",
        match_column: str = "contamination_match",
        similarity_column: str = "contamination_similarity",
    ) -> None:
        if not -1.0 <= float(threshold) <= 1.0:
            raise UsageError(f"threshold is a cosine: in [-1, 1], not {threshold!r}")
        if nprobe is not None and index is None:
            raise UsageError(f"nprobe={nprobe} applies to an index search only: give index=, or leave nprobe out")
        self.against = against
        self.threshold = float(threshold)
        self.embedding_column = embedding_column
        self.against_column = against_column
        self.index = index
        self.nprobe = None if nprobe is None else at_least("nprobe", nprobe)
        self.model_dir = model_dir
        self.device = device
        self.keep_missing = bool(keep_missing)
        self.keep_column = keep_column
        self.match_column = match_column
        self.similarity_column = similarity_column
        self.cross_shard = index is not None  # an index's lists come from every shard's vectors
        self.evaluation: EvaluationSet | None = None
        self.embedded_by: dict[str, Any] = {}
        self.index_found: tuple[dict[str, Any], pd.DataFrame] | None = None

    def config(self) -> dict[str, Any]:
        if self.evaluation is not None:
            against = self.evaluation.identity
        else:
            against = {"path": getattr(self.against, "path", None) or str(self.against)}
        search = self.index_found[0] if self.index_found is not None else "exact"
        return {
            "embedding_column": self.embedding_column,
            "threshold": self.threshold,
            "keep_missing": self.keep_missing,
            "against": against,
            "model": self.embedded_by,
            "search": search,
        }

    def input_columns(self, dataset: ImageTextPairDataset) -> list[str]:
        return [self.embedding_column]

    def check_inputs(self, dataset: ImageTextPairDataset) -> None:
        if dataset.embedding_width(self.embedding_column, self.name) is None:
            raise ColumnError(f"{dataset.path}: no shard holds an embedding in {self.embedding_column!r}")

    def output_columns(self, dataset: ImageTextPairDataset) -> dict[str, pd.Series]:
        return {
            self.keep_column: empty_column(BOOL),
            self.match_column: empty_column(STRING),
            self.similarity_column: empty_column(FLOAT32),
        }

    def fitted(self, dataset: ImageTextPairDataset) -> Decontaminator:
        """This operation with its evaluation set loaded (images embedded now, on the client) and, with an index,
        the matches found (every evaluation item's range query, now)."""
        width = dataset.embedding_width(self.embedding_column, self.name)
        evaluation = load_evaluation_set(
            self.against,
            dataset,
            self.embedding_column,
            width,
            against_column=self.against_column,
            model_dir=self.model_dir,
            device=self.device,
        )
        fitted = copy.copy(self)
        fitted.evaluation = evaluation
        recorded = dataset.operation_config(self.embedding_column) or {}
        fitted.embedded_by = {key: recorded[key] for key in MODEL_KEYS if key in recorded}
        if self.index is not None:
            opened = opened_index(dataset, self.index, self.embedding_column, self.nprobe)
            nprobe = self.nprobe or opened.nprobe
            searched = {
                "index": resolved_url(self.index),
                "key": opened.manifest["index"]["key"],
                "nprobe": nprobe,
                "indexed": opened.manifest["dataset"],
            }
            fitted.index_found = (searched, index_matches(opened, evaluation.vectors, self.threshold, nprobe))
        return fitted

    def build(self, dataset: ImageTextPairDataset, output_meta: pd.DataFrame) -> dd.DataFrame:
        """Each shard's rows with their decisions: compared with the evaluation set (one Dask key, read by every
        shard's task), or joined with the index's matches."""
        if self.evaluation is None:
            raise RuntimeError("Decontaminator applied before it was fitted: apply it to the dataset")
        found = None if self.index_found is None else dask.delayed(self.index_found[1], pure=True)
        return dataset.map_shards(
            decontaminate_shard,
            output_meta,
            label=self.label,
            evaluation=dask.delayed(self.evaluation, pure=True),
            found=found,
            column=self.embedding_column,
            width=self.evaluation.vectors.shape[1],
            threshold=self.threshold,
            keep_missing=self.keep_missing,
            names=(self.keep_column, self.match_column, self.similarity_column),
        )


def decontaminate_shard(
    rows: pd.DataFrame,
    task: ShardTask,
    evaluation: EvaluationSet,
    found: pd.DataFrame | None,
    column: str,
    width: int,
    threshold: float,
    keep_missing: bool,
    names: tuple[str, str, str],
) -> pd.DataFrame:
    """One shard's rows with their keep, match and similarity columns (``names``): from exact search, or from
    the index's matches ``found`` (``index_matches``) when given."""
    usable, vectors = unit_embeddings(rows[column], width, rows[task.id_col])
    if found is None:
        best, match = best_matches(vectors, evaluation.vectors)
    else:
        best, match = shard_matches(found, task, rows[task.id_col][usable])
    flagged = best >= threshold
    keep = np.full(len(rows), keep_missing)
    keep[usable] = ~flagged
    where = np.flatnonzero(usable)[flagged]
    similarity = np.zeros(len(rows), dtype=np.float32)
    similarity[where] = np.minimum(best[flagged], 1.0)
    matched = np.full(len(rows), None, dtype=object)
    matched[where] = [evaluation.names[item] for item in match[flagged]]
    is_match = np.zeros(len(rows), dtype=bool)
    is_match[where] = True
    keep_column, match_column, similarity_column = names
    return rows.assign(
        **{
            keep_column: pd.Series(pd.array(keep, dtype=BOOL), index=rows.index),
            match_column: pd.Series(nullable(matched, is_match, STRING), index=rows.index),
            similarity_column: pd.Series(nullable(similarity, is_match, FLOAT32), index=rows.index),
        }
    )


def best_matches(vectors: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For unit ``float32 (n, D)`` ``vectors``, their highest cosine to a row of unit ``against`` ``(m, D)`` and
    that row (the first of equals): ``float32 (n,)`` and ``int64 (n,)``, ``BLOCK_ELEMENTS`` cosines at a time."""
    best = np.empty(len(vectors), dtype=np.float32)
    match = np.empty(len(vectors), dtype=np.int64)
    block = max(1, BLOCK_ELEMENTS // len(against))
    for start in range(0, len(vectors), block):
        cosines = vectors[start : start + block] @ against.T
        match[start : start + block] = np.argmax(cosines, axis=1)
        best[start : start + block] = cosines[np.arange(len(cosines)), match[start : start + block]]
    return best, match


def index_matches(opened: OpenedIndex, queries: np.ndarray, threshold: float, nprobe: int) -> pd.DataFrame:
    """Every indexed row scoring at least ``threshold`` against a unit ``(m, D)`` query of ``opened``'s index, with
    the most similar query (the first of equals): its shard's position (``SHARD_COLUMN``), id, query and score."""
    import pyarrow as pa

    from dask_clip import ann

    lims, scores, labels = ann.range_search(opened.index, queries, threshold, nprobe)
    query = np.repeat(np.arange(len(queries), dtype=np.int64), np.diff(lims))
    kept = scores >= threshold
    query, scores, labels = query[kept], scores[kept], labels[kept]
    order = np.lexsort((query, -scores, labels))  # by label, then best score, then first query
    first = order[np.r_[True, labels[order][1:] != labels[order][:-1]]] if len(order) else order
    rows = opened.ids.take(pa.array(opened.rows_of(labels[first])))
    id_col = opened.manifest["id_col"]
    return pd.DataFrame(
        {
            SHARD_COLUMN: rows.column("shard").to_numpy().astype(np.int64),
            id_col: rows.column(id_col).to_pandas(types_mapper=pd.ArrowDtype).astype(opened.id_dtype),
            _MATCH: query[first],
            _SIMILARITY: scores[first].astype(np.float32),
        }
    )


def shard_matches(found: pd.DataFrame, task: ShardTask, ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The matches ``found`` for this shard's rows of ``ids``: ``float32 (n,)`` cosines (``-inf`` where none) and
    ``int64 (n,)`` evaluation items (``-1`` there)."""
    mine = found[found[SHARD_COLUMN].to_numpy() == task.shard.index]
    if not len(mine):
        return np.full(len(ids), -np.inf, dtype=np.float32), np.full(len(ids), -1, dtype=np.int64)
    positions = pd.Index(mine[task.id_col]).get_indexer(ids)
    present = positions >= 0
    best = np.where(present, mine[_SIMILARITY].to_numpy()[positions], -np.inf).astype(np.float32)
    return best, np.where(present, mine[_MATCH].to_numpy()[positions], -1)


def decontaminate(
    dataset: ImageTextPairDataset,
    against: Any,
    threshold: float,
    column: str = "image_embedding",
    index: str | None = None,
    **options: Any,
) -> ImageTextPairDataset:
    """A new dataset whose ``decontaminated`` column is False for rows with cosine ``>= threshold`` to an item of
    ``against`` (a folder of images, a dataset, an embeddings file), naming it in ``contamination_match`` with
    their ``contamination_similarity``; by exact search, or through the column's ``index`` when given
    (``Decontaminator``, which takes the other ``options``)."""
    return Decontaminator(against, threshold=threshold, embedding_column=column, index=index, **options)(dataset)
