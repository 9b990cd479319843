"""Seconds to build the lazy graph of ``from_webdataset`` + ``embedder(ds)`` over 10,000 one-image shards
(2,000 with ``--quick``), and to materialise it, with an audit hook counting the tars and parquets the
client opens meanwhile (the listing must not read a tar)."""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


def _write_tiny_shards(folder: str, numbers: list[int], payload: bytes) -> int:
    from dask_clip import testing

    for number in numbers:
        key = testing.img2dataset_key(number, 0, shard_digits=6)
        row = {"url": f"file:///tiny/{number}.jpg", "caption": "tiny", "key": key, "status": "success"}
        testing.write_shard(folder, number, [row], {key: {"jpg": payload}})
    return len(numbers)


def graph_build(folder: Path, model_dir: Path, shards: int, pool: ProcessPoolExecutor) -> dict[str, Any]:
    """Write ``shards`` one-image shards into ``folder`` (on ``pool``), then time the graph build on them."""
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, testing

    payload = testing.encode_jpeg(np.full((16, 16, 3), 128, dtype=np.uint8))
    started = time.perf_counter()
    chunks = [list(range(start, min(start + 500, shards))) for start in range(0, shards, 500)]
    written = sum(pool.map(_write_tiny_shards, [str(folder)] * len(chunks), chunks, [payload] * len(chunks)))
    write_s = time.perf_counter() - started

    opened: list[str] = []
    recording = threading.Event()

    def audit(event: str, args: tuple) -> None:
        if recording.is_set() and event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.append(os.fspath(args[0]))

    sys.addaudithook(audit)  # cannot be removed: it records only while ``recording`` is set
    recording.set()
    started = time.perf_counter()
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    discovered = time.perf_counter()
    embedded = ClipImageEmbedder(str(model_dir))(dataset)
    built = time.perf_counter()
    graph = embedded.metadata.__dask_graph__()
    materialized = time.perf_counter()
    recording.clear()
    return {
        "shards": written,
        "write_s": write_s,
        "from_webdataset_s": discovered - started,
        "embedder_call_s": built - discovered,
        "build_s": built - started,
        "graph_materialize_s": materialized - built,
        "graph_tasks": len(graph),
        "tar_opens_on_client": sum(p.endswith(".tar") for p in opened),
        "parquet_opens_on_client": sum(p.endswith(".parquet") for p in opened),
    }
