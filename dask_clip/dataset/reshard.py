"""Write a dataset's kept rows as new WebDataset shards (``NNNNN.tar`` + ``NNNNN.parquet``) with new ids.

Three parallel passes, no loop over samples on the client:

1. each input shard's task writes its kept rows (``filter_column`` True) to a staging parquet and
   returns how many it kept;
2. the client turns the counts into global offsets: kept row ``g`` becomes row ``g % samples_per_shard``
   of output shard ``g // samples_per_shard``;
3. each input shard's task streams its own tar once and appends every kept sample, renamed to its new
   key, to one tar *piece* per output shard it feeds; then each output shard's task writes its parquet
   from the staged rows and its tar by concatenating its pieces (raw tar blocks, in input order).

The staging folder is a hidden folder inside the output folder, removed at the end, so the output
folder must be visible to every worker (a shared filesystem or object storage).
"""

from __future__ import annotations

import itertools
import json
import math
import posixpath
import tarfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from dask_clip.arguments import at_least
from dask_clip.columns import STRING
from dask_clip.errors import ColumnError, ShardReadError, UsageError
from dask_clip.execution import ShardRef, ShardTask, compute, failures_named, map_shards
from dask_clip.io.atomic import atomic_write
from dask_clip.io.metadata import arrow_to_pandas, write_shard_metadata
from dask_clip.io.shards import filesystem_of
from dask_clip.io.tar_samples import iter_tar_samples

if TYPE_CHECKING:
    from dask_clip.dataset import ImageTextPairDataset

UNLIMITED_MEMBER_BYTES = 1 << 62
"""Members are copied whatever their size (the embedder's size limit does not apply to a copy)."""

MEMBER_MTIME = 1_700_000_000
SUMMARY_COLUMNS = {"stem": "", "tar_path": "", "parquet_path": "", "rows": 0, "samples": 0}


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
) -> pd.DataFrame:
    """Write the rows where ``filter_column`` is True (all rows when None; null counts as False) to ``path``.

    Output shards hold ``samples_per_shard`` rows each (the last one fewer), are named with
    ``max_shards`` digits (``00000.tar`` + ``00000.parquet``), and give row ``i`` of shard ``s`` the new
    id ``f"{s:05d}{i:04d}"`` (digits from ``max_shards`` and ``samples_per_shard``) in the id column;
    ``old_id_col`` keeps the old id. Rows keep every column, in input order. Each kept sample's tar
    members are copied byte for byte under the new key, except ``.json``, whose id field (named like
    the id column) is set to the new id (and ``old_id_col`` to the old one). A kept row without
    a sample in the tar (a failed download) stays in the parquet with no tar members.

    Returns one row per output shard: ``stem``, ``tar_path``, ``parquet_path``, ``rows``, ``samples``.
    """
    columns = list(dataset.pandas_metadata.columns)
    _check_arguments(dataset, path, columns, filter_column, samples_per_shard, max_shards, old_id_col)
    output_fs, output_root = filesystem_of(path)
    output_url = path.rstrip("/")
    staging = posixpath.join(output_url, f".dask_clip-staging-{uuid.uuid4().hex}")
    output_fs.makedirs(output_root, exist_ok=True)
    try:
        counts = _stage_kept_rows(dataset, staging, filter_column)
        plan = plan_output_shards(counts, samples_per_shard)
        if len(plan) > 10**max_shards:
            raise UsageError(
                f"{sum(counts)} kept rows need {len(plan)} shards of {samples_per_shard}, more than "
                f"max_shards={max_shards} digits can name"
            )
        keys = KeyFormat(samples_per_shard, max_shards)
        derived = {c: cfg for c, cfg in dataset.derived_columns.items() if c in columns}
        info = {"derived_columns": sorted(derived), "configs": derived, "id_col": dataset.id_col}
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
                output_url,
                keys,
                dataset.id_col,
                old_id_col,
                info,
            )
            for number, segments in enumerate(plan)
        ]
        # copying bytes needs none of the resources (GPUs) the rows may have needed
        summary = compute(dask.delayed(pd.DataFrame)(outputs, columns=list(SUMMARY_COLUMNS)))
    finally:
        if output_fs.exists(filesystem_of(staging)[1]):
            output_fs.rm(filesystem_of(staging)[1], recursive=True)
    return summary.astype({c: type(v) for c, v in SUMMARY_COLUMNS.items()})


def _check_arguments(
    dataset: ImageTextPairDataset,
    path: str,
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
        dtype = dataset.pandas_metadata.dtypes[filter_column]
        if not pd.api.types.is_bool_dtype(dtype):
            raise ColumnError(f"filter column {filter_column!r} is {dtype}, not boolean")
    if old_id_col is not None and old_id_col in columns:
        raise UsageError(f"old_id_col {old_id_col!r} is already a column of the dataset")
    fs, root = filesystem_of(path)
    if fs.isdir(root):
        existing = [p for p in fs.ls(root, detail=False) if p.endswith((".tar", ".parquet"))]
        if existing:
            raise UsageError(f"{path}: already holds shard files (e.g. {existing[0]}); write into an empty folder")
    input_root = filesystem_of(dataset.path)[1]
    if root == input_root:
        raise UsageError(f"{path}: the output folder is the dataset's own folder; choose another one")


def _staged_url(staging: str, stem: str) -> str:
    return posixpath.join(staging, f"rows-{stem}.parquet")


def _stage_kept_rows(dataset: ImageTextPairDataset, staging: str, filter_column: str | None) -> list[int]:
    """Pass 1: every input shard writes its kept rows to the staging folder; returns the kept counts, in shard order."""

    def stage(rows: pd.DataFrame, task: ShardTask) -> pd.DataFrame:
        if filter_column is not None:
            rows = rows[np.asarray(rows[filter_column].fillna(False), dtype=bool)]
        write_shard_metadata(rows.reset_index(drop=True), _staged_url(staging, task.shard.stem), {})
        return pd.DataFrame({"kept": [len(rows)]})

    meta = pd.DataFrame({"kept": pd.Series([], dtype="int64")})
    staged = map_shards(
        stage, dataset.pandas_metadata, dataset.shards, meta, id_col=dataset.id_col, label="reshard-stage"
    )
    counts = compute(staged, dataset.resources)
    return [int(n) for n in counts["kept"]]


def tar_member(name: str, payload: bytes) -> bytes:
    """One tar member as raw blocks (PAX header, data, zero padding): pieces concatenate into a tar."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = MEMBER_MTIME
    info.mode = 0o644
    padding = -len(payload) % tarfile.BLOCKSIZE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + payload + tarfile.NUL * padding


def rewrite_sidecar(payload: bytes, id_col: str, new_id: str, old_id_col: str | None, old_id: str, where: str) -> bytes:
    """A sample's ``.json`` with its id set to ``new_id`` (and ``old_id_col`` to ``old_id``)."""
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardReadError(f"{where}: .json member is not valid JSON: {error}") from None
    if not isinstance(record, dict):
        raise ShardReadError(f"{where}: .json member is not a JSON object")
    record[id_col] = new_id
    if old_id_col is not None:
        record[old_id_col] = old_id
    return json.dumps(record).encode()


def write_tar_pieces(
    shard: ShardRef, staging: str, offset: int, keys: KeyFormat, id_col: str, old_id_col: str | None
) -> dict[int, tuple[str, int]]:
    """Pass 3a, one input shard: stream its tar once, appending each kept sample under its new key to
    the piece of the output shard it goes to. Returns ``{output shard: (piece url, samples)}``."""
    with failures_named(shard.tar_url):
        fs, staged_path = filesystem_of(_staged_url(staging, shard.stem))
        with fs.open(staged_path, "rb") as file:
            ids = pq.read_table(file, columns=[id_col]).column(id_col).to_pylist()
        positions = {str(value): position for position, value in enumerate(ids)}
        files: dict[int, Any] = {}
        written: dict[int, tuple[str, int]] = {}
        try:
            for sample in iter_tar_samples(shard.tar_url, max_member_bytes=UNLIMITED_MEMBER_BYTES):
                position = positions.get(sample.key)
                if position is None:
                    continue
                output = (offset + position) // keys.samples_per_shard
                new_key = keys.key(offset + position)
                if output not in files:
                    url = posixpath.join(staging, f"piece-{keys.stem(output)}-{shard.stem}.tar")
                    files[output] = fs.open(filesystem_of(url)[1], "wb")
                    written[output] = (url, 0)
                for extension, payload in sample.members.items():
                    if extension == "json":
                        where = f"{shard.tar_url}: sample {sample.key!r}"
                        payload = rewrite_sidecar(payload, id_col, new_key, old_id_col, sample.key, where)
                    files[output].write(tar_member(f"{new_key}.{extension}", payload))
                written[output] = (written[output][0], written[output][1] + 1)
        finally:
            for file in files.values():
                file.close()
        return written


def write_output_shard(
    number: int,
    segments: list[tuple[str, int, int]],
    pieces: list[dict[int, tuple[str, int]]],
    output_url: str,
    keys: KeyFormat,
    id_col: str,
    old_id_col: str | None,
    info: dict[str, Any],
) -> dict[str, Any]:
    """Pass 3b, one output shard: its parquet from the staged rows of ``segments`` (staged url, start,
    stop), with new ids, and its tar from its pieces of each input shard, in input order."""
    stem = keys.stem(number)
    tar_url = posixpath.join(output_url, f"{stem}.tar")
    with failures_named(tar_url):
        frames = []
        for staged_url, start, stop in segments:
            fs, staged_path = filesystem_of(staged_url)
            with fs.open(staged_path, "rb") as file:
                frames.append(arrow_to_pandas(pq.read_table(file).slice(start, stop - start)))
        rows = pd.concat(frames, ignore_index=True)
        first = number * keys.samples_per_shard
        new_ids = pd.array([keys.key(first + i) for i in range(len(rows))], dtype=STRING)
        if old_id_col is not None:
            rows.insert(rows.columns.get_loc(id_col) + 1, old_id_col, rows[id_col])
        rows[id_col] = new_ids

        parquet_url = posixpath.join(output_url, f"{stem}.parquet")
        write_shard_metadata(rows, parquet_url, info)
        own_pieces = [piece[number] for piece in pieces if number in piece]
        concatenate_tar_pieces([url for url, _ in own_pieces], tar_url)
        samples = sum(count for _, count in own_pieces)
    return {"stem": stem, "tar_path": tar_url, "parquet_path": parquet_url, "rows": len(rows), "samples": samples}


def concatenate_tar_pieces(piece_urls: Iterable[str], tar_url: str) -> None:
    """Write ``tar_url`` (atomically, ``io.atomic``) as the pieces followed by the tar end blocks."""
    fs = filesystem_of(tar_url)[0]
    with atomic_write(tar_url) as out:
        size = 0
        for url in piece_urls:
            with fs.open(filesystem_of(url)[1], "rb") as piece:
                while chunk := piece.read(1 << 22):
                    out.write(chunk)
                    size += len(chunk)
        size += 2 * tarfile.BLOCKSIZE
        out.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-size % tarfile.RECORDSIZE)))
