#!/usr/bin/env python
"""Semantic dedup (and, where ``scale_index.py`` exists, the ANN index) over N synthetic 768-d unit vectors.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_scale.py                     # N = 100,000 then 1,000,000
    .venv/bin/python benchmarks/bench_scale.py --rows 100000       # one size
    .venv/bin/python benchmarks/bench_scale.py --rows 100000 --data isotropic --n-clusters 100 \
        --max-copies 0 --max-copies 2                              # the trade-off of boundary copies

For each N and each data set (``--data``), ``synthetic_vectors.write_synthetic`` writes the shards (10,000 rows
each) into a temporary folder:

- ``clustered``: rows around 1,000 topics, about 1% of them in planted groups of 2 to 4 near-copies of pairwise
  cosine 0.995, spread over the shards;
- ``isotropic``: rows uniform on the sphere (no topics), about 1% of them in planted pairs of cosine 0.999,
  spread over the shards: cluster boundaries cut through the data anywhere.

(``--data-cache DIR`` keeps them in ``DIR`` and reuses them on later runs.) Then each measurement runs on a fresh
``LocalCluster`` of ``--workers`` single-threaded workers of ``--memory-limit`` each (3 GiB by default), started
by ``dask_clip.get_client`` or, with ``--cluster user``, as a user would (their own ``LocalCluster`` and
``Client``, which dask_clip picks up), at ``SemanticDeduplicator``'s defaults but for ``eps=0.01`` and each
``--n-clusters`` and ``--max-copies``, with Dask's own P2P settings (``--p2p-buffer`` to set one):

- ``scale_dedup.run``: wall time, peak RSS per worker, recall and precision of the planted pairs, an exact
  all-pairs check on a subset and the rows copied to other clusters (goals at 1,000,000: RSS under 2 GB per
  worker, under 20 minutes, recall >= 0.99);
- ``scale_index.run(dataset_path, n, workers) -> dict``, on the clustered set, when that module is present
  (skipped otherwise).

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
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import scale_dedup
from synthetic_vectors import Synthetic, write_synthetic

SIZES = (100_000, 1_000_000)
DATA_SETS = {
    "clustered": {},
    "isotropic": {"isotropic": True, "pair_cosine": 0.999, "group_sizes": (2, 2)},
}
"""``write_synthetic`` options of each data set."""


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


def synthetic_data(n: int, data: str, work: Path, cache: Path | None, started: float) -> Synthetic:
    """The data set ``data`` of ``n`` rows: written under ``work``, or under ``cache`` on the first run that names
    that folder and read from there on later ones (``write_synthetic`` is seeded: the same rows every time)."""
    folder = (cache or work) / f"{data}-n{n}"
    record = folder / "synthetic.json"
    if cache is not None and record.exists():
        harness.log(started, f"n={n:,} {data}: reusing the synthetic vectors in {folder}")
        fields = json.loads(record.read_text())
        return Synthetic(**{**fields, "dataset": Path(fields["dataset"]), "planted": Path(fields["planted"])})
    harness.log(started, f"n={n:,} {data}: writing synthetic vectors")
    synthetic = write_synthetic(folder, n, **DATA_SETS[data])
    record.write_text(
        json.dumps({**asdict(synthetic), "dataset": str(synthetic.dataset), "planted": str(synthetic.planted)})
    )
    return synthetic


def measure_size(n: int, data: str, options: argparse.Namespace, work: Path, started: float) -> dict[str, Any]:
    began = time.perf_counter()
    cache = Path(options.data_cache) if options.data_cache else None
    synthetic = synthetic_data(n, data, work, cache, started)
    entry: dict[str, Any] = {
        "rows": n,
        "data": data,
        "shards": synthetic.shards,
        "planted_groups": synthetic.groups,
        "planted_rows": synthetic.planted_rows,
        "generate_s": time.perf_counter() - began,
        "dedup": [],
    }
    for n_clusters in options.n_clusters or [1000]:
        for max_copies in options.max_copies or [2]:
            label = f"n={n:,} {data} n_clusters={n_clusters} max_copies={max_copies}"
            harness.log(started, f"{label}: semantic dedup")
            dedup_options = {"n_clusters": n_clusters, "max_copies": max_copies}
            if options.kmeans_sample_size:
                dedup_options["kmeans_sample_size"] = options.kmeans_sample_size
            run = measure(
                scale_dedup.run,
                str(synthetic.dataset),
                n,
                options.workers,
                dedup_options,
                options.p2p_buffer,
                options.memory_limit,
                options.cluster,
                not options.skip_copy_counts,
            )
            entry["dedup"].append(run)
            harness.log(started, f"{label}: {json.dumps(summary_of(run))}")
    index = None if options.skip_index else scale_index()
    if index is None:
        harness.log(started, "index measurement skipped (--skip-index, or benchmarks/scale_index.py absent)")
    elif data == "clustered":
        harness.log(started, f"n={n:,}: index")
        entry["index"] = measure(index.run, str(synthetic.dataset), n, options.workers)
    if cache is None:
        shutil.rmtree(synthetic.dataset.parent, ignore_errors=True)
    return entry


def summary_of(dedup: dict[str, Any]) -> dict[str, Any]:
    return {
        "wall_s": round(dedup["wall_s"], 1),
        "peak_rss_mb": [round(v) for v in dedup["peak_rss_mb_per_worker"]],
        "recall": dedup["planted"]["recall"],
        "precision": dedup["planted"]["precision"],
        "copied_rows": dedup["copied_rows"],
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
        "data",
        "n_clusters",
        "max_copies",
        "sample",
        "rows copied",
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
    for entry, d in ((size, run) for size in results["sizes"] for run in size["dedup"]):
        p, s = d["planted"], d["exact_subset"]
        cells = [
            f"{entry['rows']:,}",
            entry["data"],
            f"{d['options']['n_clusters']:,}",
            f"{d['options']['max_copies']}",
            f"{d['options'].get('kmeans_sample_size', 'default')}",
            "not counted" if d["copies"] is None else f"{d['copied_rows']:,} ({d['copies']:,} copies)",
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
        f"\n(semantic dedup {json.dumps(scale_dedup.DEDUP_OPTIONS)} and the table's options, the rest at the "
        f"defaults; {results['workers']} workers x 1 thread, memory limit {results['memory_limit']}, cluster started "
        f"by {results['cluster']}, P2P comm "
        f"buffer {results['p2p_buffer'] or 'at Dask default'}; wall time from the call to the end of save_metadata)"
    )
    for entry in results["sizes"]:
        if "index" in entry:
            print(f"index at {entry['rows']:,} rows: {json.dumps(entry['index'], default=str)}")
    print(f"\ntotal {results['total_s']:.0f}s")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help=f"N (repeatable; default {SIZES})")
    parser.add_argument("--data", action="append", choices=list(DATA_SETS), help="data set (repeatable; default both)")
    parser.add_argument("--n-clusters", type=int, action="append", help="n_clusters (repeatable; default 1000)")
    parser.add_argument("--max-copies", type=int, action="append", help="max_copies (repeatable; default 2)")
    parser.add_argument(
        "--kmeans-sample-size",
        type=int,
        help="kmeans_sample_size (default: the deduplicator's, 100,000: at N = 100,000, 10,000 samples as many "
        "rows as the default does at 1,000,000)",
    )
    parser.add_argument("--p2p-buffer", default=None, help="distributed.p2p.comm.buffer (default: Dask's own)")
    parser.add_argument("--skip-index", action="store_true", help="measure semantic dedup only")
    parser.add_argument(
        "--skip-copy-counts", action="store_true", help="do not count the rows copied (a sample and an assign pass)"
    )
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers, one thread each")
    parser.add_argument(
        "--memory-limit", default=scale_dedup.WORKER_MEMORY_LIMIT, help="memory limit per worker (default %(default)s)"
    )
    parser.add_argument(
        "--cluster",
        choices=scale_dedup.CLUSTERS,
        default="dask_clip",
        help="who starts the cluster: dask_clip.get_client, or the user (a LocalCluster and a Client of their own)",
    )
    parser.add_argument(
        "--data-cache",
        default=None,
        help="a folder to keep the synthetic data sets in and reuse them from on later runs (default: written to "
        "the work folder and deleted)",
    )
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
    results: dict[str, Any] = {
        "machine": machine,
        "faiss": faiss.__version__,
        "workers": options.workers,
        "p2p_buffer": options.p2p_buffer,
        "memory_limit": options.memory_limit,
        "cluster": options.cluster,
        "sizes": [],
    }
    with harness.work_folder("dask_clip_scale_", options.work_dir) as work:
        for n in options.rows or SIZES:
            for data in options.data or list(DATA_SETS):
                results["sizes"].append(measure_size(n, data, options, work, started))
    harness.finish("bench_scale", results, started, print_report)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
