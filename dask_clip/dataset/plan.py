"""Plan a save: what each shard's file would record, and which shards already hold exactly that.

For every shard, a task reads the input parquet's footer, its id column and the plain columns that the
run's operations read, and the existing output file's footer and id column (the same file when saving
in place). No tar is opened: a tar's identity is its size and ETag or modification time, from the listing.
The client then works out, from those alone, the record each derived column would get
(``provenance.ExpectedRecords``) and decides which shards are finished: their file has exactly the
columns to write, holds the same rows as the input, and every derived column's record equals what this
run would produce, with every row complete (a value, or a reason where the column records reasons) and
its values still those dask_clip wrote (their content digest, where the file records one: a file edited
since is computed again). A cross-shard column is finished in every shard or in none.

The derived columns that the run's operations read from the input files, and those the run computes, are
read too where their file records a content digest, to tell whether they still hold what was written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.errors import DaskClipError, ShardMetadataError, UsageError
from dask_clip.execution import compute_in_batches, failures_named
from dask_clip.io.metadata import carried_columns, changed_columns, table_in_memory
from dask_clip.io.shards import Shard, filesystem_of
from dask_clip.provenance import (
    Computed,
    ExpectedRecords,
    FileRecords,
    Plain,
    ShardInputs,
    Source,
    Stored,
    ids_digest,
    plain_digest,
)

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset


@dataclass
class OutputFile:
    """What an existing output file holds, from its footer and id column."""

    names: list[str]
    rows: int
    ids: str
    records: FileRecords
    null_counts: dict[str, int]
    changed: list[str] = field(default_factory=list)
    """Derived columns whose values no longer match the content digest the file records."""


@dataclass
class ShardState:
    """One shard before a save: its inputs, the derived columns its input file records, and the output file
    already at its place (if any). ``unreadable`` holds the error when the input parquet cannot be read."""

    inputs: ShardInputs
    recorded: list[str]
    output: OutputFile | None
    unreadable: DaskClipError | None = None


@dataclass
class SavePlan:
    """For each shard: the records to write, whether its output is finished, and its summary if so."""

    records: list[FileRecords]
    finished: list[bool]
    summaries: list[dict[str, int] | None] = field(default_factory=list)


@dataclass(frozen=True)
class ColumnsRead:
    """The columns planning reads besides the id column: ``plain`` input columns that operations read (their
    values digested), ``stored`` derived columns they read and ``computed`` derived columns this run writes
    (both compared with their content digest where the file records one)."""

    plain: list[str]
    stored: list[str]
    computed: list[str]


def read_columns(sources: list[Source], kind: type[Plain] | type[Stored]) -> list[str]:
    """The input-file columns of ``kind`` that the computed ``sources`` read, directly or through other computed
    columns (``Plain``: the input's own columns; ``Stored``: derived columns saved before)."""
    found: dict[str, None] = {}

    def visit(source: Source) -> None:
        if isinstance(source, Computed):
            for read in source.reads.values():
                if isinstance(read, kind):
                    found[read.column] = None
                visit(read)

    for source in sources:
        visit(source)
    return list(found)


def read_shard_state(
    shard: Shard,
    output_url: str,
    id_col: str,
    meta: pd.DataFrame,
    derived: list[str],
    reads: ColumnsRead,
    read_output: bool,
) -> ShardState:
    """Read what planning needs of one shard (footers, id columns, the plain columns read, and the derived columns
    read or computed where their file records a content digest).

    An input parquet that cannot be read gives a state with its error: that shard is computed (and fails,
    naming the file) while the others go on, unless a column decides across shards.
    """
    try:
        with failures_named(shard.parquet_url):
            in_place = read_output and output_url == shard.parquet_url
            verified = [*reads.stored, *(reads.computed if in_place else [])]
            schema, table, null_counts = _read(shard.parquet_url, [id_col, *reads.plain], verified)
            records = FileRecords.from_schema(schema)
            carried = carried_columns(schema, meta, set(derived) | set(records.columns))
            values = {
                column: plain_digest(table.column(column)) for column in reads.plain if column in table.column_names
            }
            contents = {column: records.contents.get(column) for column in carried}
            stored = {column: table.column(column) for column in reads.stored if column in carried}
            inputs = ShardInputs(
                stem=shard.stem,
                rows=table.num_rows,
                ids=ids_digest(table.column(id_col)),
                tar=shard.tar_identity,
                records={column: records.columns.get(column) for column in carried},
                values=values,
                contents=contents,
                changed=changed_columns(stored, contents),
                properties={column: records.properties[column] for column in carried if column in records.properties},
            )
            output = None
            if in_place:
                output = _output_of(schema, table, id_col, null_counts, reads.computed)
            elif read_output:
                output = read_output_file(output_url, id_col, reads.computed)
            return ShardState(inputs, list(records.columns), output)
    except DaskClipError as error:
        unknown = ShardInputs(shard.stem, -1, "unreadable", shard.tar_identity, {}, {})
        return ShardState(unknown, [], None, error)


def _read(url: str, columns: list[str], verified: Sequence[str]) -> tuple[pa.Schema, pa.Table, dict[str, int]]:
    """A parquet's schema, ``columns`` (those it has) and null counts, opening it once; also the ``verified``
    columns whose content digest its footer records (to compare their values with it)."""
    fs, path = filesystem_of(url)
    with fs.open(path, "rb") as file:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
        recorded = FileRecords.from_schema(schema).contents
        wanted = [*columns, *(c for c in verified if recorded.get(c) is not None)]
        present = list(dict.fromkeys(c for c in wanted if c in schema.names))
        table = table_in_memory(parquet.read(columns=present), url)  # digests of values, whatever their layout
        return schema, table, _null_counts(parquet.metadata)


def _null_counts(metadata: pq.FileMetaData) -> dict[str, int]:
    """Null rows of each top-level column, from the footer's statistics (a list's nulls are its leaf's)."""
    counts: dict[str, int] = {}
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        seen: set[str] = set()
        for index in range(row_group.num_columns):
            chunk = row_group.column(index)
            name = chunk.path_in_schema.split(".")[0]
            if name in seen:
                continue
            seen.add(name)
            statistics = chunk.statistics
            nulls = statistics.null_count if statistics is not None and statistics.has_null_count else None
            counts[name] = counts.get(name, 0) + (nulls if nulls is not None else chunk.num_values)
    return counts


def read_output_file(url: str, id_col: str, verified: Sequence[str] = ()) -> OutputFile | None:
    """What the parquet at ``url`` holds (footer, id column, null counts, which of the ``verified`` columns no
    longer match their content digest); None when absent or unreadable."""
    fs, path = filesystem_of(url)
    if not fs.exists(path):
        return None
    try:
        schema, table, null_counts = _read(url, [id_col], verified)
        if id_col not in table.column_names:
            return None
        return _output_of(schema, table, id_col, null_counts, verified)
    except (OSError, pa.ArrowException):
        return None  # an unreadable output is not finished: it is written again


def read_shard_file(shard: Shard, id_col: str, verified: Sequence[str] = ()) -> OutputFile:
    """What ``shard``'s own parquet holds (``read_output_file``); ``ShardMetadataError`` naming the file when it
    cannot be read or has no ``id_col``."""
    output = read_output_file(shard.parquet_url, id_col, verified)
    if output is None:
        raise ShardMetadataError(f"{shard.parquet_url}: cannot read parquet (or it has no id column {id_col!r})")
    return output


def _output_of(
    schema: pa.Schema, table: pa.Table, id_col: str, null_counts: dict[str, int], verified: list[str]
) -> OutputFile:
    records = FileRecords.from_schema(schema)
    present = {column: table.column(column) for column in verified if column in table.column_names}
    return OutputFile(
        names=schema.names,
        rows=table.num_rows,
        ids=ids_digest(table.column(id_col)),
        records=records,
        null_counts=null_counts,
        changed=changed_columns(present, records.contents),
    )


def plan_save(dataset: ImageTextPairDataset, output_urls: list[str], columns: list[str], overwrite: bool) -> SavePlan:
    """The records each shard's file would hold, and which shards are finished (none when ``overwrite``)."""
    derived = [c for c in columns if c in dataset.provenance]
    sources = [dataset.provenance[c] for c in derived]
    columns_read = ColumnsRead(
        plain=read_columns(sources, Plain),
        stored=read_columns(sources, Stored),
        computed=[c for c in derived if isinstance(dataset.provenance[c], Computed)],
    )
    states: list[ShardState] = compute_in_batches(
        read_shard_state,
        dataset.shards,
        output_urls,
        id_col=dataset.id_col,
        meta=dataset.meta,
        derived=derived,
        reads=columns_read,
        read_output=not overwrite,
    )
    unreadable = [state.unreadable for state in states if state.unreadable is not None]
    if unreadable and any(_is_cross_shard(dataset.provenance[column]) for column in derived):
        raise unreadable[0]
    _check_nothing_is_dropped(dataset, states, output_urls, columns)
    expected = ExpectedRecords([state.inputs for state in states])
    records = [
        FileRecords(
            dataset.id_col,
            state.inputs.identity(),
            {column: expected.record(dataset.provenance[column], i) for column in derived},
            {column: state.inputs.contents.get(column) for column in derived if column not in columns_read.computed},
            properties=_properties(dataset, derived, state.inputs),
        )
        for i, state in enumerate(states)
    ]
    if overwrite:
        return SavePlan(records, [False] * len(states), [None] * len(states))
    finished = {
        column: [_column_finished(column, state, records[i]) for i, state in enumerate(states)] for column in derived
    }
    for column in derived:
        if _is_cross_shard(dataset.provenance[column]) and not all(finished[column]):
            finished[column] = [False] * len(states)
    done = [
        state.output is not None
        and state.output.names == columns
        and {"rows": state.output.rows, "ids": state.output.ids} == state.inputs.identity()
        and all(finished[column][i] for column in derived)
        for i, state in enumerate(states)
    ]
    summaries = [_summary(state.output, records[i]) if done[i] else None for i, state in enumerate(states)]
    return SavePlan(records, done, summaries)


def _properties(dataset: ImageTextPairDataset, derived: list[str], inputs: ShardInputs) -> dict[str, dict[str, Any]]:
    """The properties a shard's file records of its ``derived`` columns: the computing operation's, else those its
    input file records."""
    properties = {}
    for column in derived:
        source = dataset.provenance[column]
        found = dict(source.properties) if isinstance(source, Computed) else inputs.properties.get(column)
        if found:
            properties[column] = found
    return properties


def _is_cross_shard(source: Source) -> bool:
    return isinstance(source, Computed) and source.cross_shard


def _column_finished(column: str, state: ShardState, records: FileRecords) -> bool:
    output = state.output
    if output is None or column not in output.names or column in output.changed:
        return False
    expected = records.columns[column]
    if output.records.columns.get(column) != expected:
        return False
    for value, reason in (expected or {}).get("reasons", {}).items():
        if column in (value, reason):
            nulls = output.null_counts.get(value, output.rows) + output.null_counts.get(reason, output.rows)
            return nulls == output.rows
    return True


def _summary(output: OutputFile | None, records: FileRecords) -> dict[str, int]:
    reasons = {r for record in records.columns.values() if record for r in record.get("reasons", {}).values()}
    errors = max((output.rows - output.null_counts.get(r, output.rows) for r in reasons), default=0)
    return {"rows": output.rows, "errors": errors}


def _check_nothing_is_dropped(
    dataset: ImageTextPairDataset, states: list[ShardState], output_urls: list[str], columns: list[str]
) -> None:
    """A save must not drop a derived column that the file it replaces holds: in place, one the dataset does not
    carry; into another folder, one an earlier save wrote there that this one does not write (a run of one model
    after a run of two). A save with ``overwrite=True`` reads no output file, and replaces it as asked."""
    lost, into_output = [], False
    for state, shard, url in zip(states, dataset.shards, output_urls, strict=True):
        if url == shard.parquet_url:
            dropped = [c for c in state.recorded if c not in dataset.meta.columns]
        else:
            dropped = [c for c in (state.output.records.columns if state.output else ()) if c not in columns]
            into_output = into_output or bool(dropped)
        if dropped:
            lost.append(f"{url}: {dropped}")
    if not lost:
        return
    listed = "; ".join(lost[:5]) + (f"; and {len(lost) - 5} more" if len(lost) > 5 else "")
    if into_output:
        raise UsageError(
            f"saving would drop derived columns that an earlier save wrote into these files but this one does not "
            f"write: {listed}. Compute those columns again in this run, save into another folder, or replace the "
            "files (overwrite=True, --overwrite)"
        )
    raise UsageError(
        "saving in place would drop derived columns that these shards hold but the dataset does not "
        f"(its first shard lacks them): {listed}. Compute those columns again in this run, or save into another "
        "folder (path=...)"
    )


def expected_records(dataset: ImageTextPairDataset, columns: list[str]) -> list[FileRecords]:
    """For each shard, the records its derived ``columns`` would get (reads the input files only)."""
    return plan_save(dataset, [shard.parquet_url for shard in dataset.shards], columns, overwrite=True).records
