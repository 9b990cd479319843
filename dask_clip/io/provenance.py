"""Provenance: what each file records about the columns dask_clip derived, and how a run knows what it
would produce.

A shard's parquet holds, in its key-value metadata under ``dask_clip``, a JSON document::

    {"format": 2, "id_col": "key",
     "shard": {"rows": 6, "ids": "<digest>"},                   # the rows this file holds
     "columns": {"image_embedding": <record>, "embedding_error": <record>, "keep": <record>}}

and each derived column's record says what produced it from what::

    {"operation": {...config...},                          # everything that changes the output
     "shard": {"rows": 6, "ids": "<digest>", "tar": {...}},  # the shard's rows (and tar, if read)
     "reads": {"image_embedding": "<digest>"},             # digests of the records of columns read
     "dataset": "<digest>",                                # cross-shard operations: every shard's inputs
     "reasons": {"image_embedding": "embedding_error"}}     # a null value has a reason in this column

A dataset knows the source of each derived column: ``Computed`` by an operation of this run (its record
is the same for every shard but for the shard's own identity and inputs), or ``Stored`` in the shards'
files (each shard's record is its own file's). An operation may also read ``Plain`` columns, which
came with the shards (a caption, img2dataset's ``sha256``): their record is a digest of their values.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

METADATA_KEY = b"dask_clip"
FORMAT = 2


def digest(value: Any) -> str:
    """A short, stable digest of a JSON-serialisable value (16 hex digits of its canonical JSON's sha256)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_operation(operation: Mapping[str, Any] | None) -> str:
    """A recorded configuration on one line: its class or function, then its options (the model first; versions
    as short digests): ``ClipImageEmbedder(model_dir='m', autocast=False, ...)``."""
    if operation is None:
        return "(no configuration recorded: an older dask_clip, or shards of several configurations moved together)"
    name = operation.get("class") or operation.get("function") or "?"
    first = [key for key in ("model_dir", "model_name", "model_path") if key in operation]
    rest = sorted(key for key in operation if key not in (*first, "class", "function"))
    shown = {key: digest(operation[key])[:8] if key.endswith("_version") else operation[key] for key in first + rest}
    return f"{name}(" + ", ".join(f"{key}={value!r}" for key, value in shown.items()) + ")"


def values_digest(values: pa.Array | pa.ChunkedArray) -> str:
    """A digest of a column's values and type (its Arrow IPC serialisation, whatever its chunking)."""
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    table = pa.table({"values": array})
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:16]


def ids_digest(ids: pa.Array | pa.ChunkedArray) -> str:
    """A digest of an id column's values in row order, as text (whatever string or integer type holds them)."""
    return values_digest(pc.cast(ids, pa.large_string()))


def file_identity(info: Mapping[str, Any]) -> dict[str, Any]:
    """A file's identity from its fsspec listing entry: its size and ETag (object stores) or modification time."""
    identity: dict[str, Any] = {"size": int(info.get("size") or 0)}
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            identity["etag" if key.lower() == "etag" else "mtime"] = str(info[key]).strip('"')
            break
    return identity


@dataclass(frozen=True)
class FileRecords:
    """What one parquet says about its derived columns: ``columns`` maps each to its record, or to None when
    the file was written by a dask_clip too old to record one (it is derived, but its provenance unknown)."""

    id_col: str | None = None
    shard: dict[str, Any] | None = None
    columns: dict[str, dict[str, Any] | None] = field(default_factory=dict)

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> FileRecords:
        raw = (schema.metadata or {}).get(METADATA_KEY)
        return cls.from_json(raw) if raw else cls()

    @classmethod
    def from_json(cls, raw: str | bytes) -> FileRecords:
        document = json.loads(raw)
        if document.get("format") == FORMAT:
            return cls(document.get("id_col"), document.get("shard"), dict(document.get("columns", {})))
        return cls(document.get("id_col"), None, dict.fromkeys(document.get("derived_columns", ())))

    def to_json(self) -> bytes:
        document = {"format": FORMAT, "id_col": self.id_col, "shard": self.shard, "columns": self.columns}
        return json.dumps(document, sort_keys=True).encode()


@dataclass(frozen=True, eq=False)
class Stored:
    """A derived column read from the shards' files: each shard carries its own file's record."""

    column: str


@dataclass(frozen=True, eq=False)
class Plain:
    """A column of the input files (not derived) that an operation reads: its record digests its values."""

    column: str


@dataclass(frozen=True, eq=False)
class Computed:
    """A derived column an operation computes in this run.

    ``operation`` is its configuration, ``reads`` the sources of the columns it reads, ``reads_tar`` whether
    it reads the shard's tar, ``cross_shard`` whether one shard's output depends on every shard, and
    ``reasons`` maps each column it writes that may be null to the column holding the reason.
    """

    operation: dict[str, Any]
    reads: Mapping[str, Stored | Plain | Computed] = field(default_factory=dict)
    reads_tar: bool = False
    cross_shard: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)


Source = Stored | Plain | Computed


@dataclass
class ShardInputs:
    """What a run knows of one shard before computing it: its identity, its own file's records of the
    derived columns it carries, and digests of the plain columns that operations read."""

    stem: str
    rows: int
    ids: str
    tar: dict[str, Any]
    records: dict[str, dict[str, Any] | None]
    values: dict[str, str]

    def identity(self, with_tar: bool = False) -> dict[str, Any]:
        identity: dict[str, Any] = {"rows": self.rows, "ids": self.ids}
        return {**identity, "tar": self.tar} if with_tar else identity


class ExpectedRecords:
    """The record each derived column would get in each shard: ``record(source, shard)``.

    Cross-shard sources fold every shard's inputs into one ``dataset`` digest, computed once per source.
    """

    def __init__(self, shards: list[ShardInputs]) -> None:
        self.shards = shards
        self._records: dict[tuple[int, int], dict[str, Any] | None] = {}
        self._datasets: dict[int, str] = {}

    def record(self, source: Source, shard: int) -> dict[str, Any] | None:
        key = (id(source), shard)
        if key not in self._records:
            self._records[key] = self._build(source, shard)
        return self._records[key]

    def _inputs(self, source: Computed, shard: int) -> dict[str, Any]:
        reads = {name: _digest_or_none(self.record(read, shard)) for name, read in sorted(source.reads.items())}
        return {"shard": self.shards[shard].identity(with_tar=source.reads_tar), "reads": reads}

    def _build(self, source: Source, shard: int) -> dict[str, Any] | None:
        if isinstance(source, Stored):
            return self.shards[shard].records.get(source.column)
        if isinstance(source, Plain):
            values = self.shards[shard].values.get(source.column)
            return None if values is None else {"values": values}
        record = {"operation": source.operation, **self._inputs(source, shard), "reasons": dict(source.reasons)}
        if source.cross_shard:
            record["dataset"] = self.dataset_digest(source)
        return record

    def dataset_digest(self, source: Computed) -> str:
        """The digest of every shard's inputs to ``source`` (stems, identities, digests of what it reads)."""
        if id(source) not in self._datasets:
            every = [[shard.stem, self._inputs(source, i)] for i, shard in enumerate(self.shards)]
            self._datasets[id(source)] = digest(every)
        return self._datasets[id(source)]


def _digest_or_none(record: dict[str, Any] | None) -> str | None:
    return None if record is None else digest(record)
