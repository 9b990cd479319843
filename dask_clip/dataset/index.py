"""Build an approximate nearest-neighbour index of a dataset's saved embeddings, as autofaiss does:

1. every shard's footer and id column give its rows (so each row's global number, the vector's label) and
   the dataset's fingerprint (``index_files``);
2. each shard's task draws its share of a seeded sample of the rows with an embedding; one task trains an
   empty index on the sample (on a GPU where faiss's GPU build sees one) and writes it;
3. each shard's task adds its vectors to a copy of the trained index and writes that part and its id rows
   (``parts/<stem>.faiss``, ``parts/<stem>.ids.arrow``); the client merges the parts' inverted lists into one
   file on disk (``ann.merge_on_disk``: one part at a time, by file writes) and their id rows into ``ids.arrow`` (one
   part at a time), then writes the manifest (``index_files``).

Only the sample and one part at a time are held anywhere but on the workers; the client holds the coarse
quantizer and the lists' offsets, not the lists. An exhaustive index, and any index written to an object store
(fsspec URL), is merged in the client's memory instead, one part at a time: its size is what the memory
budget bounds. Rows without a usable embedding (null, NaN or infinite values, all zeros: as exact search)
are not indexed, and are counted.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import TYPE_CHECKING

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd

from dask_clip.arguments import at_least
from dask_clip.columns import embedding_dtype, embeddings_to_numpy, empty_column, to_embedding_array, unit_embeddings
from dask_clip.dataset.consistency import check_consumed
from dask_clip.dataset.index_files import (
    FORMAT_1_FILES,
    IDS_FILE,
    INDEX_FILE,
    LISTS_FILE,
    merge_ids,
    read_faiss,
    shard_fingerprints,
    write_faiss,
    write_ids,
    write_manifest,
)
from dask_clip.errors import ShardError, UsageError
from dask_clip.execution import ShardTask, compute
from dask_clip.io.atomic import is_local
from dask_clip.io.metadata import check_stored_contents
from dask_clip.io.output_folder import OutputKind, replacing_folder
from dask_clip.io.shards import filesystem_of
from dask_clip.provenance import Computed, digest

if TYPE_CHECKING:
    import faiss

    from dask_clip import ann
    from dask_clip.dataset import ImageTextPairDataset

_TRAINED, _PARTS = "trained.faiss", "parts"
OUTPUT = OutputKind("build_index", FORMAT_1_FILES)
SUMMARY_COLUMNS = ["stem", "rows", "indexed", "without_embedding"]


def build_index(
    dataset: ImageTextPairDataset,
    path: str,
    *,
    embedding_column: str = "image_embedding",
    memory_budget_gb: float = 4.0,
    index_key: str | None = None,
    nprobe: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Index ``embedding_column`` (saved in the shards' files) into the folder ``path`` for ``search(index=path)``.

    The index is chosen from the row count and ``memory_budget_gb`` (the merged index's size; ``ann.choose_index``;
    an IVF index's lists are kept on disk, memory-mapped when searched, where ``path`` is local)
    unless ``index_key`` names one (a faiss factory string: ``"Flat"``, ``"IVF1024,Flat"``, ``"IVF1024,PQ64"``).
    ``nprobe``: the IVF lists a query scans by default (unless given: enough lists for about 16,000 vectors, and
    at least 1% of them: ``ann.default_nprobe``).
    ``seed`` fixes the training sample and k-means. ``path`` is written as a whole
    (``io.output_folder``): never the dataset's folder, one inside it or above it; it must be empty or absent
    unless ``overwrite`` and an earlier ``build_index`` wrote it.
    Embeddings that the shards' files do not hold from one run over their current rows (two models after an
    interrupted switch: ``dataset.consistency``) are refused, before anything is written.

    Returns one row per shard: ``stem``, ``rows``, ``indexed`` and ``without_embedding`` (not indexed).
    """
    import faiss

    from dask_clip import ann

    if not memory_budget_gb > 0:
        raise UsageError(f"memory_budget_gb must be positive, not {memory_budget_gb!r}")
    if nprobe is not None:
        at_least("nprobe", nprobe)
    at_least("seed", seed, 0)
    width = dataset.embedding_width(embedding_column, "build_index")
    if isinstance(dataset.provenance.get(embedding_column), Computed):
        raise UsageError(
            f"build_index indexes {embedding_column!r} as the shards' files hold it, but this dataset computes it: "
            "save_metadata() first, then read the dataset again"
        )
    if width is None:
        raise UsageError(f"no shard holds an embedding in {embedding_column!r}: nothing to index")
    check_consumed(dataset, [embedding_column], "build_index")
    fingerprints = shard_fingerprints(dataset, embedding_column)
    rows = np.array([entry["rows"] for entry in fingerprints], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(rows)[:-1]])
    choice = ann.choose_index(int(rows.sum()), width, int(memory_budget_gb * 2**30), index_key)
    if nprobe is not None:
        choice = ann.IndexChoice(choice.key, choice.nlist, nprobe, choice.train_size)

    with replacing_folder(path, overwrite, OUTPUT, dataset.path) as folder:
        trained_url = posixpath.join(folder, _TRAINED)
        if choice.train_size:
            sample = _sample(dataset, embedding_column, width, choice.train_size / int(rows.sum()), seed)
            compute(dask.delayed(_train_and_write)(sample, choice, width, seed, trained_url))
        else:  # an exhaustive index: nothing to train
            write_faiss(ann.empty_index(choice, width), trained_url)
        indexed = compute(_add_parts(dataset, embedding_column, width, offsets, rows, trained_url, folder))
        indexed = np.bincount(indexed["shard"], weights=indexed["indexed"], minlength=len(rows)).astype(np.int64)
        parts = posixpath.join(folder, _PARTS)
        lists = _merge_parts(
            read_faiss(trained_url),
            [posixpath.join(parts, f"{s.stem}.faiss") for s in dataset.shards],
            folder,
        )
        id_parts = [posixpath.join(parts, f"{s.stem}.ids.arrow") for s in dataset.shards]
        merge_ids(id_parts, posixpath.join(folder, IDS_FILE))
        _remove_scratch(folder)
        summary = pd.DataFrame(
            {
                "stem": [s.stem for s in dataset.shards],
                "rows": rows,
                "indexed": indexed,
                "without_embedding": rows - indexed,
            },
            columns=SUMMARY_COLUMNS,
        )
        manifest = {
            "column": embedding_column,
            "id_col": dataset.id_col,
            "dim": width,
            "index": {**choice.as_dict(), "memory_budget_gb": memory_budget_gb, "seed": seed, "lists": lists},
            "faiss": faiss.__version__,
            "embedding_operation": dataset.operation_config(embedding_column),
            "counts": {
                "rows": int(rows.sum()),
                "indexed": int(indexed.sum()),
                "without_embedding": int((rows - indexed).sum()),
            },
            "dataset": digest(fingerprints),
            "shards": fingerprints,
        }
        write_manifest(folder, manifest)
    return summary


def _sample(dataset: ImageTextPairDataset, column: str, width: int, share: float, seed: int) -> dd.DataFrame:
    """Each shard's usable vectors, each drawn with probability ``share`` (seeded by ``seed`` and the shard)."""
    meta = pd.DataFrame({"vector": empty_column(embedding_dtype(width))})
    return dataset.map_shards(
        _sample_of_shard,
        meta,
        label="index-sample",
        column=column,
        width=width,
        share=share,
        seed=seed,
    )


def _sample_of_shard(
    rows: pd.DataFrame, task: ShardTask, column: str, width: int, share: float, seed: int
) -> pd.DataFrame:
    _, vectors = unit_embeddings(rows[column], width, rows[task.id_col])
    drawn = np.random.default_rng([seed, task.shard.index]).random(len(vectors)) < share
    return pd.DataFrame({"vector": to_embedding_array(vectors[drawn], np.ones(int(drawn.sum()), dtype=bool))})


def _train_and_write(sample: pd.DataFrame, choice: ann.IndexChoice, width: int, seed: int, url: str) -> None:
    """Train an empty index of ``choice`` on the sample's ``vector`` column and write it to ``url`` (a task)."""
    from dask_clip import ann

    vectors = embeddings_to_numpy(sample["vector"], width) if len(sample) else np.zeros((0, width), np.float32)
    write_faiss(ann.train(choice, vectors, seed), url)


def _add_parts(dataset, column: str, width: int, offsets: np.ndarray, rows: np.ndarray, trained_url: str, folder: str):
    """Each shard's part of the index and its id rows (written into ``folder/parts``); the computed frame counts
    each shard's vectors indexed (``shard``, ``indexed``)."""
    meta = pd.DataFrame({"shard": empty_column("int32"), "indexed": empty_column("int64")})
    return dataset.map_shards(
        _add_shard,
        meta,
        label="index-add",
        payloads=[json.dumps({"offset": int(o), "rows": int(r)}) for o, r in zip(offsets, rows, strict=True)],
        column=column,
        width=width,
        trained_url=trained_url,
        parts=posixpath.join(folder, _PARTS),
    )


def _add_shard(
    rows: pd.DataFrame, task: ShardTask, column: str, width: int, trained_url: str, parts: str
) -> pd.DataFrame:
    """Add one shard's usable vectors, labelled by their global row numbers, to a copy of the trained index;
    write it and the vectors' id rows (``label``, ``shard``, id) as the shard's part."""
    import pyarrow as pa

    from dask_clip import ann

    expected = json.loads(task.payload)
    if len(rows) != expected["rows"]:
        raise ShardError(
            f"{task.shard.parquet_url}: holds {len(rows)} rows, {expected['rows']} when the index build started: "
            "the dataset changed during the build"
        )
    check_stored_contents(rows, [column], task.shard.parquet_url)  # the values the recorded digest says: not edited
    usable, vectors = unit_embeddings(rows[column], width, rows[task.id_col])
    positions = np.flatnonzero(usable)
    labels = (expected["offset"] + positions).astype(np.int64)
    index = ann.add(read_faiss(trained_url), vectors, labels)
    if _merged_on_disk(index, parts):
        ann.without_quantizer(index)  # the merge reads the part's lists only
    fs, parts_path = filesystem_of(parts)
    fs.makedirs(parts_path, exist_ok=True)
    write_faiss(index, posixpath.join(parts, f"{task.shard.stem}.faiss"))
    ids = pa.array(rows[task.id_col].array)  # every row's: the type even where no row is indexed
    part = pa.table(
        {
            "label": pa.array(labels),
            "shard": pa.array(np.full(len(positions), task.shard.index, dtype=np.int32)),
            task.id_col: ids.take(pa.array(positions, type=pa.int64())),
        }
    )
    write_ids(part, posixpath.join(parts, f"{task.shard.stem}.ids.arrow"))
    return pd.DataFrame(
        {"shard": np.array([task.shard.index], dtype=np.int32), "indexed": np.array([len(positions)], np.int64)}
    )


def _merge_parts(trained: faiss.Index, parts: list[str], folder: str) -> str:
    """Move every part's vectors into the trained empty index and write it as ``folder``'s ``index.faiss``:
    an IVF index in a local folder with its lists in ``lists.ivfdata`` (the parts memory-mapped), any other
    read one part at a time into memory. Returns where the lists are: ``"on_disk"`` or ``"in_memory"``."""
    from dask_clip import ann

    if _merged_on_disk(trained, folder):
        local = [filesystem_of(part)[1] for part in parts]
        lists = filesystem_of(posixpath.join(folder, LISTS_FILE))[1]
        ann.merge_on_disk(trained, local, lists)
        write_faiss(trained, posixpath.join(folder, INDEX_FILE))
        for written in (lists, filesystem_of(posixpath.join(folder, INDEX_FILE))[1]):
            with open(written, "rb") as file:  # on disk before the manifest says the folder is whole
                os.fsync(file.fileno())
        return "on_disk"
    for part in parts:
        ann.merge_into(trained, read_faiss(part))
    write_faiss(trained, posixpath.join(folder, INDEX_FILE))
    return "in_memory"


def _merged_on_disk(index: faiss.Index, folder: str) -> bool:
    """Whether the parts of ``index`` (of its kind) written under ``folder`` are merged on disk (``_merge_parts``)."""
    from dask_clip import ann

    return ann.is_ivf(index) and is_local(filesystem_of(folder)[0])


def _remove_scratch(folder: str) -> None:
    fs, path = filesystem_of(folder)
    fs.rm(posixpath.join(path, _PARTS), recursive=True)
    fs.rm(posixpath.join(path, _TRAINED))
