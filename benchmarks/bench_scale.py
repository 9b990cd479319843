#!/usr/bin/env python
"""Semantic dedup (and, where ``scale_index.py`` exists, the ANN index) over N synthetic 768-d unit vectors.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_scale.py                     # N = 100,000 then 1,000,000
    .venv/bin/python benchmarks/bench_scale.py --rows 100000       # one size

For each N, ``synthetic_vectors.write_synthetic`` writes the shards (10,000 rows each, about 1% of the rows
in planted near-duplicate groups of pairwise cosine 0.995, spread over the shards) into a temporary folder,
then each measurement runs on a fresh ``LocalCluster`` of ``--workers`` single-threaded workers:

- ``scale_dedup.run``: wall time, peak RSS per worker, recall and precision of the planted pairs, and an exact
  all-pairs check on a subset (goals at 1,000,000: RSS under 2 GB per worker, under 20 minutes, recall >= 0.99);
- ``scale_index.run(dataset_path, n, workers) -> dict``, when that module is present (skipped otherwise).

The machine's CPU flags (AVX2 / AVX-512 bf16 / AMX) and its load average before and after each
measurement go with the figures: the machine may be shared. Results are printed as a table and written as
JSON to ``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import scale_dedup
from synthetic_vectors import write_synthetic

SIZES = (100_000, 1_000_000)


def scale_index() -> Any:
    """The index measurement module, or None when ``benchmarks/scale_index.py`` is absent."""
    if importlib.util.find_spec("scale_index") is None:
        return None
    import scale_index as module

    return module


def measure(function: Any, *args: Any) -> dict[str, Any]:
    """``function(*args)`` with the load average before and after it."""
    before = os.getloadavg()
    result = function(*args)
    return {**result, "load_average_before": before, "load_average_after": os.getloadavg()}


def measure_size(n: int, workers: int, work: Path, started: float) -> dict[str, Any]:
    folder = work / f"n{n}"
    harness.log(started, f"n={n:,}: writing synthetic vectors")
    began = time.perf_counter()
    synthetic = write_synthetic(folder, n)
    entry: dict[str, Any] = {
        "rows": n,
        "shards": synthetic.shards,
        "planted_groups": synthetic.groups,
        "planted_rows": synthetic.planted_rows,
        "generate_s": time.perf_counter() - began,
    }
    harness.log(started, f"n={n:,}: semantic dedup")
    entry["dedup"] = measure(scale_dedup.run, str(synthetic.dataset), n, workers)
    harness.log(started, f"n={n:,}: dedup {json.dumps(summary_of(entry['dedup']))}")
    index = scale_index()
    if index is None:
        harness.log(started, "benchmarks/scale_index.py is absent: index measurement skipped")
    else:
        harness.log(started, f"n={n:,}: index")
        entry["index"] = measure(index.run, str(synthetic.dataset), n, workers)
    shutil.rmtree(folder, ignore_errors=True)
    return entry


def summary_of(dedup: dict[str, Any]) -> dict[str, Any]:
    return {
        "wall_s": round(dedup["wall_s"], 1),
        "peak_rss_mb": [round(v) for v in dedup["peak_rss_mb_per_worker"]],
        "recall": dedup["planted"]["recall"],
        "precision": dedup["planted"]["precision"],
    }


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, AVX2 {m['avx2']}, AVX-512 "
        f"{m['avx512']}, AVX-512 bf16 {m['avx512_bf16']}, AMX {m['amx']}; faiss {results['faiss']}, "
        f"dask {m['dask']}"
    )
    header = (
        "rows",
        "wall (s)",
        "peak RSS / worker (MB)",
        "planted pairs",
        "recall",
        "precision",
        "subset exact pairs",
        "subset recall",
        "subset precision",
        "load before / after",
    )
    rows = []
    for entry in results["sizes"]:
        d = entry["dedup"]
        p, s = d["planted"], d["exact_subset"]
        cells = [
            f"{entry['rows']:,}",
            f"{d['wall_s']:.0f}",
            " / ".join(f"{v:.0f}" for v in d["peak_rss_mb_per_worker"]),
            f"{p['pairs']:,}",
            f"{p['recall']:.4f}",
            f"{p['precision']:.4f}",
            f"{s['exact_pairs']:,} of {s['rows']:,} rows",
            f"{s['recall']:.4f}",
            f"{s['precision']:.4f}",
            f"{d['load_average_before'][0]:.2f} / {d['load_average_after'][0]:.2f}",
        ]
        rows.append(cells)
    harness.print_table(header, rows)
    print(
        f"\n(semantic dedup {json.dumps(scale_dedup.DEDUP_OPTIONS)}, {results['workers']} workers x 1 thread, "
        f"memory limit {scale_dedup.WORKER_MEMORY_LIMIT}, P2P comm buffer {scale_dedup.P2P_COMM_BUFFER}; "
        "wall time from the call to the end of save_metadata)"
    )
    for entry in results["sizes"]:
        if "index" in entry:
            print(f"index at {entry['rows']:,} rows: {json.dumps(entry['index'], default=str)}")
    print(f"\ntotal {results['total_s']:.0f}s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help=f"N (repeatable; default {SIZES})")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers, one thread each")
    parser.add_argument("--work-dir", default=None, help="where to write the shards (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    import faiss

    options = parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    started = time.perf_counter()
    machine = harness.machine()
    with open("/proc/cpuinfo") as file:
        machine["avx512"] = " avx512f " in file.read()
    results: dict[str, Any] = {"machine": machine, "faiss": faiss.__version__, "workers": options.workers, "sizes": []}
    work = Path(tempfile.mkdtemp(prefix="dask_clip_scale_", dir=options.work_dir))
    try:
        for n in options.rows or SIZES:
            results["sizes"].append(measure_size(n, options.workers, work, started))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - started
    print_report(results)
    harness.write_results("bench_scale", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
