"""ImageTextPairDataset: the metadata of a folder of WebDataset shards, one Dask partition per shard."""

from __future__ import annotations

import functools
import logging
import posixpath
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import dask.dataframe as dd
import pandas as pd

from dask_clip.io.metadata import (
    ShardMetadataError,
    count_rows_with_errors,
    dask_clip_info,
    finished_output_summary,
    empty_frame,
    read_parquet_schema,
    read_shard_metadata,
    write_shard_metadata,
)
from dask_clip.backends import check_backend, convert
from dask_clip.distributed.progress import compute_shard_summaries, usable_resources
from dask_clip.embedders.base import TIMINGS_ATTR
from dask_clip.io.shards import Shard, discover_shards
from dask_clip.io.tar_samples import ShardReadError

logger = logging.getLogger(__name__)

IMAGE_BYTES_COLUMN = "image_bytes"
"""Name of the column that holds a sample's image bytes, when the metadata carries them."""

SHARD_COLUMNS = ["stem", "tar_url", "parquet_url"]
STAGE_COLUMNS = ["load_s", "wait_s", "decode_s", "infer_s", "write_s"]


class ShardProcessingError(RuntimeError):
    """An unexpected failure while processing one shard; the message starts with the shard's tar."""


@dataclass(frozen=True)
class ImageTextPairDataset:
    """A folder of image-text shards: the metadata frame, the shards it came from and the id column.

    ``metadata`` has one partition per shard, aligned with ``shards`` (and ``tar_files``); every
    operation returns a new dataset and leaves this one unchanged.
    ``derived_columns`` maps each column that dask_clip computed to the configuration that produced it.
    ``backend`` is the dataframe library of ``metadata``: ``"pandas"`` or ``"cudf"`` (GPU extra).
    """

    path: str
    metadata: dd.DataFrame
    shards: tuple[Shard, ...]
    id_col: str = "key"
    derived_columns: Mapping[str, Any] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)
    backend: str = "pandas"

    @classmethod
    def from_webdataset(cls, path: str, id_col: str = "key", backend: str = "pandas") -> "ImageTextPairDataset":
        """Read the shard pairs of ``path`` (a local folder or any fsspec URL) lazily.

        Only the folder listing and the first parquet's footer are read on the client; each shard's
        parquet is read by its own task, which checks its ids and columns. ``backend="cudf"`` (GPU
        extra) gives a dask_cudf ``metadata``; dask_clip's operations convert to pandas per shard.
        """
        check_backend(backend)
        shards = tuple(discover_shards(path))
        first_schema = read_parquet_schema(shards[0].parquet_url)
        meta = empty_frame(first_schema)
        if id_col not in meta.columns:
            raise ValueError(f"{shards[0].parquet_url}: no id column {id_col!r}; columns are {list(meta.columns)}")
        derived = set(dask_clip_info(first_schema).get("derived_columns", ()))
        read = functools.partial(read_shard_metadata, id_col=id_col, meta=meta, derived_columns=frozenset(derived))
        metadata = dd.from_map(
            read, [shard.parquet_url for shard in shards], meta=meta, enforce_metadata=False, label="read-shard-metadata"
        )
        configs = dask_clip_info(first_schema).get("configs", {})
        derived_configs = {column: configs.get(column) for column in derived}
        return cls(path, convert(metadata, backend), shards, id_col, derived_configs, backend=backend)

    @property
    def pandas_metadata(self) -> dd.DataFrame:
        """``metadata`` on the pandas backend: what dask_clip's operations compute on."""
        return convert(self.metadata, "pandas")

    @property
    def tar_files(self) -> list[str]:
        """The tar of each partition, in partition order."""
        return [shard.tar_url for shard in self.shards]

    def with_metadata(
        self,
        metadata: dd.DataFrame,
        derived_columns: Mapping[str, Any] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> "ImageTextPairDataset":
        """A new dataset with ``metadata`` replaced (same shards, one partition each), on this dataset's backend."""
        if metadata.npartitions != len(self.shards):
            raise ValueError(
                f"metadata has {metadata.npartitions} partitions but the dataset has {len(self.shards)} shards: "
                "an operation must keep one partition per shard"
            )
        return replace(
            self,
            metadata=convert(metadata, self.backend),
            derived_columns={**self.derived_columns, **(derived_columns or {})},
            resources={**self.resources, **(resources or {})},
        )

    def shard_frame(self) -> dd.DataFrame:
        """A Dask frame with one row per shard (``stem``, ``tar_url``, ``parquet_url``), one partition each."""
        rows = [pd.DataFrame([[s.stem, s.tar_url, s.parquet_url]], columns=SHARD_COLUMNS) for s in self.shards]
        return dd.from_map(lambda frame: frame, rows, meta=rows[0].iloc[:0], label="shards", enforce_metadata=False)

    def map_shards(self, function: Callable[..., pd.DataFrame], meta: pd.DataFrame, **kwargs: Any) -> dd.DataFrame:
        """``function(rows, tar_url=..., id_col=..., **kwargs)`` on each shard's rows -> a frame like ``meta``.

        Each task is handed its own shard's tar, never the list of all shards.
        """

        def on_partition(rows: pd.DataFrame, shard: pd.DataFrame) -> pd.DataFrame:
            tar_url = shard["tar_url"].iloc[0]
            try:
                return function(rows, tar_url=tar_url, id_col=self.id_col, **kwargs)
            except (ShardReadError, ShardMetadataError):
                raise  # these name the file already
            except Exception as error:
                raise ShardProcessingError(f"{tar_url}: {type(error).__name__}: {error}") from error

        return dd.map_partitions(
            on_partition, self.pandas_metadata, self.shard_frame(), meta=meta, align_dataframes=False, enforce_metadata=False
        )

    def save_metadata(
        self, path: str | None = None, columns: Sequence[str] | None = None, overwrite: bool = False,
        progress: bool = False,
    ) -> pd.DataFrame:
        """Compute and write one parquet per shard, named like the shard (``00042.parquet``).

        Files go next to the shards (replacing the input parquet, whose every row and column is kept)
        or into ``path``; each appears atomically. ``columns`` limits the columns written (the id
        column is always kept).

        Re-runs resume: a shard whose file already holds these columns, computed with the same
        configurations, with every row either computed or given a reason, is skipped without being
        computed again. ``overwrite=True`` recomputes and rewrites every shard.

        ``progress`` shows a bar (shards done, rows per second) on a distributed client.

        Returns one row per shard: ``stem``, ``path``, ``rows``, ``errors`` (rows with a reason
        instead of a value), ``written`` (False where skipped) and the shard's stage timings in
        seconds: ``load_s``, ``wait_s``, ``decode_s``, ``infer_s`` (see ``embedders.base.TIMINGS_ATTR``;
        NaN where nothing was embedded) and ``write_s``.
        """
        output_root = (path or self.path).rstrip("/")
        selected = self._columns_to_write(columns)
        derived = {c: cfg for c, cfg in self.derived_columns.items() if c in selected}
        info = {"derived_columns": sorted(derived), "configs": derived, "id_col": self.id_col}
        urls = [posixpath.join(output_root, f"{shard.stem}.parquet") for shard in self.shards]

        finished = self._finished_outputs(urls, selected, info) if derived and not overwrite else [None] * len(urls)
        todo = [i for i, status in enumerate(finished) if status is None]
        skipped = [
            {"stem": self.shards[i].stem, "path": urls[i], **status, "written": False}
            for i, status in enumerate(finished) if status is not None
        ]
        summary_meta = pd.DataFrame(
            {"stem": [""], "path": [""], "rows": [0], "errors": [0], "written": [True], **{c: [0.0] for c in STAGE_COLUMNS}}
        ).iloc[:0]
        if not todo:
            return pd.DataFrame(skipped, columns=summary_meta.columns).astype(summary_meta.dtypes.to_dict())
        if skipped:
            logger.info("%d of %d shards already hold complete output; skipping them", len(skipped), len(urls))

        def write(rows: pd.DataFrame, shard: pd.DataFrame) -> pd.DataFrame:
            stem = shard["stem"].iloc[0]
            url = posixpath.join(output_root, f"{stem}.parquet")
            output = rows[selected]
            started = time.perf_counter()
            write_shard_metadata(output, url, info)
            timings = {**dict.fromkeys(STAGE_COLUMNS, float("nan")), **rows.attrs.get(TIMINGS_ATTR, {})}
            timings["write_s"] = time.perf_counter() - started
            summary = {"stem": stem, "path": url, "rows": len(output), "errors": count_rows_with_errors(output, info)}
            return pd.DataFrame([{**summary, "written": True, **timings}])

        written = dd.map_partitions(
            write,
            self.pandas_metadata.partitions[todo],
            self.shard_frame().partitions[todo],
            meta=summary_meta,
            align_dataframes=False,
            enforce_metadata=False,
        )
        computed = compute_shard_summaries(written, dict(self.resources), progress)
        frames = [computed] + ([pd.DataFrame(skipped, columns=summary_meta.columns)] if skipped else [])
        result = pd.concat(frames)
        order = {shard.stem: i for i, shard in enumerate(self.shards)}
        result = result.sort_values("stem", key=lambda stems: stems.map(order)).reset_index(drop=True)
        return result.astype(summary_meta.dtypes.to_dict())

    def to_webdataset(
        self,
        path: str,
        filter_column: str | None = None,
        samples_per_shard: int = 10_000,
        max_shards: int = 5,
        old_id_col: str | None = None,
    ) -> pd.DataFrame:
        """Write the rows where ``filter_column`` is True as new shards with new ids (see ``dask_clip.ops.reshard``)."""
        from dask_clip.ops.reshard import to_webdataset

        return to_webdataset(self, path, filter_column, samples_per_shard, max_shards, old_id_col)

    def search(
        self, text: str | None = None, image: Any = None, k: int = 10, model_dir: str | None = None,
        embedding_column: str = "image_embedding",
    ) -> pd.DataFrame:
        """Exact top-``k`` rows by cosine similarity to a text or image query (see ``dask_clip.ops.search``)."""
        from dask_clip.ops.search import search

        return search(self, text, image, k, model_dir, embedding_column)

    def export_clip_retrieval(
        self, path: str, embedding_column: str = "image_embedding", metadata_columns: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Write embeddings in clip-retrieval's ``img_emb/`` + ``metadata/`` layout (see ``dask_clip.ops.export``)."""
        from dask_clip.ops.export import export_clip_retrieval

        return export_clip_retrieval(self, path, embedding_column, metadata_columns)

    def _finished_outputs(self, urls: list[str], columns: list[str], info: dict[str, Any]) -> list[dict[str, int] | None]:
        """Per output file, its ``{"rows", "errors"}`` when it is already complete, else None (checked on the cluster)."""
        import dask.bag as db

        check = functools.partial(finished_output_summary, columns=columns, info=info)
        bag = db.from_sequence(urls, npartitions=min(len(urls), 256)).map(check)
        return list(bag.compute())

    def _columns_to_write(self, columns: Sequence[str] | None) -> list[str]:
        available = list(self.metadata.columns)
        if columns is None:
            return available
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; the dataset has {available}")
        return [self.id_col] + [c for c in columns if c != self.id_col]

    def _compute(self, collection: Any) -> Any:
        """Compute on the current Dask client (asking for ``resources`` when its workers offer them)."""
        from distributed import get_client

        try:
            client = get_client()
        except ValueError:
            return collection.compute()
        return client.compute(collection, resources=usable_resources(client, dict(self.resources)) or None).result()

    def __repr__(self) -> str:
        return (
            f"ImageTextPairDataset(path={self.path!r}, shards={len(self.shards)}, id_col={self.id_col!r}, "
            f"columns={list(self.metadata.columns)})"
        )
