"""Before a derived column is consumed, check from the shards' files alone that one run produced it over the
data the shards hold now.

Every operation (``operation.Operation``) and every action of the dataset that reads a derived column (the
filter column of ``to_webdataset``, the embeddings of ``export_clip_retrieval``, ``build_index`` and ``search``)
calls ``check_consumed`` first. It judges each column read from the shards' files (``Stored``; for a column
computed in this run, the stored columns its computation reads), from every shard's footer and id column,
read on the cluster in chunks (and, for a decision across shards that read a plain column, that column's values):

- every shard holds the column, recorded by one configuration (``operation``): an interrupted re-run with other
  options, or with another model, leaves two;
- each shard's record is for the rows the shard holds now (their count and the digest of their ids), and was
  computed from the derived columns its file holds now;
- a decision across shards (deduplication) was made over the same inputs in every shard (one ``dataset`` digest),
  and those are the inputs the shards hold now (``provenance.ExpectedRecords``, as a save would record them).

Anything else is a ``MixedProvenanceError`` naming the shards, the configurations found and the command that
fixes it. Files that record no provenance for the column at all (an older dask_clip) are not judged. Shards that
hold the consuming operation's own output (the same configuration) are left out: running it again is how its
own unfinished run is finished.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq

from dask_clip.dataset.plan import read_shard_file
from dask_clip.errors import MixedProvenanceError
from dask_clip.execution import ShardTask, compute_in_batches, failures_named
from dask_clip.images.preprocess import DEFAULT_MAX_IMAGE_PIXELS
from dask_clip.io.metadata import check_stored_contents, table_in_memory
from dask_clip.io.shards import Shard, filesystem_of
from dask_clip.provenance import (
    Computed,
    ExpectedRecords,
    Plain,
    ShardInputs,
    Source,
    Stored,
    describe_operation,
    digest,
    plain_digest,
    read_digests,
)

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

STEMS_SHOWN = 5
"""Stems an error names per group of shards (then a count of the others)."""


@dataclass(frozen=True)
class ShardFooter:
    """What one shard's file holds: its column names, and its inputs as a save would see them (rows, id digest,
    every derived column's record, digests of the plain columns that its decisions across shards read)."""

    names: frozenset[str]
    inputs: ShardInputs


def check_consumed(
    dataset: ImageTextPairDataset,
    columns: Sequence[str],
    consumer: str,
    own: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any] | None]:
    """Refuse (``MixedProvenanceError``) to let ``consumer`` read ``columns`` unless every derived column it reads
    from the shards' files was produced by one run over the data they hold now.

    ``own`` is the consumer's own configuration when it is an operation: shards holding its output are left out.
    Returns, for each of ``columns``, the configuration that produced it (the one every shard records, or the
    operation computing it in this run); None for a column that is not derived, or records none.
    """
    operations: dict[str, dict[str, Any] | None] = {}
    stored: dict[str, None] = {}
    for column in columns:
        source = dataset.provenance.get(column)
        operations[column] = source.operation if isinstance(source, Computed) else None
        stored.update(dict.fromkeys(_stored_columns(source)))
    if not stored:
        return operations
    footers = compute_in_batches(_footer_of, dataset.shards, id_col=dataset.id_col, columns=list(stored))
    inputs = [footer.inputs for footer in footers]
    expected = (ExpectedRecords(inputs), ExpectedRecords(inputs, saved_together=True))
    for column in stored:
        agreed = _check_column(column, footers, expected, consumer, own, dataset.path)
        if column in operations:
            operations[column] = agreed
    return operations


def contents_checked(dataset: ImageTextPairDataset, columns: Sequence[str], consumer: str) -> ImageTextPairDataset:
    """``dataset`` whose shard tasks first check that the saved ``columns`` (``Stored``) still hold the values
    whose content digest their file records (``ShardMetadataError`` naming the file otherwise: it was edited
    since dask_clip wrote it); ``dataset`` itself when ``consumer`` reads no saved column. Lazy: the check runs in
    the task that reads the shard anyway."""
    stored = [column for column in columns if isinstance(dataset.provenance.get(column), Stored)]
    if not stored:
        return dataset
    checked = dataset.map_shards(
        _checked_rows,
        dataset.meta,
        label=f"{consumer}-check-contents",
        columns=stored,
    )
    return dataset.with_metadata(checked)


def _checked_rows(rows: pd.DataFrame, task: ShardTask, columns: list[str]) -> pd.DataFrame:
    """One shard's ``rows``, unchanged, once ``columns`` are found to hold what their file's footer records."""
    check_stored_contents(rows, columns, task.shard.parquet_url)
    return rows


def _stored_columns(source: Source | None) -> Iterator[str]:
    """The columns read from the shards' files that ``source`` is: itself, or what its computation reads."""
    if isinstance(source, Stored):
        yield source.column
    elif isinstance(source, Computed):
        for read in source.reads.values():
            yield from _stored_columns(read)


def _footer_of(shard: Shard, id_col: str, columns: list[str]) -> ShardFooter:
    """``shard``'s ``ShardFooter``, with digests of the plain columns that the decisions across shards among
    ``columns`` read."""
    output = read_shard_file(shard, id_col)
    records = output.records.columns
    plain = {
        name
        for column in columns
        if "dataset" in (records.get(column) or {})
        for name in records[column].get("reads", {})
        if name not in records and name in output.names
    }
    values = _values_digests(shard.parquet_url, sorted(plain)) if plain else {}
    inputs = ShardInputs(
        shard.stem,
        output.rows,
        output.ids,
        shard.tar_identity,
        dict(records),
        values,
        dict(output.records.contents),
    )
    return ShardFooter(frozenset(output.names), inputs)


def _values_digests(url: str, columns: list[str]) -> dict[str, str]:
    """Digests of ``columns``' values in the parquet at ``url`` (plain columns a decision across shards read)."""
    with failures_named(url):
        fs, path = filesystem_of(url)
        with fs.open(path, "rb") as file:
            table = table_in_memory(pq.read_table(file, columns=columns), url)
        return {column: plain_digest(table.column(column)) for column in columns}


def _check_column(
    column: str,
    footers: list[ShardFooter],
    expected: tuple[ExpectedRecords, ExpectedRecords],
    consumer: str,
    own: Mapping[str, Any] | None,
    path: str,
) -> dict[str, Any] | None:
    """The configuration every judged shard records for ``column``; ``MixedProvenanceError`` when there is none.

    ``expected`` are the records as a save would make them now: of columns read once saved, and as read when saved
    together with ``column`` (a decision across shards may have read its inputs either way)."""
    own_digest = None if own is None else digest(own)
    judged = [
        (index, footer.inputs.records.get(column))
        for index, footer in enumerate(footers)
        if own_digest is None or digest((footer.inputs.records.get(column) or {}).get("operation")) != own_digest
    ]
    groups: dict[str, list[int]] = {}
    records: dict[str, dict[str, Any]] = {}
    for index, record in judged:
        if column not in footers[index].names:
            key = f"no {column!r} column"
        elif record is None:
            key = "no configuration recorded"
        else:
            key = digest([record.get("operation"), record.get("dataset")])
            records[key] = record
        groups.setdefault(key, []).append(index)
    if not records:
        return None  # files that record nothing of this column (an older dask_clip), or only the consumer's own
    stems = [footer.inputs.stem for footer in footers]
    start = f"{consumer} reads {column!r}"
    if len(groups) > 1:
        found = "; ".join(
            f"{_shards(stems, indices)}: {describe_operation(records[key]['operation']) if key in records else key}"
            for key, indices in sorted(groups.items(), key=lambda item: item[1][0])
        )
        commands = " or ".join(
            f"`{rerun_command(record['operation'], path)}` (as in {_count(len(groups[key]))})"
            for key, record in records.items()
        )
        raise MixedProvenanceError(
            f"{start}, but the shards' files do not hold it from one run: {found}. A run that was interrupted (a "
            f"re-run with other options or another model, killed before its end) leaves this. Finish a run over "
            f"every shard: {commands}; then run this again"
        )
    (record,) = records.values()
    fix = rerun_command(record["operation"], path)
    if "dataset" in record:
        source = _cross_shard_source(record, footers[judged[0][0]].inputs.records)
        if all(each.dataset_digest(source) != record["dataset"] for each in expected):
            changed = [i for i, r in judged if _inputs_of(expected[0].record(source, i)) != _inputs_of(r)]
            where = _shards(stems, changed) if changed else "shards added or removed"
            raise MixedProvenanceError(
                f"{start}, but it was decided for other inputs than the shards hold now (what changed since: "
                f"{where}): decide again over every shard, `{fix}`"
            )
        return record["operation"]
    stale = [i for i, r in judged if not _current(column, r, footers[i].inputs)]
    if stale:
        raise MixedProvenanceError(
            f"{start}, but in {_shards(stems, stale)} it was computed from other rows, or other columns, than the "
            f"file holds now: compute it again, `{fix}`"
        )
    return record["operation"]


def _cross_shard_source(record: dict[str, Any], records: Mapping[str, Any]) -> Computed:
    """The source a decision across shards recorded as ``record`` would have now: its configuration, the columns
    it read (derived where the file records them, else plain) and whether it read the tars."""
    reads = {name: Stored(name) if name in records else Plain(name) for name in record.get("reads", {})}
    reads_tar = "tar" in (record.get("shard") or {})
    return Computed(record["operation"], reads, reads_tar, cross_shard=True, reasons=record.get("reasons", {}))


def _inputs_of(record: dict[str, Any] | None) -> tuple[Any, Any]:
    record = record or {}
    return record.get("shard"), record.get("reads")


def _current(column: str, record: dict[str, Any], inputs: ShardInputs) -> bool:
    """Whether a per-shard ``record`` is for the rows the shard holds now, computed from the derived columns (other
    than ``column`` itself) that its file holds now."""
    recorded = record.get("shard") or {}
    now = inputs.identity()
    if any(recorded[key] != now[key] for key in ("rows", "ids") if key in recorded):
        return False
    for name, read in record.get("reads", {}).items():
        current = inputs.records.get(name)
        # footers only: a column whose values were edited since is refused where it is read (check_contents)
        if name != column and current is not None and read not in read_digests(current, inputs.contents.get(name)):
            return False
    return True


def _count(shards: int) -> str:
    return f"{shards} shard" + ("" if shards == 1 else "s")


def _shards(stems: list[str], indices: list[int]) -> str:
    """``"2 shards (00001, 00002)"``, naming at most ``STEMS_SHOWN``."""
    named = ", ".join(stems[i] for i in indices[:STEMS_SHOWN])
    more = f" and {len(indices) - STEMS_SHOWN} more" if len(indices) > STEMS_SHOWN else ""
    return f"{_count(len(indices))} ({named}{more})"


def rerun_command(operation: dict[str, Any] | None, path: str) -> str:
    """How to run the operation recorded as ``operation`` again over the dataset at ``path``: a ``dask-clip``
    command where one takes every option it records, else the operation as Python."""
    operation = operation or {}
    name = operation.get("class") or operation.get("function")
    if name == "ClipImageEmbedder" and operation.get("max_image_pixels") == DEFAULT_MAX_IMAGE_PIXELS:
        autocast = operation.get("autocast", True)
        command = f"dask-clip embed {path} --model-dir {operation['model_dir']}"
        command += "" if autocast else " --no-autocast"
        if operation.get("decode_mode") != ("fast" if autocast else "exact"):
            command += f" --decode-mode {operation.get('decode_mode')}"
        command += " --engine openvino --int8" if operation.get("precision") == "int8" else ""
        return command if operation.get("normalize_embeddings", True) else _python(operation)
    if name == "ExactDeduplicator" and operation.get("hash_column") == "sha256":
        return f"dask-clip dedup {path} --method exact"
    if name == "keep_top_fraction":  # the command ranks the scores again: the threshold recorded is not an option
        flags = (" --smallest" if not operation.get("largest", True) else "") + (
            " --keep-missing" if operation.get("keep_missing") else ""
        )
        return f"dask-clip filter {path} --column {operation['column']} --top-fraction {operation['fraction']}{flags}"
    if name == "decontaminate" and operation.get("against", {}).get("path"):
        return _decontaminate_command(operation, path)
    semantic_cli = {"embedding_column": "image_embedding", "max_iter": 30}  # what the command does not set
    if name == "SemanticDeduplicator" and all(operation.get(key) == value for key, value in semantic_cli.items()):
        return (
            f"dask-clip dedup {path} --method semantic --eps {operation['eps']} "
            f"--n-clusters {operation['n_clusters']} --which-to-keep {operation['which_to_keep']} "
            f"--seed {operation['seed']} --kmeans-sample-size {operation['kmeans_sample_size']} "
            f"--max-cluster-size {operation.get('max_cluster_size') or 0}"
        )
    return _python(operation)


def _decontaminate_command(operation: dict[str, Any], path: str) -> str:
    """``dask-clip decontaminate`` with the evaluation set, threshold, column and search ``operation`` records."""
    against, search = operation["against"], operation.get("search")
    command = (
        f"dask-clip decontaminate {path} --against {against['path']} --threshold {operation['threshold']} "
        f"--embedding-column {operation['embedding_column']}"
    )
    command += f" --against-column {against['column']}" if against.get("column") else ""
    command += f" --index {search['index']} --nprobe {search['nprobe']}" if isinstance(search, dict) else ""
    return command + ("" if operation.get("keep_missing", True) else " --drop-missing")


def _python(operation: dict[str, Any]) -> str:
    return f"{describe_operation(operation)} applied to the dataset, then save_metadata()"
