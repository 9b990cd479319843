"""Approximate nearest-neighbour indexes with faiss: which index to build, training it, filling parts of it
and merging them. Plain numpy in, faiss indexes out: nothing here knows of shards or Dask.

Vectors are L2-normalised ``float32 (n, D)`` and the metric is the inner product, so scores are cosines.
The choice follows autofaiss's recipe: an exhaustive index (``IDMap,Flat``) for small data; otherwise an
inverted file (IVF) of about ``2 * sqrt(n)`` lists (autofaiss goes up to ``4 * sqrt(n)``; k-means for that
many lists takes minutes per million vectors on a few CPU cores), trained on a sample, storing the vectors themselves
(``Flat``: exact scores) when they fit the memory budget, else one byte per dimension (``SQ8``: scores
within about 1%), else product-quantised codes (``PQm``: ``m`` bytes per vector, ``m`` as large as the
budget allows).

An IVF index can keep its inverted lists (the codes and labels) in a file of their own, memory-mapped
(``merge_on_disk``, ``read_on_disk``): the process that opens it holds only the coarse quantizer and the lists'
sizes and offsets, and reads the pages of the lists a query scans (at most ``MAPPED_LISTS_BYTES`` of them
stay mapped: ``search``).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import faiss
import numpy as np

from dask_clip.errors import DataError, UsageError

EXHAUSTIVE_BELOW = 50_000
"""Fewer vectors than this get an exhaustive index: scanning them all takes a few milliseconds."""
POINTS_PER_LIST = 40
"""Training vectors per IVF list (faiss warns below 39: k-means needs enough points per centroid). Training
costs ``POINTS_PER_LIST * nlist**2 * D`` per k-means iteration, so linear in ``n`` with ``nlist ~ sqrt(n)``."""
PQ_TRAINING_POINTS = 256 * 39
"""A product quantiser learns 256 centroids per sub-vector: it needs this many training vectors."""
ID_BYTES = 8
SCANNED_PER_QUERY = 16_384
"""A query scans at least about this many vectors by default (``nprobe`` lists of ``n / nlist``): ``IVF2000,Flat``
scans 33 lists at 1M rows; the README quotes its recall and latency."""
PROBED_SHARE = 100
"""... and at least one list in this many (1%), for large ``n``: with ``nlist ~ 2 sqrt(n)`` the lists shrink as ``n``
grows and a query's true neighbours spread over more of them. 16,384 vectors alone (15 of 4,472 lists) gave
recall@10 0.920 at 5M vectors of low intrinsic dimension; 45 lists (about 50,000 vectors) keep it above 0.95 at
a p50 below 20 ms (README). Rules from 1.6M vectors up; below, ``SCANNED_PER_QUERY`` scans more."""
MAPPED_LISTS_BYTES = 2**30
"""The most of an on-disk index's lists a searching process keeps mapped (``search``)."""


@dataclass(frozen=True)
class IndexChoice:
    """What to build: the faiss factory ``key`` (``"IDMap,Flat"``, ``"IVF4000,Flat"``, ``"IVF4000,PQ96"``...), its
    number of IVF lists (0 for an exhaustive index), how many lists a query scans by default (``nprobe``) and
    how many vectors to train on (0: no training)."""

    key: str
    nlist: int
    nprobe: int
    train_size: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def choose_index(n: int, dim: int, memory_budget_bytes: int, key: str | None = None) -> IndexChoice:
    """The index for ``n`` vectors of width ``dim`` whose codes fit ``memory_budget_bytes`` (or the given faiss
    factory ``key``, e.g. ``"IVF256,Flat"``). ``UsageError`` when even the smallest codes do not fit."""
    if key is not None:
        return _given(key, n, dim)
    if n < EXHAUSTIVE_BELOW:
        return IndexChoice("IDMap,Flat", 0, 0, 0)
    nlist = max(1, min(round(2 * math.sqrt(n)), n // POINTS_PER_LIST, 65_536))
    centroids = nlist * dim * 4
    if n * (dim * 4 + ID_BYTES) + centroids <= memory_budget_bytes:
        return _ivf(f"IVF{nlist},Flat", nlist, n)
    if n * (dim + ID_BYTES) + centroids <= memory_budget_bytes:
        return _ivf(f"IVF{nlist},SQ8", nlist, n)
    fitting = [m for m in range(1, dim) if dim % m == 0 and n * (m + ID_BYTES) + centroids <= memory_budget_bytes]
    if not fitting:
        needed = n * (1 + ID_BYTES) + centroids
        raise UsageError(
            f"a memory budget of {memory_budget_bytes / 2**30:.2f} GiB cannot hold an index of {n} vectors "
            f"(at least {needed / 2**30:.2f} GiB): raise it"
        )
    m = max(fitting)
    return _ivf(f"IVF{nlist},PQ{m}", nlist, n, PQ_TRAINING_POINTS)


def _ivf(key: str, nlist: int, n: int, at_least: int = 0) -> IndexChoice:
    train_size = min(n, max(POINTS_PER_LIST * nlist, at_least))
    return IndexChoice(key, nlist, default_nprobe(n, nlist), train_size)


def default_nprobe(n: int, nlist: int) -> int:
    """Lists a query scans by default: enough for ``SCANNED_PER_QUERY`` vectors and at least ``1 / PROBED_SHARE``
    of the ``nlist`` lists, at most all of them."""
    by_vectors = round(SCANNED_PER_QUERY * nlist / max(n, 1))
    return min(nlist, max(1, by_vectors, math.ceil(nlist / PROBED_SHARE)))


def _given(key: str, n: int, dim: int) -> IndexChoice:
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise UsageError(f"index key {key!r} is not a faiss index factory string: {error}") from error
    if key in ("Flat", "IDMap,Flat"):
        return IndexChoice("IDMap,Flat", 0, 0, 0)
    ivf = _ivf_of(index)
    if ivf is None:
        raise UsageError(f"index key {key!r}: give an inverted file (IVF...,Flat, IVF...,SQ8, IVF...,PQm) or Flat")
    if n < training_vectors_needed(ivf):
        raise UsageError(
            f"index key {key!r} cannot be trained on {n} rows: {_training_needs(ivf)}. Give a key with fewer "
            "lists (or 'PQmx4' codes: 16 centroids), or leave index_key out to have one chosen from the rows"
        )
    return _ivf(key, ivf.nlist, n, PQ_TRAINING_POINTS if "PQ" in key else 0)


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted file inside ``index`` as its own class (``IndexIVFPQ``... with its ``pq``), or None."""
    try:
        return faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        return None


def training_vectors_needed(ivf: faiss.IndexIVF) -> int:
    """The fewest training vectors faiss accepts for ``ivf``: one per list, and with product-quantised codes one
    per centroid of a sub-quantiser (``2**nbits``: 256 for ``PQm``, 16 for ``PQmx4``)."""
    pq = getattr(ivf, "pq", None)
    return max(ivf.nlist, pq.ksub if pq is not None else 0)


def _training_needs(ivf: faiss.IndexIVF) -> str:
    """What faiss needs to train ``ivf``, in words: ``"faiss needs at least 256 training vectors (...)"``."""
    pq = getattr(ivf, "pq", None)
    parts = [f"{ivf.nlist} IVF lists"] + ([f"{pq.ksub} centroids per PQ sub-vector"] if pq is not None else [])
    needed = training_vectors_needed(ivf)
    return f"faiss needs at least {needed} training vectors (one per centroid: {', '.join(parts)})"


def empty_index(choice: IndexChoice, dim: int) -> faiss.Index:
    """An untrained, empty index of ``choice`` for vectors of width ``dim``, scoring by inner product."""
    return faiss.index_factory(dim, choice.key, faiss.METRIC_INNER_PRODUCT)


def train(choice: IndexChoice, sample: np.ndarray, seed: int) -> faiss.Index:
    """An empty index of ``choice`` trained on ``sample`` (unit ``float32 (s, D)``), k-means seeded by ``seed``.

    Where faiss's GPU build sees GPUs (``faiss.get_num_gpus() > 0``, e.g. on a GPU worker), the k-means
    assignments run on all of them; otherwise on the CPU. ``DataError`` when the sample has fewer vectors
    than faiss needs (``training_vectors_needed``).
    """
    index = empty_index(choice, sample.shape[1])
    ivf = _ivf_of(index)
    if ivf is None:
        return index
    if len(sample) < training_vectors_needed(ivf):  # rows without a usable embedding are not in the sample
        raise DataError(
            f"index {choice.key!r} cannot be trained on {len(sample)} vectors with a usable embedding: "
            f"{_training_needs(ivf)}. Give a key with fewer lists, or index more rows"
        )
    ivf.cp.seed = seed
    ivf.cp.spherical = True  # unit centroids: lists of directions, as the inner product compares
    if getattr(ivf, "pq", None) is not None:
        ivf.pq.cp.seed = seed
    gpus = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(sample.shape[1])) if faiss.get_num_gpus() > 0 else None
    if gpus is not None:
        ivf.clustering_index = gpus  # the name ``gpus`` keeps the GPU index alive while faiss points to it
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    if gpus is not None:
        ivf.clustering_index = None  # not to point to it once it is freed
    return index


def add(index: faiss.Index, vectors: np.ndarray, labels: np.ndarray) -> faiss.Index:
    """``index`` (trained) with unit ``float32 (n, D)`` ``vectors`` added under ``int64 (n,)`` ``labels``."""
    if len(vectors):
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(labels, dtype=np.int64))
    return index


def merge_into(index: faiss.Index, part: faiss.Index) -> None:
    """Move every vector of ``part`` (an index of the same trained kind) into ``index``, labels kept."""
    index.merge_from(part, 0)


def without_quantizer(index: faiss.Index) -> faiss.Index:
    """``index`` (IVF) with its coarse quantizer emptied: a part for ``merge_on_disk``, which reads only the
    parts' lists, smaller on disk by the quantizer (``nlist * D * 4`` bytes: 14 MB at 4,472 lists of 768-d)."""
    faiss.extract_index_ivf(index).quantizer.reset()
    return index


def merge_on_disk(index: faiss.Index, part_paths: list[str], lists_path: str) -> None:
    """Move every vector of the IVF index files ``part_paths`` (local, each of ``index``'s trained kind, their
    quantizers possibly emptied: ``without_quantizer``) into the trained empty IVF ``index``, whose inverted lists
    become the file ``lists_path``; labels kept.

    The layout is ``faiss.contrib.ondisk.merge_ondisk``'s (each list's codes then labels, list after list), but
    written with file writes, one part at a time, not through a writable memory map: the process never maps the
    pages it writes, nor the parts', so its resident memory is one part and the lists' sizes, whatever the total
    (``n * (code_size + 8)`` bytes, left to the page cache). ``index`` then holds the lists' sizes and offsets.
    """
    ivf = _ivf_of(index)
    if ivf is None or ivf.ntotal:
        raise ValueError("merge_on_disk merges into an empty IVF index")
    code_size = ivf.code_size
    layouts = [_part_layout(path, ivf.nlist) for path in part_paths]  # (sizes, where the part's lists start)
    sizes = np.sum([layout[0] for layout in layouts], axis=0, dtype=np.uint64) if layouts else np.zeros(ivf.nlist)
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    starts = np.concatenate([[0], np.cumsum(sizes * np.uint64(code_size + ID_BYTES))]).astype(np.int64)
    lists = faiss.OnDiskInvertedLists(ivf.nlist, code_size, lists_path)
    with _faiss_prints_silenced():
        lists.set_all_lists_sizes(faiss.swig_ptr(sizes))  # merge_from_multiple's layout: each list's own size
        lists.update_totsize(int(starts[-1]))  # the file, sparse until written
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    descriptor = os.open(lists_path, os.O_WRONLY)
    try:
        for path, (part_sizes, offset) in zip(part_paths, layouts, strict=True):
            _write_part(descriptor, path, part_sizes, offset, starts, sizes.astype(np.int64), filled, code_size)
    finally:
        os.close(descriptor)
    index.ntotal = ivf.ntotal = int(sizes.sum())
    ivf.replace_invlists(lists, True)
    lists.this.disown()  # ``ivf`` owns it now


def _part_layout(path: str, nlist: int) -> tuple[np.ndarray, int]:
    """The IVF index file ``path``'s list sizes (``int64 (nlist,)``) and the file offset where its lists start
    (each list's codes then labels, list after list: faiss's layout), read without touching the lists."""
    part = faiss.read_index(path, faiss.IO_FLAG_MMAP)  # the lists mapped, not read; dropped on return
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(part).invlists)
    if lists.nlist != nlist:
        raise ValueError(f"{path}: {lists.nlist} IVF lists, where the index has {nlist}")
    sizes = np.array([lists.lists.at(i).size for i in range(nlist)], dtype=np.int64)
    return sizes, int(lists.lists.at(0).offset)


def _write_part(
    descriptor: int,
    path: str,
    sizes: np.ndarray,
    offset: int,
    starts: np.ndarray,
    totals: np.ndarray,
    filled: np.ndarray,
    code_size: int,
) -> None:
    """Write the part file ``path``'s lists (``sizes``, from ``offset``) after what ``filled`` counts of each list
    in the lists file open as ``descriptor`` (list ``l``: ``totals[l]`` codes from ``starts[l]``, then their
    labels); ``filled`` is advanced."""
    entry = code_size + ID_BYTES
    with open(path, "rb") as file:
        file.seek(offset)
        data = memoryview(file.read(int(sizes.sum()) * entry))
    source = 0
    for list_no in np.flatnonzero(sizes):
        count, before = int(sizes[list_no]), int(filled[list_no])
        codes_at = int(starts[list_no]) + before * code_size
        ids_at = int(starts[list_no]) + int(totals[list_no]) * code_size + before * ID_BYTES
        os.pwrite(descriptor, data[source : source + count * code_size], codes_at)
        os.pwrite(descriptor, data[source + count * code_size : source + count * entry], ids_at)
        source += count * entry
    filled += sizes


def read_on_disk(path: str) -> faiss.Index:
    """The index in the local file ``path``; an IVF index whose lists ``merge_on_disk`` wrote finds its lists file
    in the same folder (wherever the folder was moved since) and keeps them memory-mapped, read by the searching
    threads (faiss's own prefetch threads, started by every search, are turned off: they would touch pages after
    ``search`` let go of them). (``IO_FLAG_MMAP`` with such lists crashes faiss 1.15: the lists file is
    memory-mapped without it.)"""
    with _faiss_prints_silenced():
        index = faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)
    if lists_on_disk(index):
        faiss.downcast_InvertedLists(_ivf_of(index).invlists).prefetch_nthread = 0
    return index


def is_ivf(index: faiss.Index) -> bool:
    """Whether ``index`` is an inverted file (its lists can live on disk: ``merge_on_disk``)."""
    return _ivf_of(index) is not None


def lists_on_disk(index: faiss.Index) -> bool:
    """Whether ``index`` is an IVF index whose inverted lists are memory-mapped from a file."""
    ivf = _ivf_of(index)
    return ivf is not None and isinstance(faiss.downcast_InvertedLists(ivf.invlists), faiss.OnDiskInvertedLists)


@contextlib.contextmanager
def _faiss_prints_silenced() -> Iterator[None]:
    """File descriptor 1 sent to ``os.devnull`` for the block: faiss's on-disk lists ``printf`` their progress
    ("resizing ...", "updating ondisk filename ...") to stdout, which would mix into a command's own output.
    (Faiss reports its errors as exceptions, not there. Another thread's prints meanwhile are lost too.)"""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C buffered goes there too, before fd 1 is back
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best labels and scores of each unit ``float32 (B, D)`` query: ``float32 (B, k)`` scores and
    ``int64 (B, k)`` labels (-1 where fewer than ``k`` were found). ``nprobe``: IVF lists to scan.

    Lists on disk are searched in batches of queries that scan about ``MAPPED_LISTS_BYTES / 2`` of them, and the
    process lets go of the lists' pages (``release_lists``) whenever it holds more than ``MAPPED_LISTS_BYTES``
    of files' pages: its resident memory stays bounded however many queries it answers."""
    ivf = _ivf_of(index)
    params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe and ivf is not None else None
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not lists_on_disk(index):
        return index.search(queries, k, params=params)
    total = faiss.downcast_InvertedLists(ivf.invlists).totsize
    scanned = max(1, (nprobe or ivf.nprobe) * total // max(ivf.nlist, 1))  # bytes a query reads
    batch = max(1, MAPPED_LISTS_BYTES // (2 * scanned))
    found = []
    for start in range(0, len(queries), batch):
        found.append(index.search(queries[start : start + batch], k, params=params))
        if _file_pages_held() > MAPPED_LISTS_BYTES:
            release_lists(index)
    if not found:
        return index.search(queries, k, params=params)
    return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])


def release_lists(index: faiss.Index) -> None:
    """Unmap the pages of ``index``'s on-disk lists from this process (``madvise(MADV_DONTNEED)``): they stay in
    the page cache, where the next query that scans them finds them without reading the disk."""
    lists = faiss.downcast_InvertedLists(_ivf_of(index).invlists)
    if lists.totsize:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(int(lists.ptr), lists.totsize, mmap.MADV_DONTNEED):
            raise OSError(ctypes.get_errno(), f"madvise of {lists.filename}: {os.strerror(ctypes.get_errno())}")


def _file_pages_held() -> int:
    """Bytes of files' pages this process has mapped and resident (Linux's ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[2]) * mmap.PAGESIZE
    except OSError:
        return 0


def range_search(
    index: faiss.Index, queries: np.ndarray, threshold: float, nprobe: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every label scoring at least ``threshold`` against each unit ``float32 (B, D)`` query (an IVF index scans
    ``nprobe`` lists): ``int64 (B + 1,)`` offsets (query ``q``'s results are ``[lims[q], lims[q + 1])``),
    ``float32 (R,)`` scores and ``int64 (R,)`` labels."""
    params = faiss.SearchParametersIVF(nprobe=nprobe) if nprobe and _ivf_of(index) is not None else None
    below = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # faiss keeps scores above its radius
    lims, scores, labels = index.range_search(np.ascontiguousarray(queries, dtype=np.float32), below, params=params)
    return lims.astype(np.int64), scores, labels.astype(np.int64)


def to_bytes(index: faiss.Index) -> np.ndarray:
    """``index`` serialised: ``uint8 (bytes,)``."""
    return faiss.serialize_index(index)


def from_bytes(data: bytes | np.ndarray) -> faiss.Index:
    """An index from ``to_bytes``'s output (or a file's bytes)."""
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
