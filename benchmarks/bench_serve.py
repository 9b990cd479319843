#!/usr/bin/env python
"""``dask-clip serve`` under load: search and thumbnail latency, errors and the server's memory at 1, 8 and 32
concurrent clients, over loopback.

Run from the root of a checkout (``.venv/bin/python benchmarks/bench_serve.py --n 100000``). It writes a dataset
of ``n`` rows first: shards of 10,000 rows, each a parquet of ``key``, ``caption`` and synthetic 512-d
``image_embedding`` vectors (a mixture of 1,000 clusters, as ``scale_index.py`` makes) recorded as embedded by a
random-weight ViT-B/32-shaped CLIP (``testing.save_random_clip_model``: real compute per text query), and a real
tar holding a JPEG (a scikit-image photo, 320 px on its longest side, ``--image-side``) for every row.
``build_index`` indexes it. Then it starts ``dask-clip serve DIR --index INDEX`` (one Dask worker) and, for each
concurrency, runs three scenarios of ``--seconds`` each with that many clients (httpx, asyncio), each client
sending one request after another:

- search: ``GET /api/search?text=...&k=20``, every text distinct (``a photo of <word> <n>``);
- thumbnails: ``GET /thumb/{stem}/{key}``, every key distinct over the whole run, in random order across all
  shards: uncached thumbnails read from the tars. The first request for each tar is counted apart ("first of a
  tar"): a server that cannot use the recorded image locations reads that tar's headers then;
- cached thumbnails: ``GET /thumb/{stem}/{key}`` of keys the thumbnail scenario at one client asked for already,
  in random order: the server's thumbnail cache answers.

The dataset's image locations are recorded (``LocateImages``, as ``dask-clip locate`` does) before the index is
built. ``--baseline CHECKOUT`` also starts a server from another checkout (its ``PYTHONPATH``) on the same data, and
each scenario runs against the baseline and then this checkout, so the two meet the same load on the machine.
Each server keeps its thumbnails under a fresh ``XDG_CACHE_HOME`` in the run's folder (no hits left by an earlier run).
``--folder DIR`` keeps the dataset and index there and reuses them on the next run.

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


def write_dataset(folder: Path, n: int, model_dir: str, image_side: int = IMAGE_SIDE, seed: int = 0) -> None:
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
        image.thumbnail((image_side, image_side))
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


def locate_and_index(folder: Path, index: Path) -> tuple[float, float]:
    """Record the image locations (``LocateImages``), then ``build_index`` of the dataset into ``index``, on a
    2-worker ``LocalCluster``; seconds each took."""
    from dask_clip import ImageTextPairDataset, get_client
    from dask_clip.ops.locate import locate_images

    with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
        started = time.perf_counter()
        locate_images(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
        located = time.perf_counter()
        ImageTextPairDataset.from_webdataset(str(folder)).build_index(str(index))
        indexed = time.perf_counter()
        client.cluster.close()
    return located - started, indexed - located


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(folder: Path, index: Path, port: int, pythonpath: str, cache_home: Path) -> subprocess.Popen[str]:
    """``dask-clip serve`` from the checkout at ``pythonpath`` on ``port`` (thumbnails cached under
    ``cache_home``), returned once it answers ``/api/overview``."""
    import httpx

    command = [sys.executable, "-m", "dask_clip.cli", "serve", str(folder), "--index", str(index)]
    env = {**os.environ, "PYTHONPATH": pythonpath, "XDG_CACHE_HOME": str(cache_home), "TMPDIR": str(cache_home)}
    cache_home.mkdir(parents=True, exist_ok=True)
    # run from the checkout: ``python -m`` puts the working directory first on sys.path, before PYTHONPATH
    server = subprocess.Popen([*command, "--port", str(port), "--n-workers", "1"], text=True, env=env, cwd=pythonpath)
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


def prepare(n: int, image_side: int, folder: Path, begun: float) -> dict[str, Any]:
    """The dataset (``folder/shards``) and its index (``folder/index``), written unless an earlier run left them
    (``folder/ready``); what writing them took."""
    from dask_clip import testing

    dataset, index, ready = folder / "shards", folder / "index", folder / "ready"
    if ready.exists() and int(ready.read_text().split()[0]) == n:
        harness.log(begun, f"reusing the {n} rows and index in {folder}")
        return {"reused": True}
    model_dir = testing.save_tokenizer_for_clip_model(testing.save_random_clip_model(folder / "model", "vit-b-32"))
    started = time.perf_counter()
    write_dataset(dataset, n, str(model_dir), image_side)
    written_s = time.perf_counter() - started
    harness.log(begun, f"wrote {n} rows in {written_s:.0f} s; locating the images and building the index")
    locate_s, index_s = locate_and_index(dataset, index)
    ready.write_text(f"{n}\n")
    return {"write_s": round(written_s, 1), "locate_s": round(locate_s, 1), "index_s": round(index_s, 1)}


class Server:
    """One ``dask-clip serve`` started from the checkout at ``pythonpath``, with its own thumbnail cache, the
    requests left for it (every thumbnail key once, in the same random order for every server) and its results."""

    def __init__(self, n: int, folder: Path, label: str, pythonpath: str) -> None:
        self.label, self.pythonpath = label, pythonpath
        commit = subprocess.run(
            ["git", "-C", pythonpath, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
        self.commit = commit.stdout.strip()
        self.cache_home = Path(tempfile.mkdtemp(prefix="cache-", dir=folder))
        port = free_port()
        started = time.perf_counter()
        self.process = start_server(folder / "shards", folder / "index", port, pythonpath, self.cache_home)
        self.startup_s = time.perf_counter() - started
        self.base = f"http://127.0.0.1:{port}"
        addresses = [
            (f"{shard:05d}", f"{shard:05d}{row:05d}")
            for shard in range(-(-n // ROWS_PER_SHARD))
            for row in range(min(ROWS_PER_SHARD, n - shard * ROWS_PER_SHARD))
        ]
        random.Random(0).shuffle(addresses)
        self.thumbnails = iter(f"/thumb/{stem}/{key}" for stem, key in addresses)
        self.counter = iter(range(10**9))
        self.texts = (f"/api/search?text=a+photo+of+a+{WORDS[i % len(WORDS)]}+{i}&k=20" for i in self.counter)
        self.seen_stems: set[str] = set()
        self.cached: list[str] = []
        self.rows: list[dict[str, Any]] = []
        asyncio.run(load(self.base, self.texts, 1, 2))  # the text model loads and the index opens on the first query

    def measure(self, scenario: str, clients: int, seconds: float) -> dict[str, Any]:
        if scenario == "search":
            paths: Any = self.texts
        elif scenario == "thumbnail":
            paths = self.thumbnails
        else:
            chooser = random.Random(clients)
            paths = iter(chooser.choice(self.cached) for _ in self.counter)
        load_average = os.getloadavg()[0]
        with MemorySampler(self.process.pid) as memory:
            results = asyncio.run(load(self.base, paths, clients, seconds))
        row = {"scenario": scenario, "clients": clients, **summary(results, seconds), **memory.peak}
        row["load_average"] = round(load_average, 1)
        if scenario == "thumbnail":
            first = [
                r
                for r in results
                if (stem := r[2].split("/")[2]) not in self.seen_stems and not self.seen_stems.add(stem)
            ]
            row["first_of_a_tar"] = summary(first, seconds)
            row["others"] = summary([r for r in results if r not in first], seconds)
            self.cached = self.cached or [path for _, status, path in results if status == 200]
        self.rows.append(row)
        return row

    def stop(self) -> dict[str, Any]:
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.cache_home, ignore_errors=True)
        return {
            "label": self.label,
            "pythonpath": self.pythonpath,
            "commit": self.commit,
            "server_startup_s": round(self.startup_s, 1),
            "rows": self.rows,
        }


def measure(n: int, seconds: float, folder: Path, checkouts: list[tuple[str, str]], begun: float) -> list[Any]:
    """Every scenario at every concurrency against one ``dask-clip serve`` per checkout, all started first; each
    scenario runs against each server in turn, so that they meet the same load on the machine."""
    servers: list[Server] = []
    try:
        for label, pythonpath in checkouts:
            servers.append(Server(n, folder, label, pythonpath))
        for clients in CONCURRENCY:
            for scenario in ("search", "thumbnail", "cached thumbnail"):
                for server in servers:
                    row = server.measure(scenario, clients, seconds)
                    harness.log(begun, f"{server.label}: {scenario} x{clients}: {row}")
    finally:
        stopped = [server.stop() for server in servers]
    return stopped


def run(n: int, seconds: float, image_side: int, folder: Path, baseline: str | None) -> dict[str, Any]:
    begun = time.perf_counter()
    prepared = prepare(n, image_side, folder, begun)
    checkouts = [("baseline", baseline)] if baseline else []
    checkouts.append(("this checkout", str(harness.ROOT)))
    dataset = folder / "shards"
    return {
        "n": n,
        "dim": DIM,
        "seconds_per_scenario": seconds,
        "image_side": image_side,
        "tar_bytes": sum(path.stat().st_size for path in dataset.glob("*.tar")),
        **prepared,
        "index_files": sorted(path.name for path in (folder / "index").iterdir()),
        "load_average_at_start": os.getloadavg(),
        "servers": measure(n, seconds, folder, checkouts, begun),
    }


def markdown(result: dict[str, Any]) -> str:
    machine = result["machine"]
    lines = [
        f"`dask-clip serve` on {result['n']:,} rows ({result['dim']}-d vectors, index), "
        f"{result['seconds_per_scenario']:g} s per scenario; {machine['cpu']}, {machine['cores']} "
        f"cores, avx2 {machine['avx2']}, avx512_bf16 {machine['avx512_bf16']}; load average at the start "
        f"{result['load_average_at_start'][0]:.1f}",
    ]
    for server in result["servers"]:
        lines += [
            "",
            f"{server['label']} ({server['pythonpath']} at {server['commit']}), "
            f"started in {server['server_startup_s']} s:",
            "",
            "| scenario | clients | requests/s | p50 ms | p99 ms | errors | server RSS MB | worker RSS MB | load |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in server["rows"]:
            lines.append(
                f"| {row['scenario']} | {row['clients']} | {row['per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
                f"{row['errors']} | {row['server_mb']:.0f} | {row['workers_mb']:.0f} | {row['load_average']} |"
            )
        for row in server["rows"]:
            first = row.get("first_of_a_tar", {})
            if first.get("requests"):
                lines.append(
                    f"\nFirst thumbnail of each tar at {row['clients']} clients: {first['requests']} requests, "
                    f"p50 {first['p50_ms']} ms, p99 {first['p99_ms']} ms."
                )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows (vectors and images)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each scenario")
    parser.add_argument(
        "--folder", default=None, help="where to write the dataset, kept for the next run (default: a temporary one)"
    )
    parser.add_argument("--image-side", type=int, default=IMAGE_SIDE, help="longest side of the JPEGs in the tars")
    parser.add_argument("--baseline", default=None, help="a checkout to measure first, on the same data")
    args = parser.parse_args()
    folder = Path(args.folder or tempfile.mkdtemp(prefix="bench-serve-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        baseline = str(Path(args.baseline).resolve()) if args.baseline else None
        result = run(args.n, args.seconds, args.image_side, folder, baseline)
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
