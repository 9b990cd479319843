"""Write a dataset's kept rows as new WebDataset shards (``NNNNN.tar`` + ``NNNNN.parquet``) with new ids.

Three parallel passes, no loop over samples on the client:

1. each input shard's task checks that the saved derived columns it carries still hold what their file's
   content digests say (new shards record fresh digests, which would hide an edit), writes its rows, marked
   kept (``filter_column`` True) or not, to a staging parquet that also records the provenance of its
   derived columns, and returns how many it kept;
2. the client turns the counts into global offsets: kept row ``g`` becomes row ``g % samples_per_shard``
   of output shard ``g // samples_per_shard``;
3. each input shard's task streams its own tar once and appends every kept sample's members, renamed to
   the new key, to one tar *piece* per output shard it feeds (a member at a time, never a whole sample in
   memory); then each output shard's task writes its parquet from the staged rows and its tar by
   concatenating its pieces (raw tar blocks, in input order).

Everything is written into a fresh hidden sibling of the output folder, which replaces the output folder
as a whole at the end (``io.atomic.replacing_folder``): the output folder must be visible to every worker
(a shared filesystem or object storage).
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.arguments import at_least, one_of
from dask_clip.columns import BOOL, STRING
from dask_clip.dataset.consistency import check_consumed
from dask_clip.dataset.plan import expected_records
from dask_clip.errors import ColumnError, ShardReadError, UsageError
from dask_clip.execution import ShardRef, ShardTask, compute, failures_named
from dask_clip.io.metadata import (
    arrow_to_pandas,
    check_contents,
    shard_identity,
    table_in_memory,
    write_shard_metadata,
)
from dask_clip.io.output_folder import OutputKind, replacing_folder
from dask_clip.io.shards import filesystem_of
from dask_clip.io.tar_samples import DEFAULT_MAX_SAMPLE_BYTES, RowKeys, iter_tar_members
from dask_clip.io.tar_writing import concatenate_tar_pieces, copy_member, write_member
from dask_clip.io.vectors import DEFAULT_LAYOUT, LAYOUTS, check_writable
from dask_clip.provenance import FileRecords, digest, file_identity

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

SUMMARY_COLUMNS = {"stem": "", "tar_path": "", "parquet_path": "", "rows": 0, "samples": 0, "unparsed_json": 0}
OUTPUT = OutputKind("to_webdataset")
"""A reshard's output: a dataset, which a folder written before manifests cannot be told from."""
KEPT = "_dask_clip_kept"
"""The staging column that marks the rows kept."""


@dataclass(frozen=True)
class KeyFormat:
    """New ids: ``{shard:0{shard_digits}d}{index:0{index_digits}d}``, as img2dataset names them."""

    samples_per_shard: int
    shard_digits: int

    @property
    def index_digits(self) -> int:
        return len(str(self.samples_per_shard - 1))

    def stem(self, shard: int) -> str:
        return f"{shard:0{self.shard_digits}d}"

    def key(self, global_position: int) -> str:
        shard, index = divmod(global_position, self.samples_per_shard)
        return f"{self.stem(shard)}{index:0{self.index_digits}d}"


@dataclass(frozen=True)
class Segment:
    """Kept rows ``[start, stop)`` (positions among one input shard's kept rows) that go to one output shard."""

    input_index: int
    start: int
    stop: int


def plan_output_shards(counts: Sequence[int], samples_per_shard: int) -> list[list[Segment]]:
    """Per output shard, the segments of input shards it holds, in input order (from kept counts per input)."""
    plan: list[list[Segment]] = [[] for _ in range(math.ceil(sum(counts) / samples_per_shard))]
    offset = 0
    for input_index, count in enumerate(counts):
        first, last = offset // samples_per_shard, (offset + count - 1) // samples_per_shard
        for shard in range(first, last + 1) if count else ():
            start = max(offset, shard * samples_per_shard) - offset
            stop = min(offset + count, (shard + 1) * samples_per_shard) - offset
            plan[shard].append(Segment(input_index, start, stop))
        offset += count
    return plan


def to_webdataset(
    dataset: ImageTextPairDataset,
    path: str,
    filter_column: str | None = None,
    samples_per_shard: int = 10_000,
    max_shards: int = 5,
    old_id_col: str | None = None,
    overwrite: bool = False,
    vector_layout: str = DEFAULT_LAYOUT,
) -> pd.DataFrame:
    """Write the rows where ``filter_column`` is True (all rows when None; null counts as False) to ``path``.

    Output shards hold ``samples_per_shard`` rows each (the last one fewer), are named with
    ``max_shards`` digits (``00000.tar`` + ``00000.parquet``), and give row ``i`` of shard ``s`` the new
    id ``f"{s:05d}{i:04d}"`` (digits from ``max_shards`` and ``samples_per_shard``) in the id column;
    ``old_id_col`` keeps the old id. Rows keep every column, in input order, and each derived column
    keeps its provenance (noting that it was moved). Each kept sample's tar members are copied byte for
    byte under the new key (the extension as written), except ``.json``, whose id field (named like the
    id column) is set to the new id (and ``old_id_col`` to the old one); a ``.json`` that is not a JSON
    object is copied unchanged and counted in ``unparsed_json``. A kept row without a sample in the tar
    (a failed download) stays in the parquet with no tar members. Tar keys are matched to rows as the
    embedder matches them: a key no row has is an error naming the tar.

    ``path`` is written as a whole (``io.output_folder``): never the dataset's folder, one inside it or above it;
    a folder that is not empty is refused unless ``overwrite=True`` and an earlier ``to_webdataset`` wrote it,
    and is then replaced once the new shards are complete.
    A derived column (the ``filter_column``, or any column carried) that the shards' files do not hold from one
    run over their current rows (``dataset.consistency``) is refused, before anything is written: the new
    shards' records could not say which run produced which rows.

    ``vector_layout`` is how the new parquets hold embedding columns, as for ``save_metadata``.

    Returns one row per output shard: ``stem``, ``tar_path``, ``parquet_path``, ``rows``, ``samples``,
    ``unparsed_json``.
    """
    one_of("vector_layout", vector_layout, LAYOUTS)
    check_writable(vector_layout)
    columns = list(dataset.meta.columns)
    _check_arguments(dataset, columns, filter_column, samples_per_shard, max_shards, old_id_col)
    # every derived column is carried into the new shards' records: one mixing two runs would lose that it does
    check_consumed(dataset, [c for c in columns if c in dataset.provenance], "to_webdataset")
    records = expected_records(dataset, columns)
    output_url = path.rstrip("/")
    with replacing_folder(output_url, overwrite, OUTPUT, dataset.path) as fresh:
        staging = posixpath.join(fresh, ".staging")
        counts = _stage_rows(dataset, staging, filter_column, records)
        plan = plan_output_shards(counts, samples_per_shard)
        if len(plan) > 10**max_shards:
            raise UsageError(
                f"{sum(counts)} kept rows need {len(plan)} shards of {samples_per_shard}, more than "
                f"max_shards={max_shards} digits can name"
            )
        keys = KeyFormat(samples_per_shard, max_shards)
        offsets = [0, *itertools.accumulate(counts)][:-1]
        pieces = {
            i: dask.delayed(write_tar_pieces, pure=False)(
                ShardRef.of(i, shard), staging, offsets[i], keys, dataset.id_col, old_id_col
            )
            for i, shard in enumerate(dataset.shards)
            if counts[i]
        }
        outputs = [
            dask.delayed(write_output_shard, pure=False)(
                number,
                [(_staged_url(staging, dataset.shards[s.input_index].stem), s.start, s.stop) for s in segments],
                [pieces[s.input_index] for s in segments],
                fresh,
                output_url,
                keys,
                dataset.id_col,
                old_id_col,
                vector_layout,
            )
            for number, segments in enumerate(plan)
        ]
        summary = compute(dask.delayed(pd.DataFrame)(outputs, columns=list(SUMMARY_COLUMNS)))
        fs, staging_path = filesystem_of(staging)
        fs.rm(staging_path, recursive=True)
    return summary.astype({c: type(v) for c, v in SUMMARY_COLUMNS.items()})


def _check_arguments(
    dataset: ImageTextPairDataset,
    columns: list[str],
    filter_column: str | None,
    samples_per_shard: int,
    max_shards: int,
    old_id_col: str | None,
) -> None:
    at_least("samples_per_shard", samples_per_shard)
    at_least("max_shards", max_shards)
    if filter_column is not None:
        if filter_column not in columns:
            raise ColumnError(f"no filter column {filter_column!r}; the dataset has {columns}")
        dtype = dataset.meta[filter_column].dtype
        if not pd.api.types.is_bool_dtype(dtype):
            raise ColumnError(f"filter column {filter_column!r} is {dtype}, not boolean")
    if old_id_col is not None and old_id_col in columns:
        raise UsageError(f"old_id_col {old_id_col!r} is already a column of the dataset")


def _staged_url(staging: str, stem: str) -> str:
    return posixpath.join(staging, f"rows-{stem}.parquet")


def _stage_rows(
    dataset: ImageTextPairDataset, staging: str, filter_column: str | None, records: list[FileRecords]
) -> list[int]:
    """Pass 1: every input shard writes its rows, marked kept or not, with its records, to the staging folder;
    returns the kept counts, in shard order."""

    def stage(rows: pd.DataFrame, task: ShardTask) -> pd.DataFrame:
        kept = np.ones(len(rows), dtype=bool)
        if filter_column is not None:
            kept = np.asarray(rows[filter_column].fillna(False), dtype=bool)
        staged = rows.reset_index(drop=True).assign(**{KEPT: pd.array(kept, dtype=BOOL)})
        shard_records = FileRecords.from_json(task.payload)
        check_contents(rows, shard_records.contents, task.shard.parquet_url)  # new shards get fresh digests
        write_shard_metadata(staged, _staged_url(staging, task.shard.stem), shard_records)
        return pd.DataFrame({"kept": [int(kept.sum())]})

    meta = pd.DataFrame({"kept": pd.Series([], dtype="int64")})
    staged = dataset.map_shards(
        stage,
        meta,
        payloads=[shard_records.to_json().decode() for shard_records in records],
        label="reshard-stage",
    )
    counts = compute(staged)
    return [int(n) for n in counts["kept"]]


def rewrite_sidecar(payload: bytes, id_col: str, new_id: str, old_id_col: str | None, old_id: str) -> bytes | None:
    """A sample's ``.json`` with its id set to ``new_id`` (and ``old_id_col`` to ``old_id``); None when it is
    not a JSON object (it is then copied as it is)."""
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    record[id_col] = new_id
    if old_id_col is not None:
        record[old_id_col] = old_id
    return json.dumps(record).encode()


@dataclass(frozen=True)
class Piece:
    """What pass 3a wrote of one input shard for one output shard: a staged tar at ``url`` holding the members of
    ``samples`` samples, ``unparsed_json`` of whose ``.json`` members were copied unchanged (not valid JSON)."""

    url: str
    samples: int
    unparsed_json: int


@dataclass
class _PieceWriter:
    """A piece being written: its open file, and the keys of the samples and the unparsed ``.json`` so far."""

    url: str
    file: Any
    keys: set[str] = field(default_factory=set)
    unparsed_json: int = 0

    def piece(self) -> Piece:
        return Piece(self.url, len(self.keys), self.unparsed_json)


def write_tar_pieces(
    shard: ShardRef, staging: str, offset: int, keys: KeyFormat, id_col: str, old_id_col: str | None
) -> dict[int, Piece]:
    """Pass 3a, one input shard: stream its tar once, appending each kept sample's members under the new key
    to the piece of the output shard it goes to. Returns each output shard's ``Piece``."""
    with failures_named(shard.tar_url):
        fs, staged_path = filesystem_of(_staged_url(staging, shard.stem))
        with fs.open(staged_path, "rb") as file:
            staged = arrow_to_pandas(pq.read_table(file, columns=[id_col, KEPT]))
        rows = RowKeys(staged[id_col], shard.tar_url)
        kept = np.asarray(staged[KEPT], dtype=bool)
        kept_positions = np.cumsum(kept) - 1  # a kept row's position among the kept rows
        writers: dict[int, _PieceWriter] = {}
        unknown: dict[str, None] = {}
        sample_bytes: dict[str, int] = {}
        try:
            for member in iter_tar_members(shard.tar_url):
                position = rows.position(member.key)
                if position is None:
                    unknown[member.key] = None
                    continue
                if not kept[position]:
                    continue
                sample_bytes[member.key] = sample_bytes.get(member.key, 0) + member.size
                if sample_bytes[member.key] > DEFAULT_MAX_SAMPLE_BYTES:
                    raise ShardReadError(
                        f"{shard.tar_url}: sample {member.key!r}: its members hold more than "
                        f"{DEFAULT_MAX_SAMPLE_BYTES} bytes (counting sparse members in full)"
                    )
                global_position = offset + int(kept_positions[position])
                output = global_position // keys.samples_per_shard
                new_key = keys.key(global_position)
                if output not in writers:
                    url = posixpath.join(staging, f"piece-{keys.stem(output)}-{shard.stem}.tar")
                    writers[output] = _PieceWriter(url, fs.open(filesystem_of(url)[1], "wb"))
                writer = writers[output]
                name = f"{new_key}.{member.extension}"
                if member.extension.lower() == "json":
                    payload = member.read()
                    rewritten = rewrite_sidecar(payload, id_col, new_key, old_id_col, member.key)
                    write_member(writer.file, name, payload if rewritten is None else rewritten)
                    writer.unparsed_json += rewritten is None
                else:
                    copy_member(writer.file, name, member.size, member)
                writer.keys.add(member.key)
        finally:
            for writer in writers.values():
                writer.file.close()
        if unknown:
            raise rows.unknown_keys_error(list(unknown), id_col)
        return {output: writer.piece() for output, writer in writers.items()}


def write_output_shard(
    number: int,
    segments: list[tuple[str, int, int]],
    pieces: list[dict[int, Piece]],
    folder: str,
    final_folder: str,
    keys: KeyFormat,
    id_col: str,
    old_id_col: str | None,
    vector_layout: str = DEFAULT_LAYOUT,
) -> dict[str, Any]:
    """Pass 3b, one output shard: its parquet from the kept staged rows of ``segments`` (staged url, start,
    stop), with new ids and their moved provenance, and its tar from its pieces of each input shard, in
    input order. Written into ``folder``; the paths returned are those in ``final_folder``."""
    stem = keys.stem(number)
    tar_url = posixpath.join(folder, f"{stem}.tar")
    with failures_named(posixpath.join(final_folder, f"{stem}.tar")):
        frames, sources = [], []
        for staged_url, start, stop in segments:
            fs, staged_path = filesystem_of(staged_url)
            with fs.open(staged_path, "rb") as file:
                table = pq.read_table(file)
            staged = arrow_to_pandas(table_in_memory(table, staged_url))
            frames.append(staged[np.asarray(staged[KEPT], dtype=bool)].iloc[start:stop].drop(columns=KEPT))
            sources.append(FileRecords.from_schema(table.schema))
        rows = pd.concat(frames, ignore_index=True)
        first = number * keys.samples_per_shard
        if old_id_col is not None:
            rows.insert(rows.columns.get_loc(id_col) + 1, old_id_col, rows[id_col])
        rows[id_col] = pd.array([keys.key(first + i) for i in range(len(rows))], dtype=STRING)

        own_pieces = [piece[number] for piece in pieces if number in piece]
        concatenate_tar_pieces([piece.url for piece in own_pieces], tar_url)
        fs = filesystem_of(tar_url)[0]
        identity = {**shard_identity(rows, id_col), "tar": file_identity(fs.info(filesystem_of(tar_url)[1]))}
        records = moved_records(sources, identity, id_col)
        write_shard_metadata(rows, posixpath.join(folder, f"{stem}.parquet"), records, vector_layout)
    return {
        "stem": stem,
        "tar_path": posixpath.join(final_folder, f"{stem}.tar"),
        "parquet_path": posixpath.join(final_folder, f"{stem}.parquet"),
        "rows": len(rows),
        "samples": sum(piece.samples for piece in own_pieces),
        "unparsed_json": sum(piece.unparsed_json for piece in own_pieces),
    }


def moved_records(sources: list[FileRecords], identity: dict[str, Any], id_col: str) -> FileRecords:
    """The records of an output shard's derived columns, from those of the input shards its rows come from.

    Each keeps the operation that produced it when every input shard agrees on it (else ``None``: the
    column mixes configurations), the digests of the records it was moved from, and the new shard's identity; and
    its properties (``provenance``) where every input shard records the same, else each one under ``"mixed"``.
    """
    columns: dict[str, dict[str, Any] | None] = {}
    properties: dict[str, dict[str, Any]] = {}
    for column in dict.fromkeys(c for source in sources for c in source.columns):
        originals = [source.columns.get(column) for source in sources]
        operations = {digest(record["operation"]) if record else None for record in originals}
        reasons = {digest(record.get("reasons", {})) if record else None for record in originals}
        first = originals[0] or {}
        columns[column] = {
            "operation": first.get("operation") if len(operations) == 1 else None,
            "moved": {"by": "to_webdataset", "from": sorted({digest(r) if r else "unknown" for r in originals})},
            "shard": identity,
            "reads": {},
            "reasons": first.get("reasons", {}) if len(reasons) == 1 else {},
        }
        found = {digest(p): p for source in sources if (p := source.properties.get(column))}
        if found:
            properties[column] = (
                next(iter(found.values())) if len(found) == 1 else {"mixed": sorted(found.values(), key=digest)}
            )
    return FileRecords(id_col, {k: identity[k] for k in ("rows", "ids")}, columns, properties=properties)
