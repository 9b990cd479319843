"""An ANN index on disk, and how a dataset tells whether an index was built from its current embeddings.

An index is a folder, written as a whole (``io.output_folder.replacing_folder``), of format 2::

    index.faiss    the faiss index; a vector's label is its row's global number: row ``i`` of the shard at
                   position ``s`` is ``offset[s] + i``, where ``offset[s]`` counts every row of the shards before
    lists.ivfdata  an IVF index's inverted lists (codes and labels), memory-mapped when the index is opened
                   (``ann.read_on_disk``): the opening process holds only the coarse quantizer and the lists'
                   sizes and offsets. Absent for an exhaustive index, and on object stores (fsspec URLs), where
                   the lists are merged into ``index.faiss`` and the index is read into memory
    ids.arrow      one row per indexed vector, by ascending label, in batches (one per shard): ``label`` (int64),
                   ``shard`` (int32, the shard's position in the dataset) and the row's id (the dataset's id
                   column); an Arrow IPC file, memory-mapped when opened (read into memory on object stores)
    index.json     the manifest: the format, the embedding and id columns, the index chosen, its options, the
                   configuration recorded with the embeddings, the counts, each file's size and the dataset's
                   fingerprint

An index of format 1 (an earlier dask_clip: the lists inside ``index.faiss``, ``ids.parquet``) is refused, with
the advice to rebuild it; so is a folder whose files do not have the sizes its manifest records.

The fingerprint lists, for each shard, its stem, its rows, a digest of its ids, a digest of the embedding
column's recorded provenance (of its values, where no dask_clip operation recorded one), the content digest
its file records for the column (``provenance.content_digest``; null in files of an older dask_clip) and
the file's identity (size and modification time, or ETag on object stores) when it was read.

Opening an index for a dataset checks every shard on the cluster. A file whose identity is unchanged is
current without being read. Any other is read again (footer and id column) and, where its footer records a
content digest, its embeddings too, to check that they still match it: an edit that kept the footer (as
pyarrow does) is caught, while a file rewritten with the same embeddings (a deduplication saved in place) is
current. An index whose fingerprint differs is refused: rows added or removed, embeddings recomputed, attached
again or edited.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dask_clip.dataset.plan import read_shard_file
from dask_clip.errors import IndexFileError, StaleIndexError, UsageError
from dask_clip.execution import compute_in_batches, failures_named
from dask_clip.io.atomic import atomic_write, is_local
from dask_clip.io.metadata import table_in_memory
from dask_clip.io.shards import Shard, filesystem_of, protocol_of
from dask_clip.provenance import digest, file_identity, plain_digest

if TYPE_CHECKING:
    import faiss

    from dask_clip.dataset import ImageTextPairDataset

FORMAT = 2
INDEX_FILE, LISTS_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "lists.ivfdata", "ids.arrow", "index.json"
FORMAT_1_FILES = (INDEX_FILE, "ids.parquet", MANIFEST_FILE)
"""The files of a format-1 index folder (``io.output_folder``: a folder written before manifests existed)."""


def shard_fingerprints(
    dataset: ImageTextPairDataset, column: str, built: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """For each shard, in order: ``{"stem", "rows", "ids", "embedding", "contents", "file"}``, read on the cluster.

    When checking against ``built`` (an index's fingerprint), a shard whose file has the identity its entry
    records gets that entry back unread, and one whose embeddings no longer match the content digest its footer
    records gets ``"edited"`` (a build checks its vectors as it adds them instead: ``index._add_shard``).
    """
    known = {entry["stem"]: entry for entry in built or []}
    return compute_in_batches(
        _fingerprint,
        dataset.shards,
        [known.get(shard.stem) for shard in dataset.shards],
        id_col=dataset.id_col,
        column=column,
        verify=built is not None,
    )


def _fingerprint(shard: Shard, known: dict[str, Any] | None, id_col: str, column: str, verify: bool) -> dict[str, Any]:
    """``shard``'s fingerprint: ``known`` itself when its file still has the identity ``known`` records."""
    fs, path = filesystem_of(shard.parquet_url)
    with failures_named(shard.parquet_url):
        identity = file_identity(fs.info(path))
    if known is not None and known["file"] == identity:
        return known
    output = read_shard_file(shard, id_col, [column] if verify else [])
    record = output.records.columns.get(column)
    embedding = digest(record) if record is not None else _values_digest(shard.parquet_url, column)
    fingerprint = {
        "stem": shard.stem,
        "rows": output.rows,
        "ids": output.ids,
        "embedding": embedding,
        "contents": output.records.contents.get(column),
        "file": identity,
    }
    return {**fingerprint, "edited": True} if column in output.changed else fingerprint


def _values_digest(url: str, column: str) -> str:
    """A digest of ``column``'s values in the parquet at ``url`` (a column without recorded provenance)."""
    with failures_named(url):
        fs, path = filesystem_of(url)
        with fs.open(path, "rb") as file:
            return plain_digest(table_in_memory(pq.read_table(file, columns=[column]), url).column(0))


def check_current(path: str, manifest: dict[str, Any], current: list[dict[str, Any]], shards: list[Shard]) -> None:
    """``StaleIndexError`` naming the first difference unless ``current`` (the fingerprint of ``shards`` now) is
    the one ``manifest`` records, but for the files' identities (a file rewritten with the same rows and
    embeddings is current)."""
    built = manifest["shards"]
    stems_then, stems_now = [s["stem"] for s in built], [s["stem"] for s in current]
    if stems_then != stems_now:
        added, removed = sorted(set(stems_now) - set(stems_then)), sorted(set(stems_then) - set(stems_now))
        change = f"shards added {added[:5]}, removed {removed[:5]}"
    else:
        differing = [i for i, (then, now) in enumerate(zip(built, current, strict=True)) if _differs(then, now)]
        if not differing:
            return
        then, now, url = built[differing[0]], current[differing[0]], shards[differing[0]].parquet_url
        column = manifest["column"]
        if now.get("edited"):
            change = (
                f"shard {now['stem']}: {url}: its {column!r} was changed since dask_clip wrote it (its values no "
                "longer match the content digest its footer records)"
            )
        elif then["rows"] != now["rows"] or then["ids"] != now["ids"]:
            change = f"shard {now['stem']}: its rows changed ({then['rows']} rows then, {now['rows']} now)"
        else:
            change = f"shard {now['stem']}: its {column!r} was recomputed or replaced"
    raise StaleIndexError(
        f"{path}: this index was built from other data than the dataset holds now ({change}); "
        "rebuild it with build_index"
    )


def _differs(then: dict[str, Any], now: dict[str, Any]) -> bool:
    return bool(now.get("edited")) or any(then[key] != now.get(key) for key in then if key != "file")


def write_ids(table: pa.Table, url: str) -> None:
    """One part's id rows (``label``, ``shard``, the id column) into an Arrow IPC file at ``url``, in one batch."""
    with atomic_write(url) as file, pa.ipc.new_file(file, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(table.num_rows, 1))


def merge_ids(part_urls: list[str], url: str) -> None:
    """The id files at ``part_urls`` (``write_ids``'s, by ascending labels) into one Arrow IPC file at ``url``,
    one part in memory at a time, each cast to one schema: the first whose id type is known (an empty shard's
    ids may read as ``null``; one shard's as ``string``, another's as ``large_string``)."""
    schemas = [_read_part(part, lambda reader: reader.schema) for part in part_urls]
    schema = next((s for s in schemas if not pa.types.is_null(s.field(2).type)), schemas[0])
    with atomic_write(url) as file, pa.ipc.new_file(file, schema) as writer:
        for part in part_urls:
            writer.write_table(_read_part(part, lambda reader: reader.read_all()).cast(schema))


def _read_part(url: str, read: Any) -> Any:
    """``read(reader)`` of the Arrow IPC file at ``url`` (a build's scratch part)."""
    with failures_named(url):
        fs, path = filesystem_of(url)
        with fs.open(path, "rb") as source:
            return read(pa.ipc.open_file(source))


def write_manifest(folder: str, manifest: dict[str, Any]) -> None:
    """``manifest``, with the format and the size of every index file in ``folder``, as the folder's
    ``index.json``: written last, so a folder without it holds no index."""
    fs, path = filesystem_of(folder)
    sizes = {
        name: fs.size(posixpath.join(path, name))
        for name in (INDEX_FILE, LISTS_FILE, IDS_FILE)
        if fs.exists(posixpath.join(path, name))
    }
    with atomic_write(posixpath.join(folder, MANIFEST_FILE)) as file:
        file.write(
            json.dumps({"format": FORMAT, **manifest, "files": sizes}, indent=1, sort_keys=True, default=str).encode()
        )


def write_faiss(index: faiss.Index, url: str) -> None:
    """``index`` into the file at ``url`` (a local path, or any fsspec URL through its serialised bytes)."""
    import faiss

    from dask_clip import ann

    fs, path = filesystem_of(url)
    if protocol_of(fs) in ("file", "local"):
        faiss.write_index(index, path)
        return
    with fs.open(path, "wb") as file:
        file.write(ann.to_bytes(index).tobytes())


def read_faiss(url: str) -> faiss.Index:
    """The faiss index in the file at ``url`` (a local path, its on-disk lists memory-mapped: ``ann.read_on_disk``;
    or any fsspec URL, read into memory); ``IndexFileError`` naming the file when faiss cannot read it."""
    from dask_clip import ann

    fs, path = filesystem_of(url)
    try:
        if protocol_of(fs) in ("file", "local"):
            return ann.read_on_disk(path)
        with fs.open(path, "rb") as file:
            return ann.from_bytes(file.read())
    except RuntimeError as error:
        raise IndexFileError(f"{url}: faiss cannot read this index file: {error}") from error


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the index folder ``path``; ``UsageError`` when there is no index there or one of another
    format, ``IndexFileError`` when a file does not have the size the manifest records (an incomplete copy)."""
    fs, folder = filesystem_of(path)
    manifest_path = posixpath.join(folder, MANIFEST_FILE)
    if not fs.exists(manifest_path):
        raise UsageError(f"{path}: no index here (no {MANIFEST_FILE}); build one with build_index")
    with fs.open(manifest_path, "rb") as file:
        manifest = json.loads(file.read())
    if manifest.get("format") != FORMAT:
        raise UsageError(
            f"{path}: an index of format {manifest.get('format')} (written by another dask_clip version); this "
            f"version reads format {FORMAT} (inverted lists on disk, ids.arrow): rebuild the index with "
            "build_index (overwrite=True, or build-index --overwrite)"
        )
    for name, size in manifest["files"].items():
        found = fs.size(posixpath.join(folder, name)) if fs.exists(posixpath.join(folder, name)) else None
        if found != size:
            raise IndexFileError(
                f"{posixpath.join(path, name)}: {'missing' if found is None else f'{found} bytes'}, where the "
                f"index's manifest records {size}: the folder is incomplete or was changed; rebuild the index"
            )
    return manifest


@dataclass(frozen=True, eq=False)
class OpenedIndex:
    """An index loaded once and checked against a dataset, for queries in a loop (``top_k``).

    ``ids`` is the id map (``ids.arrow``: ``label`` ascending, ``shard``, the id column; memory-mapped from a
    local folder), in batches (empty ones left out here) whose labels are ``label_batches`` (``int64`` views of
    the file), whose first labels are ``batch_labels`` (``int64 (B,)``) and whose first rows are ``batch_rows``
    (``int64 (B,)``); ``shards`` are the dataset's; ``nprobe`` is the lists an IVF query scans unless told
    otherwise.
    """

    path: str
    index: faiss.Index
    manifest: dict[str, Any]
    ids: pa.Table
    label_batches: tuple[np.ndarray, ...]
    batch_labels: np.ndarray
    batch_rows: np.ndarray
    shards: tuple[Shard, ...]
    id_dtype: Any

    @property
    def nprobe(self) -> int:
        return int(self.manifest["index"]["nprobe"])

    def rows_of(self, labels: np.ndarray) -> np.ndarray:
        """The rows of ``ids`` that hold ``labels`` (``int64 (k,)``, each indexed): a binary search over the
        batches' first labels, then within one batch (a few pages of a memory-mapped file)."""
        batches = np.searchsorted(self.batch_labels, labels, side="right") - 1
        return np.array(
            [
                self.batch_rows[b] + np.searchsorted(self.label_batches[b], label)
                for b, label in zip(batches, labels, strict=True)
            ],
            dtype=np.int64,
        )

    def top_k(self, query: np.ndarray, k: int, nprobe: int | None = None) -> pd.DataFrame:
        """The ``k`` indexed rows nearest the unit ``float32 (D,)`` ``query``, best first, as ``search`` returns
        them: the id column, ``score`` (``float32`` cosine; approximate with PQ codes), ``stem``, ``tar_url``."""
        from dask_clip import ann

        scores, labels = ann.search(self.index, query[None, :], k, nprobe or self.nprobe)
        found = labels[0] >= 0
        score = scores[0][found].astype(np.float32)
        # one-row slices: a take over the file's batches would concatenate them (22 ms a query at 5M rows)
        rows = [self.ids.slice(int(r), 1) for r in self.rows_of(labels[0][found])]
        id_col = self.manifest["id_col"]
        ids = [row.column(id_col)[0].as_py() for row in rows]
        shards = [self.shards[row.column("shard")[0].as_py()] for row in rows]
        # best first, ties by id: sorted here, a pandas sort of the frame took 5 ms a query
        order = sorted(range(len(rows)), key=lambda i: (-score[i], ids[i]))
        return pd.DataFrame(
            {
                id_col: pd.Series([ids[i] for i in order], dtype=self.id_dtype),
                "score": score[order],
                "stem": pd.Series([shards[i].stem for i in order], dtype=object),
                "tar_url": pd.Series([shards[i].tar_url for i in order], dtype=object),
            }
        )


def open_index(dataset: ImageTextPairDataset, path: str, embedding_column: str = "image_embedding") -> OpenedIndex:
    """The index in folder ``path``, loaded for queries over ``dataset``'s ``embedding_column``.

    ``UsageError`` when it indexes another column or id column or is of another format; ``StaleIndexError``
    when the dataset's rows or embeddings changed since it was built (every shard's footer and id column are
    read to tell).
    """
    manifest = read_manifest(path)
    if manifest["column"] != embedding_column or manifest["id_col"] != dataset.id_col:
        raise UsageError(
            f"{path}: indexes column {manifest['column']!r} by id {manifest['id_col']!r}, "
            f"not {embedding_column!r} by {dataset.id_col!r}"
        )
    check_current(
        path, manifest, shard_fingerprints(dataset, embedding_column, manifest["shards"]), list(dataset.shards)
    )
    ids = _read_ids(posixpath.join(path, IDS_FILE))
    lengths = np.array([len(chunk) for chunk in ids.column("label").chunks], dtype=np.int64)
    batches = tuple(chunk.to_numpy() for chunk in ids.column("label").chunks if len(chunk))  # no copy
    return OpenedIndex(
        path=path,
        index=read_faiss(posixpath.join(path, INDEX_FILE)),
        manifest=manifest,
        ids=ids,
        label_batches=batches,
        batch_labels=np.array([batch[0] for batch in batches], dtype=np.int64),
        batch_rows=(np.cumsum(lengths) - lengths)[lengths > 0],
        shards=dataset.shards,
        id_dtype=dataset.pandas_metadata.dtypes[dataset.id_col],
    )


def _read_ids(url: str) -> pa.Table:
    """The id map at ``url``: memory-mapped from a local file, read into memory from any other fsspec URL."""
    fs, path = filesystem_of(url)
    try:
        if is_local(fs):
            return pa.ipc.open_file(pa.memory_map(path)).read_all()
        with fs.open(path, "rb") as file:
            return pa.ipc.open_file(pa.BufferReader(file.read())).read_all()
    except (OSError, pa.ArrowInvalid) as error:
        raise IndexFileError(f"{url}: cannot read this id file: {error}") from error
