#!/usr/bin/env python
"""The ANN index at scale: build time, peak memory and size, then recall@10 against exact search and the
latency of one query, on a ``LocalCluster``.

``run(dataset_path, n, workers)`` measures a dataset folder of saved 768-d embeddings (``bench_scale.py``
calls it on its own synthetic vectors). Run standalone from the root of a checkout, it first writes its own::

    .venv/bin/python benchmarks/scale_index.py --n 100000
    .venv/bin/python benchmarks/scale_index.py --n 1000000 --folder /tmp/vectors-1m   # ~3 GB of parquet

Its vectors are a mixture of 1,000 clusters in a random 32-d subspace, plus isotropic noise, normalised: a
low intrinsic dimension, as image embeddings have (uniformly random 768-d vectors have no neighbourhoods:
their 10 nearest neighbours are hardly nearer than any other vector, and no index finds them short of
scanning everything). Queries are 1,000 rows drawn from the dataset, each moved by noise of norm 0.5
(cosine ~0.9 with its row). The exact top 10 is computed in numpy over every vector (``search``'s exact
path gives the same, as tests/test_index.py checks); recall@10 is the share of it the index returns.
Latency is ``OpenedIndex.top_k`` (faiss search, id map lookup, result frame) for one query at a time, the
index loaded once, also for other ``nprobe`` values. Peak RSS is ``VmHWM`` of the client (reset before the
build) and of each worker (fresh for the build).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 768
QUERIES = 1000
K = 10
ROWS_PER_SHARD = 10_000


def make_dataset(folder: Path, n: int, seed: int = 0) -> Path:
    """Shards of ``n`` clustered unit ``float32`` 768-d vectors (``key``, ``image_embedding``, empty tars), their
    embedding column recorded as a dask_clip derived column, as a saved embedding run leaves it."""
    from dask_clip.provenance import METADATA_KEY, FileRecords, ids_digest

    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, 32)))[0].T  # (32, 768), orthonormal rows
    centres = rng.standard_normal((1000, 32))
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        count = min(ROWS_PER_SHARD, n - start)
        latent = centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, 32))
        vectors = latent @ basis
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors += 0.5 * rng.standard_normal((count, DIM)) / np.sqrt(DIM)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keys = pa.array([f"{start + i:09d}" for i in range(count)])
        column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), DIM)
        record = {"operation": {"function": "scale_index.make_dataset", "seed": seed, "n": n}}
        records = FileRecords("key", {"rows": count, "ids": ids_digest(keys)}, {"image_embedding": record})
        table = pa.table({"key": keys, "image_embedding": column})
        pq.write_table(
            table.replace_schema_metadata({METADATA_KEY: records.to_json()}), folder / f"{shard:05d}.parquet"
        )
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            archive.addfile(tarfile.TarInfo("empty.txt"), io.BytesIO(b""))
    return folder


def all_vectors(dataset: Any) -> np.ndarray:
    """Every row's unit vector, ``float32 (N, D)`` in global row order (NaN rows where there is none)."""
    from dask_clip.columns import embeddings_to_numpy

    parts = []
    for shard in dataset.shards:
        column = pq.read_table(shard.parquet_url, columns=["image_embedding"]).column(0)
        parts.append(embeddings_to_numpy(column.to_pandas(types_mapper=pd.ArrowDtype)))
    vectors = np.concatenate(parts)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top_k(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """``int64 (Q, k)`` global row numbers of the ``k`` best cosines of each query, scanning in blocks."""
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(vectors), 100_000):
        block = np.nan_to_num(vectors[start : start + 100_000], nan=-2.0)
        scores = queries @ block.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        merged_scores = np.concatenate([best_scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_rows = np.concatenate([best_rows, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :k]
        best_scores, best_rows = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged_rows, keep, 1)
    return best_rows


def peak_rss_mb() -> float:
    """This process's peak resident memory (``VmHWM``) in MB."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current resident memory (Linux: ``clear_refs`` 5)."""
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")


def cpu_flags() -> list[str]:
    """``lscpu``'s SIMD flags of interest (AVX2, AVX-512, bf16, AMX)."""
    output = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in output.splitlines() if line.startswith("Flags")), [])
    return sorted(flag for flag in flags if flag.startswith(("avx", "amx")) or "bf16" in flag)


def latency_ms(opened: Any, queries: np.ndarray, nprobe: int | None) -> dict[str, float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        opened.top_k(query, K, nprobe)
        times.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def recall_at_k(opened: Any, queries: np.ndarray, truth: np.ndarray, nprobe: int | None) -> float:
    from dask_clip import ann

    _, labels = ann.search(opened.index, queries, K, nprobe or opened.nprobe)
    return float(np.mean([len(set(found) & set(expected)) / K for found, expected in zip(labels, truth, strict=True)]))


def run(dataset_path: str, n: int, workers: int) -> dict[str, Any]:
    """Build an index of ``dataset_path``'s ``image_embedding`` (``n`` rows) on ``workers`` workers and measure it."""
    from dask_clip import ImageTextPairDataset, get_client

    started = time.perf_counter()
    index_path = tempfile.mkdtemp(prefix="scale-index-", dir=str(Path(dataset_path).parent))
    results: dict[str, Any] = {"n": n, "workers": workers, "lscpu_flags": cpu_flags(), "machine": harness.machine()}
    try:
        with get_client("cpu", n_workers=workers, threads_per_worker=1, dashboard_address=":0") as client:
            dataset = ImageTextPairDataset.from_webdataset(dataset_path)
            reset_peak_rss()
            build_started = time.perf_counter()
            summary = dataset.build_index(index_path, overwrite=True)
            results["build_s"] = time.perf_counter() - build_started
            results["client_peak_rss_mb"] = peak_rss_mb()
            results["worker_peak_rss_mb"] = sorted(client.run(peak_rss_mb).values())
            harness.log(started, f"built in {results['build_s']:.1f}s")
            results["indexed"] = int(summary["indexed"].sum())
            results["index_bytes"] = sum(p.stat().st_size for p in Path(index_path).iterdir())
            opening = time.perf_counter()
            opened = dataset.open_index(index_path)
            results["open_s"] = time.perf_counter() - opening
            results["index"] = opened.manifest["index"]
        vectors = all_vectors(dataset)
        rng = np.random.default_rng(1)
        rows = rng.choice(np.flatnonzero(np.isfinite(vectors[:, 0])), QUERIES, replace=False)
        queries = vectors[rows] + 0.5 * rng.standard_normal((QUERIES, vectors.shape[1])) / np.sqrt(vectors.shape[1])
        queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        truth = exact_top_k(vectors, queries, K)
        del vectors
        harness.log(started, "exact top 10 computed")
        default = opened.nprobe
        results["sweep"] = [
            {
                "nprobe": nprobe,
                "recall_at_10": recall_at_k(opened, queries, truth, nprobe),
                **latency_ms(opened, queries, nprobe),
            }
            for nprobe in sorted({max(1, default // 4), max(1, default // 2), default, default * 2})
        ]
        chosen = next(point for point in results["sweep"] if point["nprobe"] == default)
        results.update(recall_at_10=chosen["recall_at_10"], p50_ms=chosen["p50_ms"], p99_ms=chosen["p99_ms"])
    finally:
        shutil.rmtree(index_path, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    return results


def print_table(results: dict[str, Any]) -> None:
    workers = [round(mb) for mb in results["worker_peak_rss_mb"]]
    print(
        f"n={results['n']:,} workers={results['workers']} index={results['index']['key']}: "
        f"build {results['build_s']:.1f}s, peak RSS client {results['client_peak_rss_mb']:.0f} MB, "
        f"workers {workers} MB, index {results['index_bytes'] / 2**20:.0f} MiB, open {results['open_s']:.1f}s"
    )
    print(f"{'nprobe':>7} {'recall@10':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for point in results["sweep"]:
        print(f"{point['nprobe']:>7} {point['recall_at_10']:>10.4f} {point['p50_ms']:>8.2f} {point['p99_ms']:>8.2f}")
    load = (results["machine"]["load_average_start"], results["load_average_end"])
    print(f"lscpu: {' '.join(results['lscpu_flags'])}; load average {load[0]} -> {load[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors to index")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=None, help="where to write the vectors (default: a temporary folder)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="scale-index-vectors-"))
    if not any(folder.glob("*.parquet")):
        make_dataset(folder, args.n)
    results = run(str(folder), args.n, args.workers)
    print_table(results)
    harness.write_results(f"scale_index-{args.n}", results)


if __name__ == "__main__":
    main()
