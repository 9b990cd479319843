"""Provenance: what each file records about the columns dask_clip derived, and how a run knows what it
would produce.

A shard's parquet holds, in its key-value metadata under ``dask_clip``, a JSON document::

    {"format": 2, "id_col": "key",
     "shard": {"rows": 6, "ids": "<digest>"},                   # the rows this file holds
     "columns": {"image_embedding": <record>, "embedding_error": <record>, "keep": <record>},
     "contents": {"image_embedding": "<digest>", "embedding_error": "<digest>", "keep": "<digest>"},
     "vectors": {"image_embedding": {"layout": "list", "width": 512}},  # how each vector column is stored
     "properties": {"image_embedding": {"engine": "torch"}}}            # how it was computed (not its identity)

and each derived column's record says what produced it from what::

    {"operation": {...config...},                          # everything that changes the output
     "shard": {"rows": 6, "ids": "<digest>", "tar": {...}},  # the shard's rows (and tar, if read)
     "reads": {"image_embedding": "<digest>"},             # digests of the records of columns read
     "dataset": "<digest>",                                # cross-shard operations: every shard's inputs
     "reasons": {"image_embedding": "embedding_error"}}     # a null value has a reason in this column

``contents`` holds the digest of each derived column's values as written (``content_digest``; null where it is
not known: a column carried over from a file of an older dask_clip). It sits beside the records, not in them: a
record says what a run would produce, the digest what the file held when dask_clip wrote it, so an edit that
keeps the footer (pyarrow keeps it by default) shows as values that no longer match their digest.

``vectors`` says the on-disk layout and width of each vector column (``io.vectors``; absent in files of an
older dask_clip, which wrote ``fixed_size_list<float32>[D]``). It too sits outside the records: a layout is
how a file stores a column, not what produced it, so a change of layout alone never makes a column stale.

``properties`` says how each column was computed where that does not change what it holds: the engine that ran a
model (``{"engine": "openvino"}``), whose agreement with the others is checked before it runs
(``models.openvino.AGREEMENT``). They sit outside the records too: shards computed by torch and shards computed by
OpenVINO hold one column, and a run with another engine finishes, never redoes, a column (absent: not recorded).

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

import numpy as np
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


def plain_digest(values: pa.Array | pa.ChunkedArray) -> str:
    """The digest of a column that came with the shards (``values_digest``), as an operation records what it read.

    A column whose every row is null digests as its length alone, whatever its type: pandas writes an all-None
    column as Arrow's ``null`` type, which reads as the dataset's type and is written back so by a save. A list
    column (another tool's vectors) digests by its values (``content_digest``), not by its buffers, which hold
    whatever a writer left under null rows. Neither may make what read the column stale once a save rewrites it.
    """
    if values.null_count == len(values):
        return digest({"null rows": len(values)})
    kind = values.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return content_digest(values)
    return values_digest(values)


def content_digest(values: pa.Array | pa.ChunkedArray) -> str:
    """A digest of a column's values: which rows are null, and the others' values, whatever the chunking.

    A list column (a vector per row) digests its validity, its rows' lengths and its flat values, so
    ``fixed_size_list<float32>`` and ``list<float32>`` holding the same vectors have the same digest (and
    float16 values digest as the float32 values they read back as: ``io.vectors``' float16 layout); strings
    and binaries digest alike whatever their offsets' width. It costs one sha256 pass over the values: about
    55 ms for a 10,000 x 768 float32 column (31 MB).
    """
    array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    hasher = hashlib.sha256()
    _feed(hasher, array)
    return hasher.hexdigest()[:16]


def _feed(hasher: Any, array: pa.Array) -> None:
    """Add ``array``'s length, null rows and non-null values to ``hasher`` (lists recursively, by their flat values)."""
    hasher.update(np.int64(len(array)).tobytes())
    if array.null_count:
        hasher.update(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)).astype(np.int64).tobytes())
    kind = array.type
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        hasher.update(b"list")
        hasher.update(pc.list_value_length(array).fill_null(0).cast(pa.int64()).to_numpy())
        _feed(hasher, pc.list_flatten(array))
        return
    present = array.drop_null()
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or (pa.types.is_large_binary(kind))
    ):
        hasher.update(b"binary")
        binary = present.cast(pa.large_binary())
        offsets = np.frombuffer(binary.buffers()[1], np.int64)[binary.offset : binary.offset + len(binary) + 1]
        hasher.update(np.diff(offsets))
        if len(binary):
            hasher.update(memoryview(binary.buffers()[2])[offsets[0] : offsets[-1]])
        return
    if pa.types.is_float16(kind):  # read back as float32: digested as such
        present, kind = present.cast(pa.float32()), pa.float32()
    hasher.update(str(kind).encode())
    if pa.types.is_primitive(kind):
        hasher.update(np.ascontiguousarray(present.to_numpy(zero_copy_only=False)))
    else:  # a struct, a dictionary...: rare in derived columns, digested through its Python values
        hasher.update(json.dumps(present.to_pylist(), default=str).encode())


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
    the file was written by a dask_clip too old to record one (it is derived, but its provenance unknown);
    ``contents`` maps each to the ``content_digest`` of its values as written (None or absent: not known);
    ``vectors`` maps each vector column to its on-disk ``layout`` and ``width`` (absent: an older file);
    ``properties`` maps each to how it was computed, never part of its identity (absent: not recorded)."""

    id_col: str | None = None
    shard: dict[str, Any] | None = None
    columns: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    contents: dict[str, str | None] = field(default_factory=dict)
    vectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    properties: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_schema(cls, schema: pa.Schema) -> FileRecords:
        raw = (schema.metadata or {}).get(METADATA_KEY)
        return cls.from_json(raw) if raw else cls()

    @classmethod
    def from_json(cls, raw: str | bytes) -> FileRecords:
        document = json.loads(raw)
        if document.get("format") == FORMAT:
            columns, contents = dict(document.get("columns", {})), dict(document.get("contents", {}))
            vectors, properties = dict(document.get("vectors", {})), dict(document.get("properties", {}))
            return cls(document.get("id_col"), document.get("shard"), columns, contents, vectors, properties)
        return cls(document.get("id_col"), None, dict.fromkeys(document.get("derived_columns", ())))

    def to_json(self) -> bytes:
        document = {
            "format": FORMAT,
            "id_col": self.id_col,
            "shard": self.shard,
            "columns": self.columns,
            "contents": self.contents,
            **({"vectors": self.vectors} if self.vectors else {}),
            **({"properties": self.properties} if self.properties else {}),
        }
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
    it reads the shard's tar, ``cross_shard`` whether one shard's output depends on every shard,
    ``reasons`` maps each column it writes that may be null to the column holding the reason, and ``properties``
    says how it computes them without changing what they hold (its engine: never part of their identity).
    """

    operation: dict[str, Any]
    reads: Mapping[str, Stored | Plain | Computed] = field(default_factory=dict)
    reads_tar: bool = False
    cross_shard: bool = False
    reasons: Mapping[str, str] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)


Source = Stored | Plain | Computed


@dataclass
class ShardInputs:
    """What a run knows of one shard before computing it: its identity, its own file's records of the
    derived columns it carries and the content digests it records for them (``contents``), digests of the
    plain columns that operations read, and the derived columns operations read whose values no longer
    match their content digest (``changed``: the file was edited since dask_clip wrote it), and the properties its
    file records of the derived columns it carries (``properties``)."""

    stem: str
    rows: int
    ids: str
    tar: dict[str, Any]
    records: dict[str, dict[str, Any] | None]
    values: dict[str, str]
    contents: dict[str, str | None] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    properties: dict[str, dict[str, Any]] = field(default_factory=dict)

    def identity(self, with_tar: bool = False) -> dict[str, Any]:
        identity: dict[str, Any] = {"rows": self.rows, "ids": self.ids}
        return {**identity, "tar": self.tar} if with_tar else identity


class ExpectedRecords:
    """The record each derived column would get in each shard: ``record(source, shard)``.

    Cross-shard sources fold every shard's inputs into one ``dataset`` digest, computed once per source.
    ``saved_together``: the stored columns were read as they were computed, in the save that wrote them with the
    columns read from them (their record alone, ``read_digests``).
    """

    def __init__(self, shards: list[ShardInputs], saved_together: bool = False) -> None:
        self.shards = shards
        self.saved_together = saved_together
        self._records: dict[tuple[int, int], dict[str, Any] | None] = {}
        self._datasets: dict[int, str] = {}

    def record(self, source: Source, shard: int) -> dict[str, Any] | None:
        key = (id(source), shard)
        if key not in self._records:
            self._records[key] = self._build(source, shard)
        return self._records[key]

    def _inputs(self, source: Computed, shard: int) -> dict[str, Any]:
        reads = {name: self._read_digest(read, shard) for name, read in sorted(source.reads.items())}
        return {"shard": self.shards[shard].identity(with_tar=source.reads_tar), "reads": reads}

    def _read_digest(self, source: Source, shard: int) -> str | None:
        """The digest of what an operation reads from ``source``: its record and, for a column stored in a file
        that records its content digest, that digest (and whether the values still match it)."""
        inputs = self.shards[shard]
        if not isinstance(source, Stored) or self.saved_together:
            return _digest_or_none(self.record(source, shard))
        return read_digest(
            self.record(source, shard), inputs.contents.get(source.column), source.column in inputs.changed
        )

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


def read_digest(record: dict[str, Any] | None, contents: str | None, changed: bool) -> str | None:
    """What an operation records of a stored column it read (its ``reads``): the digest of the column's record
    and, where its file records a content digest, of that digest and whether the values still matched it."""
    if contents is None:
        return _digest_or_none(record)
    return digest({"record": record, "contents": contents, "changed": changed})


def read_digests(record: dict[str, Any] | None, contents: str | None) -> set[str | None]:
    """What an operation may have recorded of reading a stored column whose file records ``record`` and ``contents``
    (footers only: values edited since are refused where they are read): ``read_digest``, or its record alone where
    the operation read the column as it was computed and saved with it (``dask-clip filter --by``: a score and its
    filter), before its content digest was known."""
    return {read_digest(record, contents, False), _digest_or_none(record)}


def _digest_or_none(record: dict[str, Any] | None) -> str | None:
    return None if record is None else digest(record)
