#!/usr/bin/env python
"""How deduplication decisions get back to their shards, as the shard count grows: the graph's task count, the
seconds to build it and the wall time of the whole dedup, for the P2P join (``Deduplicator.join_decisions``) and
for the tasks shuffle it replaced (``execution.shuffle_to_shards``, still the join of ``map_shards_with_results``).

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_join_back.py                          # 1,000 and 10,000 shards
    .venv/bin/python benchmarks/bench_join_back.py --shards 1000 --tasks-wall-up-to 1000

Each size writes ``--shards`` shards of ``--rows-per-shard`` random 16-d unit vectors (small vectors: the join,
not the distances, is measured) into a temporary folder, then on one ``LocalCluster`` of ``--workers``
single-threaded workers, for each join:

- **tasks**: the optimised graph of ``SemanticDeduplicator(n_clusters=10)(dataset).metadata`` (what ``compute``
  sends), every pass included (sample, fit, assign, shuffle, decide, join);
- **build_s**: seconds from the deduplicator's call to that graph, materialised;
- **wall_s**: seconds to compute the metadata on the cluster (its graph built again), skipped above
  ``--wall-up-to`` shards (``--tasks-wall-up-to`` for the tasks shuffle, which runs for long at 10,000).

Both joins must give the same frame where both ran. The machine's CPU flags and load go with the figures; results
are printed as a table and written as JSON to ``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any
from unittest import mock

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import numpy as np
import pandas as pd
from synthetic_vectors import unit_rows, write_shard

SHARD_COUNTS = (1_000, 10_000)
DIM = 16
JOINS = ("tasks", "p2p")


def write_dataset(folder: Path, shards: int, rows_per_shard: int) -> Path:
    """``shards`` shards of ``rows_per_shard`` random unit vectors under ``folder``."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for shard in range(shards):
        write_shard(folder, shard, unit_rows(rng.standard_normal((rows_per_shard, DIM), dtype=np.float32)))
    return folder


def tasks_shuffle(frame: Any, column: str, count: int) -> Any:
    """The join before: a tasks shuffle of the decisions on their shard (``shuffle_on_disk``'s signature)."""
    from dask_clip.execution import shuffle_to_shards

    return shuffle_to_shards(frame, count)


def measure_join(dataset: Any, join: str, wall: bool) -> tuple[dict[str, Any], pd.DataFrame | None]:
    """Task count, build seconds and (when ``wall``) wall seconds of the dedup with ``join``; and its frame."""
    from dask_clip import SemanticDeduplicator
    from dask_clip.execution import compute, optimized_with_resources

    patch = mock.patch("dask_clip.ops.deduplicator.shuffle_on_disk", tasks_shuffle) if join == "tasks" else None
    with patch or contextlib.nullcontext():
        started = time.perf_counter()
        metadata = SemanticDeduplicator(n_clusters=10, eps=0.01)(dataset).metadata
        optimized, _ = optimized_with_resources(metadata)
        tasks = len(dict(optimized.__dask_graph__()))
        figures: dict[str, Any] = {"join": join, "tasks": tasks, "build_s": time.perf_counter() - started}
        frame = None
        if wall:
            started = time.perf_counter()
            frame = compute(metadata)
            figures["wall_s"] = time.perf_counter() - started
    figures["load_average"] = os.getloadavg()
    return figures, frame


def measure_size(shards: int, options: argparse.Namespace, work: Path, started: float) -> dict[str, Any]:
    from dask_clip import ImageTextPairDataset, get_client

    folder = write_dataset(work / f"shards-{shards}", shards, options.rows_per_shard)
    harness.log(started, f"{shards} shards written")
    size: dict[str, Any] = {"shards": shards, "rows": shards * options.rows_per_shard, "joins": []}
    frames = {}
    with get_client("cpu", n_workers=options.workers, threads_per_worker=1, dashboard_address=":0") as client:
        dataset = ImageTextPairDataset.from_webdataset(str(folder))
        for join in JOINS:
            wall = shards <= (options.wall_up_to if join == "p2p" else options.tasks_wall_up_to)
            figures, frames[join] = measure_join(dataset, join, wall)
            size["joins"].append(figures)
            harness.log(started, f"{shards} shards, {join} join: {figures}")
        client.cluster.close()
    if all(frame is not None for frame in frames.values()):
        pd.testing.assert_frame_equal(frames["tasks"], frames["p2p"])
        size["same_frames"] = True
    shutil.rmtree(folder)
    return size


def print_report(results: dict[str, Any]) -> None:
    rows = []
    for size in results["sizes"]:
        for figures in size["joins"]:
            wall = f"{figures['wall_s']:.1f}" if "wall_s" in figures else "-"
            load = ", ".join(f"{value:.1f}" for value in figures["load_average"])
            cells = [figures["join"], f"{figures['tasks']:,}", f"{figures['build_s']:.1f}", wall, load]
            rows.append([f"{size['shards']:,}", *cells])
    harness.print_table(["shards", "join", "tasks", "build s", "wall s", "load average"], rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, action="append", help=f"shard count (repeatable; default {SHARD_COUNTS})")
    parser.add_argument("--rows-per-shard", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers, one thread each")
    parser.add_argument("--wall-up-to", type=int, default=10_000, help="most shards to time the P2P join at")
    parser.add_argument("--tasks-wall-up-to", type=int, default=1_000, help="most shards to time the tasks join at")
    parser.add_argument("--work-dir", default=None, help="where to write the shards (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    options = parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": harness.machine(), "rows_per_shard": options.rows_per_shard, "sizes": []}
    with harness.work_folder("dask_clip_join_", options.work_dir) as work:
        for shards in options.shards or SHARD_COUNTS:
            results["sizes"].append(measure_size(shards, options, work, started))
    harness.finish("bench_join_back", results, started, print_report)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
