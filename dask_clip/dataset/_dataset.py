"""ImageTextPairDataset: the metadata of a folder of WebDataset shards, one Dask partition per shard."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_clip.backends import check_backend, to_backend, to_pandas
from dask_clip.columns import embedding_width as declared_width
from dask_clip.columns import embeddings_to_numpy
from dask_clip.dataset.export import export_clip_retrieval
from dask_clip.dataset.index import build_index
from dask_clip.dataset.index_files import open_index
from dask_clip.dataset.info import info
from dask_clip.dataset.reshard import to_webdataset
from dask_clip.dataset.review import contamination_matches, decision_boundary, duplicate_groups
from dask_clip.dataset.save import save_metadata
from dask_clip.dataset.search import search
from dask_clip.errors import ColumnError
from dask_clip.execution import compute, map_shards, shuffle_to_shards
from dask_clip.io.metadata import empty_frame, read_parquet_schema, read_shard_metadata
from dask_clip.io.shards import Shard, discover_shards
from dask_clip.provenance import Computed, FileRecords, Source, Stored


@dataclass(frozen=True, eq=False)
class ImageTextPairDataset:
    """A folder of image-text shards: the metadata frame, the shards it came from and the id column.

    ``pandas_metadata`` has one partition per shard, aligned with ``shards`` (and ``tar_files``): what
    dask_clip's operations compute on; ``metadata`` is the same frame on ``backend``, ``"pandas"`` or
    ``"cudf"`` (GPU extra; embeddings are ``list<float32>`` there, converted at ``backends``'s boundary).
    Every operation returns a new dataset and leaves this one unchanged.
    ``provenance`` maps each derived column to its source: ``Stored`` in the shards' files (each shard's
    file records its own provenance), or ``Computed`` by an operation of this run (``provenance``).
    Two datasets are equal only when they are the same object (``==`` is identity).
    """

    path: str
    pandas_metadata: dd.DataFrame
    shards: tuple[Shard, ...]
    id_col: str = "key"
    provenance: Mapping[str, Source] = field(default_factory=dict)
    backend: str = "pandas"

    @classmethod
    def from_webdataset(cls, path: str, id_col: str = "key", backend: str = "pandas") -> ImageTextPairDataset:
        """Read the shard pairs of ``path`` (a local folder or any fsspec URL) lazily.

        Only the folder listing and the first parquet's footer are read on the client; each shard's
        parquet is read by its own task, which checks its ids and columns. The derived columns are those
        the first shard's file records; each shard's file records its own provenance for them. ``backend="cudf"`` (GPU
        extra) gives a dask_cudf ``metadata``; dask_clip's operations convert to pandas per shard.
        """
        check_backend(backend)
        shards = tuple(discover_shards(path))
        first_schema = read_parquet_schema(shards[0].parquet_url)
        meta = empty_frame(first_schema)
        if id_col not in meta.columns:
            raise ColumnError(f"{shards[0].parquet_url}: no id column {id_col!r}; columns are {list(meta.columns)}")
        derived = [c for c in FileRecords.from_schema(first_schema).columns if c in meta.columns]
        read = functools.partial(read_shard_metadata, id_col=id_col, meta=meta, derived_columns=frozenset(derived))
        metadata = dd.from_map(
            read,
            [shard.parquet_url for shard in shards],
            meta=meta,
            enforce_metadata=False,
            label="read-shard-metadata",
        )
        provenance = {column: Stored(column) for column in derived}
        return cls(path, metadata, shards, id_col, provenance, backend=backend)

    @functools.cached_property
    def metadata(self) -> dd.DataFrame:
        """The metadata frame on this dataset's backend (one partition per shard)."""
        return to_backend(self.pandas_metadata, self.backend)

    @property
    def meta(self) -> pd.DataFrame:
        """An empty pandas frame with the columns and dtypes of ``metadata`` on the pandas backend."""
        return self.pandas_metadata._meta

    def operation_config(self, column: str) -> dict[str, Any] | None:
        """The configuration of the operation that produced derived ``column``: the operation computing it in
        this run, or the one its first shard's file records (``info()`` shows whether every shard agrees)."""
        source = self.provenance.get(column)
        if isinstance(source, Computed):
            return source.operation
        if isinstance(source, Stored):
            record = FileRecords.from_schema(read_parquet_schema(self.shards[0].parquet_url)).columns.get(column)
            return (record or {}).get("operation")
        return None

    def embedding_width(self, column: str, purpose: str = "this operation") -> int | None:
        """The width of embedding ``column``: from its type when that says it, else from the first shard that
        holds an embedding (computed); None when no shard holds one. ``ColumnError`` when it is no embedding column."""
        width = declared_width(self.meta, column, purpose)
        for index in range(len(self.shards)) if width is None else ():
            vectors = embeddings_to_numpy(compute(self.pandas_metadata[column].partitions[index]))
            if vectors.shape[0] and not np.isnan(vectors).all():
                return vectors.shape[1]
        return width

    def reason_column(self, column: str) -> str | None:
        """The column that holds the reason where derived ``column`` is null (``embedding_error`` for
        ``image_embedding``), as its operation or its first shard's file records; None when there is none."""
        source = self.provenance.get(column)
        if isinstance(source, Computed):
            return source.reasons.get(column)
        if isinstance(source, Stored):
            record = FileRecords.from_schema(read_parquet_schema(self.shards[0].parquet_url)).columns.get(column)
            return (record or {}).get("reasons", {}).get(column)
        return None

    @property
    def tar_files(self) -> list[str]:
        """The tar of each partition, in partition order."""
        return [shard.tar_url for shard in self.shards]

    def with_metadata(
        self,
        metadata: dd.DataFrame,
        provenance: Mapping[str, Source] | None = None,
    ) -> ImageTextPairDataset:
        """A new dataset with ``metadata`` (pandas or cudf; same shards, one partition each) as its metadata.

        ``provenance`` gives the sources of the columns an operation wrote. Derived columns that ``metadata``
        no longer has are forgotten.
        """
        if metadata.npartitions != len(self.shards):
            raise ValueError(
                f"metadata has {metadata.npartitions} partitions but the dataset has {len(self.shards)} shards: "
                "an operation must keep one partition per shard"
            )
        return replace(
            self,
            pandas_metadata=to_pandas(metadata, self.meta),
            provenance={
                column: source
                for column, source in {**self.provenance, **(provenance or {})}.items()
                if column in metadata.columns
            },
        )

    def map_shards(
        self,
        function: Callable[..., pd.DataFrame],
        meta: pd.DataFrame,
        *aligned: dd.DataFrame,
        label: str = "shard",
        positions: Sequence[int] | None = None,
        payloads: Sequence[str] | None = None,
        resources: Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> dd.DataFrame:
        """``function(rows, task, *aligned_parts, **kwargs)`` on each shard's rows of ``pandas_metadata`` -> a lazy
        frame like ``meta``, one partition per shard (``execution.map_shards``: ``task`` is the shard's
        ``ShardTask``, ``payloads`` one string per shard, ``resources`` what each task asks of a worker).

        ``positions`` (ascending) runs it on those shards only: the result has one partition per position, and
        ``aligned`` frames and ``payloads`` one per position too.
        """
        metadata, shards = self.pandas_metadata, self.shards
        if positions is not None:
            metadata, shards = metadata.partitions[list(positions)], tuple(self.shards[i] for i in positions)
        return map_shards(
            function,
            metadata,
            shards,
            meta,
            *aligned,
            id_col=self.id_col,
            label=label,
            indices=positions,
            payloads=payloads,
            resources=resources,
            **kwargs,
        )

    def map_shards_with_results(
        self,
        function: Callable[..., pd.DataFrame],
        meta: pd.DataFrame,
        results: dd.DataFrame,
        *,
        label: str,
        **kwargs: Any,
    ) -> dd.DataFrame:
        """``function(rows, task, shard_results, **kwargs)`` on each shard, as ``map_shards``: ``shard_results`` are
        the rows of ``results`` (computed across shards) whose ``execution.SHARD_COLUMN`` is the shard's position,
        that column as their index (``execution.shuffle_to_shards``)."""
        by_shard = shuffle_to_shards(results, len(self.shards))
        return self.map_shards(function, meta, by_shard, label=label, **kwargs)

    # What a dataset does with itself, each in its own module (``dataset.save`` and so on), as methods.
    save_metadata = save_metadata
    to_webdataset = to_webdataset
    search = search
    export_clip_retrieval = export_clip_retrieval
    info = info
    build_index = build_index
    open_index = open_index
    duplicate_groups = duplicate_groups
    decision_boundary = decision_boundary
    contamination_matches = contamination_matches

    def attach_embeddings(
        self,
        path: str,
        *,
        on: str | None = None,
        source_column: str | None = None,
        embedding_column: str = "image_embedding",
        error_column: str | None = None,
    ) -> ImageTextPairDataset:
        """A new dataset with the vectors found under ``path`` (clip-retrieval's layout) in ``embedding_column``:
        ``ops.attach.AttachEmbeddings`` (which says how rows are joined and what is checked) applied to this one."""
        from dask_clip.ops.attach import AttachEmbeddings

        options = {"on": on, "source_column": source_column, "error_column": error_column}
        return AttachEmbeddings(path, embedding_column=embedding_column, **options)(self)

    def __repr__(self) -> str:
        return (
            f"ImageTextPairDataset(path={self.path!r}, shards={len(self.shards)}, id_col={self.id_col!r}, "
            f"columns={list(self.metadata.columns)})"
        )
