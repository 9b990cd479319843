#!/usr/bin/env python
"""Where a semantic dedup's workers spend their memory at the defaults: an RSS timeline per worker, by the kind of
task each was running (sample, fit, assign, shuffle, within-cluster pass, join), on isotropic vectors.

Run from the root of a checkout::

    .venv/bin/python benchmarks/dedup_memory.py                      # 200,000 and 500,000 rows
    .venv/bin/python benchmarks/dedup_memory.py --rows 1000000

Each size writes ``synthetic_vectors.write_synthetic(..., isotropic=True)`` (768-d rows uniform on the sphere,
about 1% of them in planted pairs of cosine 0.999, 10,000 rows a shard) into a temporary folder, then runs
``SemanticDeduplicator(eps=0.01, n_clusters=100)`` (other options at their defaults) on
``get_client(cluster_type="cpu", n_workers=2, threads_per_worker=1, memory_limit="10GB")``, with no Dask setting
of its own (no P2P buffer), saving only the decision columns. A thread asks every worker, every
``--interval`` seconds, for its RSS (``psutil``), the bytes of the task results it holds (``state.nbytes``:
Dask's managed memory; the rest of the RSS is the running task's own and what the process keeps) and the tasks
it is executing. Each sample is filed under the kind of those tasks (``kinds_of``; ``idle`` when none runs).
Reported per worker: the peak RSS, what ran then, and the highest RSS seen under each kind. The whole timeline
goes into the JSON written to ``benchmarks/results/`` (gitignored), next to the machine's CPU flags and load.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
from synthetic_vectors import write_synthetic

SIZES = (200_000, 500_000)
MEMORY_LIMIT = "10GB"
DEDUP_OPTIONS = {"eps": 0.01, "n_clusters": 100}


def _sample(dask_worker: Any) -> tuple[int, int, list[str]]:
    """(In a worker.) Its RSS, the bytes of the results it holds, and the names of the tasks it is running."""
    import psutil

    executing = sorted(
        {str(task.key[0] if isinstance(task.key, tuple) else task.key) for task in dask_worker.state.executing}
    )
    return psutil.Process().memory_info().rss, dask_worker.state.nbytes, executing


def kinds_of(samples: list[dict[str, Any]]) -> list[str]:
    """The pass each sample fell in (``idle`` when its worker ran nothing). Fused tasks carry the names of their
    first and last steps only, so the passes are told apart by when they start: the clusters' fit
    (``fit_tree``), the first output of the vectors' P2P shuffle (its outputs run the within-cluster pass) and
    the first save (each shard's join, then its write)."""

    def first(test: Any) -> float:
        return min((s["s"] for s in samples if any(test(task) for task in s["tasks"])), default=float("inf"))

    transfers = [t for s in samples for t in s["tasks"] if t.startswith("shuffle-transfer-")]
    vectors = transfers[0].removeprefix("shuffle-transfer-") if transfers else None
    decide = first(lambda task: vectors is not None and task == f"p2pshuffle-{vectors}")
    save = first(lambda task: "save" in task)
    phases = [
        (first(lambda task: task.startswith("fit_tree")), "sample"),
        (decide, "assign + shuffle vectors"),
        (save, "within-cluster pass + shuffle decisions"),
        (float("inf"), "join + save"),
    ]
    kinds = []
    for sample in samples:
        if not sample["tasks"]:
            kinds.append("idle")
        elif any(task.startswith("fit_tree") for task in sample["tasks"]):
            kinds.append("fit")
        else:
            kinds.append(next(kind for until, kind in phases if sample["s"] < until))
    return kinds


class Timeline:
    """Samples every worker (``_sample``) in a background thread while the block runs."""

    def __init__(self, client: Any, interval: float) -> None:
        self.client, self.interval = client, interval
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            seconds = round(time.perf_counter() - started, 1)
            for worker, (rss, managed, tasks) in self.client.run(_sample).items():
                self.samples.append(
                    {
                        "s": seconds,
                        "worker": worker,
                        "rss_mb": round(rss / 2**20),
                        "managed_mb": round(managed / 2**20),
                        "tasks": tasks,
                    }
                )
            self._stop.wait(self.interval)

    def __enter__(self) -> Timeline:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        """Per worker: its peak sample, and the highest RSS (and the managed bytes then) under each kind."""
        for sample, kind in zip(self.samples, kinds_of(self.samples), strict=True):
            sample["kind"] = kind
        workers: dict[str, Any] = {}
        for sample in self.samples:
            worker = workers.setdefault(sample["worker"], {"peak": sample, "by_kind": {}})
            if sample["rss_mb"] > worker["peak"]["rss_mb"]:
                worker["peak"] = sample
            best = worker["by_kind"].get(sample["kind"])
            if best is None or sample["rss_mb"] > best["rss_mb"]:
                worker["by_kind"][sample["kind"]] = {key: sample[key] for key in ("s", "rss_mb", "managed_mb")}
        return workers


def measure_size(n: int, options: argparse.Namespace, work: Path, started: float) -> dict[str, Any]:
    from dask_clip import ImageTextPairDataset, SemanticDeduplicator, get_client

    folder = work / f"rows-{n}"
    synthetic = write_synthetic(folder, n, isotropic=True, pair_cosine=0.999, group_sizes=(2, 2))
    harness.log(started, f"{n:,} rows written ({synthetic.shards} shards)")
    size: dict[str, Any] = {"rows": n, "shards": synthetic.shards, "load_average_before": os.getloadavg()}
    with get_client(
        "cpu", n_workers=options.workers, threads_per_worker=1, memory_limit=MEMORY_LIMIT, dashboard_address=":0"
    ) as client:
        size["rss_mb_at_start"] = {w: round(rss / 2**20) for w, (rss, _, _) in client.run(_sample).items()}
        dataset = ImageTextPairDataset.from_webdataset(str(synthetic.dataset))
        with Timeline(client, options.interval) as timeline:
            began = time.perf_counter()
            SemanticDeduplicator(**DEDUP_OPTIONS)(dataset).save_metadata(
                str(folder / "decisions"), columns=["keep", "duplicate_of", "similarity"], overwrite=True
            )
            size["wall_s"] = time.perf_counter() - began
        client.cluster.close()
    size["load_average_after"] = os.getloadavg()
    size["workers"] = timeline.summary()
    size["timeline"] = timeline.samples
    harness.log(started, f"{n:,} rows deduplicated in {size['wall_s']:.0f} s")
    shutil.rmtree(folder)
    return size


def print_report(results: dict[str, Any]) -> None:
    rows = []
    for size in results["sizes"]:
        for worker, figures in sorted(size["workers"].items(), key=lambda item: -item[1]["peak"]["rss_mb"]):
            peak = figures["peak"]
            by_kind = "; ".join(
                f"{kind} {value['rss_mb']:,} ({value['managed_mb']:,})"
                for kind, value in sorted(figures["by_kind"].items(), key=lambda item: -item[1]["rss_mb"])
            )
            cells = [f"{peak['rss_mb']:,}", f"{peak['s']:.0f}", peak["kind"], by_kind]
            rows.append([f"{size['rows']:,}", f"{size['wall_s']:.0f}", worker.rsplit(":", 1)[-1], *cells])
    header = ["rows", "wall s", "worker", "peak RSS MiB", "at s", "running", "highest RSS by kind, MiB (managed)"]
    harness.print_table(header, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, action="append", help=f"N (repeatable; default {SIZES})")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster workers, one thread each")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--work-dir", default=None, help="where to write the shards (default: a temporary folder)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    options = parse_args(argv)
    logging.getLogger("distributed").setLevel(logging.ERROR)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": harness.machine(), "options": DEDUP_OPTIONS, "sizes": []}
    with harness.work_folder("dask_clip_dedup_memory_", options.work_dir) as work:
        for n in options.rows or SIZES:
            results["sizes"].append(measure_size(n, options, work, started))
    harness.finish("dedup_memory", results, started, print_report)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
