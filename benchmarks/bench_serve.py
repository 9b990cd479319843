#!/usr/bin/env python
"""``dask-clip serve`` under load: search and thumbnail latency, errors and the server's memory at 1, 8 and 32
concurrent clients, over loopback.

Run from the root of a checkout (``.venv/bin/python benchmarks/bench_serve.py --n 100000``). It writes a dataset
of ``n`` rows first: shards of 10,000 rows, each a parquet of ``key``, ``caption`` and synthetic 512-d
``image_embedding`` vectors (a mixture of 1,000 clusters, as ``scale_index.py`` makes) recorded as embedded by a
random-weight ViT-B/32-shaped CLIP (``testing.save_random_clip_model``: real compute per text query), and a real
tar holding a JPEG (a scikit-image photo, 320 px on its longest side) for every row. ``build_index`` indexes it.
Then it starts ``dask-clip serve DIR --index INDEX`` (one Dask worker) and, for each concurrency, runs two
scenarios of ``--seconds`` each with that many clients (httpx, asyncio), each client sending one request after
another:

- search: ``GET /api/search?text=...&k=20``, every text distinct (``a photo of <word> <n>``);
- thumbnails: ``GET /thumb/{stem}/{key}``, every key distinct over the whole run, in random order across all
  shards. The server keeps no thumbnails; it keeps each tar's image locations after reading its headers once,
  so the first request for each tar reads its headers as well ("first of a tar", counted apart).

Latencies are measured by the clients (request sent to body read). The server's RSS (its process and its
Dask worker, apart) is sampled every 0.2 s; the peak of each scenario is reported. The clients share the
machine's cores with the server. Results: ``benchmarks/results/bench_serve-<time>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DIM = 512
ROWS_PER_SHARD = 10_000
IMAGE_SIDE = 320
CONCURRENCY = (1, 8, 32)
WORDS = [
    "dog",
    "cat",
    "car",
    "tree",
    "house",
    "beach",
    "mountain",
    "city",
    "flower",
    "bird",
    "boat",
    "horse",
    "food",
    "street",
    "sky",
    "river",
]


def write_dataset(folder: Path, n: int, model_dir: str, seed: int = 0) -> None:
    """Shards of ``n`` rows (parquet + real tar of JPEGs), the vectors recorded as ``model_dir``'s embeddings."""
    from PIL import Image

    from dask_clip import testing
    from dask_clip.io.vectors import to_disk
    from dask_clip.models.clip import describe_text_model, model_identity
    from dask_clip.provenance import METADATA_KEY, FileRecords, ids_digest

    described = describe_text_model(model_dir)
    operation = {
        "function": "bench_serve.write_dataset",
        **model_identity(model_dir, described.family),
        "embedding_dim": DIM,
    }
    images = []
    for name, pixels in testing.sample_photos().items():
        image = Image.fromarray(pixels).convert("RGB")
        image.thumbnail((IMAGE_SIDE, IMAGE_SIDE))
        images.append((name, testing.encode_jpeg(np.asarray(image), quality=85)))
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, 32)))[0].T
    centres = rng.standard_normal((1000, 32))
    folder.mkdir(parents=True, exist_ok=True)
    for shard, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        count = min(ROWS_PER_SHARD, n - start)
        vectors = centres[rng.integers(0, len(centres), count)] @ basis + rng.standard_normal((count, 32)) @ basis
        vectors += 0.5 * rng.standard_normal((count, DIM)) / np.sqrt(DIM)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        keys = [f"{shard:05d}{row:05d}" for row in range(count)]
        chosen = [images[i] for i in rng.integers(0, len(images), count)]
        table = pa.table(
            {
                "key": pa.array(keys),
                "caption": pa.array([f"a photo of {name}" for name, _ in chosen]),
                "image_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), DIM),
            }
        )
        table, layouts = to_disk(table, "list")
        records = FileRecords(
            "key",
            {"rows": count, "ids": ids_digest(table.column("key"))},
            {"image_embedding": {"operation": operation}},
            vectors=layouts,
        )
        metadata = {**(table.schema.metadata or {}), METADATA_KEY: records.to_json()}
        pq.write_table(table.replace_schema_metadata(metadata), folder / f"{shard:05d}.parquet")
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for key, (_, data) in zip(keys, chosen, strict=True):
                info = tarfile.TarInfo(f"{key}.jpg")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def build_index(folder: Path, index: Path) -> float:
    """``build_index`` of the dataset into ``index`` on a 2-worker ``LocalCluster``; seconds taken."""
    from dask_clip import ImageTextPairDataset, get_client

    started = time.perf_counter()
    with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        ImageTextPairDataset.from_webdataset(str(folder)).build_index(str(index))
        client.cluster.close()
    return time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, index: Path, port: int) -> subprocess.Popen[str]:
    """``dask-clip serve`` on ``port``, returned once it answers ``/api/overview``."""
    import httpx

    command = [sys.executable, "-m", "dask_clip.cli", "serve", str(folder), "--index", str(index)]
    server = subprocess.Popen([*command, "--port", str(port), "--n-workers", "1"], text=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"dask-clip serve exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/overview", timeout=60).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("dask-clip serve did not answer within 600 s")


class MemorySampler:
    """The peak RSS (MB) of the server process and, apart, of its descendants (the Dask worker), sampled every
    0.2 s in a thread between ``start`` and ``stop``."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak = {"server_mb": 0.0, "workers_mb": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                server = self.process.memory_info().rss
                workers = sum(child.memory_info().rss for child in self.process.children(recursive=True))
            except psutil.Error:
                break
            self.peak["server_mb"] = max(self.peak["server_mb"], server / 2**20)
            self.peak["workers_mb"] = max(self.peak["workers_mb"], workers / 2**20)
            self._stop.wait(0.2)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def load(base: str, paths: Any, clients: int, seconds: float) -> list[tuple[float, int, str]]:
    """``clients`` concurrent loops, each sending ``next(paths)`` until ``seconds`` have passed; returns
    ``(latency_ms, status, path)`` per request (status 0: no answer)."""
    import httpx

    results: list[tuple[float, int, str]] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:

        async def client() -> None:
            while time.monotonic() < deadline:
                path = next(paths)
                started = time.perf_counter()
                try:
                    status = (await http.get(path)).status_code
                except httpx.HTTPError:
                    status = 0
                results.append(((time.perf_counter() - started) * 1000, status, path))

        await asyncio.gather(*(client() for _ in range(clients)))
    return results


def summary(results: list[tuple[float, int, str]], seconds: float) -> dict[str, Any]:
    latencies = np.array([latency for latency, status, _ in results if status == 200])
    errors = [status for _, status, _ in results if status != 200]
    return {
        "requests": len(results),
        "per_s": round(len(results) / seconds, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 1) if len(latencies) else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 1) if len(latencies) else None,
        "errors": len(errors),
        "error_statuses": sorted(set(errors)),
    }


def run(n: int, seconds: float, folder: Path) -> dict[str, Any]:
    from dask_clip import testing

    begun = time.perf_counter()

    model_dir = testing.save_tokenizer_for_clip_model(testing.save_random_clip_model(folder / "model", "vit-b-32"))
    dataset, index = folder / "shards", folder / "index"
    started = time.perf_counter()
    write_dataset(dataset, n, str(model_dir))
    written_s = time.perf_counter() - started
    harness.log(begun, f"wrote {n} rows in {written_s:.0f} s; building the index")
    index_s = build_index(dataset, index)
    harness.log(begun, f"index built in {index_s:.0f} s; starting dask-clip serve")
    port = free_port()
    started = time.perf_counter()
    server = start_server(dataset, index, port)
    startup_s = time.perf_counter() - started
    base = f"http://127.0.0.1:{port}"
    addresses = [
        (f"{shard:05d}", f"{shard:05d}{row:05d}")
        for shard in range(-(-n // ROWS_PER_SHARD))
        for row in range(min(ROWS_PER_SHARD, n - shard * ROWS_PER_SHARD))
    ]
    random.Random(0).shuffle(addresses)
    thumbnails = iter(f"/thumb/{stem}/{key}" for stem, key in addresses)
    counter = iter(range(10**9))
    texts = (f"/api/search?text=a+photo+of+a+{WORDS[i % len(WORDS)]}+{i}&k=20" for i in counter)
    asyncio.run(load(base, texts, 1, 2))  # the text model loads and the index opens on the first query
    rows: list[dict[str, Any]] = []
    seen_stems: set[str] = set()
    try:
        for clients in CONCURRENCY:
            for scenario, paths in (("search", texts), ("thumbnail", thumbnails)):
                with MemorySampler(server.pid) as memory:
                    results = asyncio.run(load(base, paths, clients, seconds))
                row = {"scenario": scenario, "clients": clients, **summary(results, seconds), **memory.peak}
                if scenario == "thumbnail":
                    first = [
                        r
                        for r in results
                        if (stem := r[2].split("/")[2]) not in seen_stems and not seen_stems.add(stem)
                    ]
                    row["first_of_a_tar"] = summary(first, seconds)
                    row["others"] = summary([r for r in results if r not in first], seconds)
                rows.append(row)
                harness.log(begun, f"{scenario} x{clients}: {row}")
    finally:
        server.terminate()
        server.wait(timeout=60)
    return {
        "n": n,
        "dim": DIM,
        "seconds_per_scenario": seconds,
        "image_side": IMAGE_SIDE,
        "tar_bytes": sum(path.stat().st_size for path in dataset.glob("*.tar")),
        "write_s": round(written_s, 1),
        "index_s": round(index_s, 1),
        "index_files": sorted(path.name for path in index.iterdir()),
        "server_startup_s": round(startup_s, 1),
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"`dask-clip serve` on {result['n']:,} rows ({result['dim']}-d vectors, index), "
        f"{result['seconds_per_scenario']:g} s per scenario; {result['machine']['cpu']}, {result['machine']['cores']} "
        f"cores, avx2 {result['machine']['avx2']}, avx512_bf16 {result['machine']['avx512_bf16']}",
        "",
        "| scenario | clients | requests/s | p50 ms | p99 ms | errors | server RSS MB | worker RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['scenario']} | {row['clients']} | {row['per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['errors']} | {row['server_mb']:.0f} | {row['workers_mb']:.0f} |"
        )
    firsts = [row["first_of_a_tar"] for row in result["rows"] if row.get("first_of_a_tar", {}).get("requests")]
    for first in firsts:
        lines.append(
            f"\nFirst thumbnail of each tar (reads its headers): {first['requests']} requests, "
            f"p50 {first['p50_ms']} ms, p99 {first['p99_ms']} ms."
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows (vectors and images)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each scenario")
    parser.add_argument("--folder", default=None, help="where to write the dataset (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        result = run(args.n, args.seconds, folder)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    result["machine"] = harness.machine()
    text = markdown(result)
    harness.write_results("bench_serve", result).with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
