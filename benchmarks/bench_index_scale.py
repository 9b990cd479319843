#!/usr/bin/env python
"""dask_clip's ``build_index`` next to autofaiss's ``build_index`` on the same vectors, in one run: build time,
peak memory of every process, recall@10 against brute force and the latency of one query.

Two sets of ``--n`` unit 768-d vectors, written once as a dask_clip dataset (parquet shards of 10,000 rows), which
autofaiss reads too (its parquet input, column ``image_embedding``):

- ``clustered``: rows about 1,000 random topics (``synthetic_vectors.topic_rows``: cosine 0.7 to the topic);
- ``subspace``: ``scale_index.py``'s mixture of 1,000 clusters in a random 32-d subspace plus isotropic noise,
  of low intrinsic dimension.

The 1,000 queries are fresh draws of the same distribution (not rows of the index); the exact top 10 of each is
computed in numpy over every row as the shards are written, one shard in memory at a time. Each build, and then
each query session (open the index, recall@10 over the 1,000 queries in one batch, then one query at a time for the
latency), runs in a process of its own, which this one samples every 0.2 s with its descendants (the Dask workers):
peak ``VmHWM`` (resident, counting the pages of memory-mapped files the process touched), peak ``RssAnon`` (its own
memory: what it cannot give back) and peak ``RssFile`` (files' pages mapped). The process writing the vectors and
the exact top 10 reports its own ``VmHWM``. dask_clip's latency is ``OpenedIndex.top_k`` (faiss search, id lookup,
result frame) and the bare faiss search, at the index's default ``nprobe`` and at a third, two thirds and four
thirds of it (the recall/latency curve the default is chosen from); autofaiss's is its index's search with the
parameters it tuned (``index_infos.json``); p50 and p99 of the 1,000. autofaiss is given an index budget
(``--autofaiss-index-memory``) and the memory its build may use (``--autofaiss-memory-available``), and picks its
index and training sample from them, or is told which index to build (``--autofaiss-index-key``; ``ours``: the one
dask_clip's build chose, so that the two builds of the same index compare, where autofaiss can build it: not ``SQ8``).

Run from the root of a checkout (autofaiss in a virtualenv of its own: it pins other numpy and faiss versions)::

    python3.11 -m venv /work/scratch/venv-autofaiss && /work/scratch/venv-autofaiss/bin/pip install \\
        autofaiss==2.18.0 faiss-cpu==1.7.4 "pyarrow<17" psutil  # faiss 1.15 fails autofaiss's OPQ (OPQMatrix's
        # arguments); faiss-cpu 1.7.4 has wheels up to Python 3.11
    .venv/bin/python benchmarks/bench_index_scale.py --n 1000000 --folder /work/scratch/index-scale \\
        --autofaiss-python /work/scratch/venv-autofaiss/bin/python \\
        --autofaiss-index-memory 3G --autofaiss-memory-available 4G  # every process under 4 GB

About ``--n`` x 768 x 4 bytes of parquet per set, plus the index being built (its parts and its lists: as much
again with ``Flat`` codes, half with ``SQ8``); a set's folder is removed once measured unless ``--keep``
(without it, a re-run writes the vectors again, and the indexes are removed too): 15 GB per set at 5M.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

DIM = 768
ROWS_PER_SHARD = 10_000
QUERIES = 1000
K = 10
TOPICS = 1000
SETS = ("clustered", "subspace")


class Generator:
    """Draws of one set's distribution: ``rows(rng, count)`` gives ``float32 (count, DIM)`` unit vectors."""

    def __init__(self, name: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.name = name
        if name == "clustered":
            self.topics = rng.standard_normal((TOPICS, DIM)).astype(np.float32)
            self.topics /= np.linalg.norm(self.topics, axis=1, keepdims=True)
        else:
            self.basis = np.linalg.qr(rng.standard_normal((DIM, 32)))[0].T.astype(np.float32)  # (32, 768)
            self.centres = rng.standard_normal((TOPICS, 32)).astype(np.float32)

    def rows(self, rng: np.random.Generator, count: int) -> np.ndarray:
        if self.name == "clustered":
            import synthetic_vectors

            return synthetic_vectors.topic_rows(rng, self.topics, count)
        latent = self.centres[rng.integers(0, TOPICS, count)] + rng.standard_normal((count, 32), dtype=np.float32)
        vectors = latent @ self.basis
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors += 0.5 * rng.standard_normal((count, DIM), dtype=np.float32) / np.float32(math.sqrt(DIM))
        return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_set(folder: Path, name: str, n: int) -> None:
    """``folder/dataset`` (parquet + empty tars), ``queries.npy`` and ``truth.npy`` (``int64 (Q, K)`` exact top 10
    by global row number, merged shard by shard). Skipped when ``truth.npy`` exists."""
    if (folder / "truth.npy").exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "dataset").mkdir(parents=True)
    generator = Generator(name, seed=0)
    queries = generator.rows(np.random.default_rng(2), QUERIES)
    best = TopK(queries)
    rng = np.random.default_rng(1)
    for shard, start in enumerate(range(0, n, ROWS_PER_SHARD)):
        vectors = generator.rows(rng, min(ROWS_PER_SHARD, n - start))
        write_shard(folder / "dataset", shard, vectors, {"function": "bench_index_scale.write_set", "set": name})
        best.add(vectors, start)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "truth.npy", best.rows)


def write_shard(folder: Path, shard: int, vectors: np.ndarray, operation: dict[str, Any]) -> None:
    """``NNNNN.parquet`` (``key``, ``image_embedding`` recorded as made by ``operation``, as an embedding run
    leaves it) and an empty ``NNNNN.tar``."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import synthetic_vectors

    from dask_clip.provenance import METADATA_KEY, FileRecords, ids_digest

    keys = pa.array([synthetic_vectors.key_of(shard, row) for row in range(len(vectors))], type=pa.string())
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM)
    records = FileRecords(
        "key", {"rows": len(vectors), "ids": ids_digest(keys)}, {"image_embedding": {"operation": operation}}
    )
    table = pa.table({"key": keys, "image_embedding": column})
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: records.to_json()}), folder / f"{shard:05d}.parquet")
    with tarfile.open(folder / f"{shard:05d}.tar", "w"):
        pass


class TopK:
    """The exact ``K`` best rows of each unit ``float32 (Q, D)`` query by inner product, over blocks of rows
    given in order (``add``): ``rows`` is ``int64 (Q, K)`` global row numbers, best first."""

    def __init__(self, queries: np.ndarray) -> None:
        self.queries = queries
        self.scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
        self.rows = np.zeros((len(queries), K), dtype=np.int64)

    def add(self, block: np.ndarray, start: int) -> None:
        """Rows ``start ...`` are ``block`` (``float32 (B, D)``)."""
        scores = self.queries @ block.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        merged_scores = np.concatenate([self.scores, np.take_along_axis(scores, top, 1)], axis=1)
        merged_rows = np.concatenate([self.rows, top + start], axis=1)
        keep = np.argsort(-merged_scores, axis=1)[:, :K]
        self.scores, self.rows = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged_rows, keep, 1)


def status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1])


FIELDS = {"hwm": "VmHWM", "anon": "RssAnon", "file": "RssFile"}


def run_sampled(command: list[str]) -> dict[str, Any]:
    """Run ``command``; its JSON (last line of stdout), its wall time, and the peak ``VmHWM``, ``RssAnon`` and
    ``RssFile`` (MB) of it (``main``) and of its largest descendant (``largest_child``) by ``VmHWM``."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peaks: dict[int, dict[str, int]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for pid in tree:
                try:
                    now = {key: status_kb(pid, field) for key, field in FIELDS.items()}
                except (OSError, StopIteration):
                    continue
                peak = peaks.setdefault(pid, dict.fromkeys(FIELDS, 0))
                peak.update({key: max(peak[key], value) for key, value in now.items()})
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"{command[:4]}: exit {process.returncode}")
    main = peaks.get(process.pid, dict.fromkeys(FIELDS, 0))
    children = [peak for pid, peak in peaks.items() if pid != process.pid]
    largest = max(children, key=lambda peak: peak["hwm"], default=dict.fromkeys(FIELDS, 0))
    return {
        **json.loads(output.strip().splitlines()[-1]),
        "wall_s": time.perf_counter() - started,
        "main_peak_mb": {key: value / 1024 for key, value in main.items()},
        "largest_child_peak_mb": {key: value / 1024 for key, value in largest.items()},
    }


def child_ours_build(folder: Path, index: Path, options: dict[str, Any]) -> dict[str, Any]:
    from dask_clip import ImageTextPairDataset, get_client

    with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0"):
        dataset = ImageTextPairDataset.from_webdataset(str(folder / "dataset"))
        started = time.perf_counter()
        dataset.build_index(str(index))
        seconds = time.perf_counter() - started
    manifest = json.loads((index / "index.json").read_text())
    return {"build_s": seconds, "index": manifest["index"]["key"], "nprobe": manifest["index"]["nprobe"]}


def child_ours_query(folder: Path, index: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Recall@10 and latency at the index's default ``nprobe``, and the same at a third, two thirds and four thirds
    of it (``curve``: the trade-off the default is chosen from)."""
    from dask_clip import ImageTextPairDataset, ann

    dataset = ImageTextPairDataset.from_webdataset(str(folder / "dataset"))
    opened = dataset.open_index(str(index))
    queries = np.load(folder / "queries.npy")
    truth = np.load(folder / "truth.npy")
    nlist = opened.manifest["index"]["nlist"]
    curve = {}
    for nprobe in sorted({min(nlist, max(1, round(opened.nprobe * share / 3))) for share in (1, 2, 3, 4)}):
        curve[nprobe] = {
            "recall_at_10": recall(ann.search(opened.index, queries, K, nprobe)[1], truth),
            **latency_ms(lambda query, nprobe=nprobe: opened.top_k(query, K, nprobe), queries),
            **latency_ms(
                lambda query, nprobe=nprobe: ann.search(opened.index, query[None, :], K, nprobe), queries, "faiss_"
            ),
            "load_average": os.getloadavg(),
        }
    return {
        **curve[opened.nprobe],
        "lists_on_disk": ann.lists_on_disk(opened.index),
        "nprobe": opened.nprobe,
        "curve": curve,
    }


def child_autofaiss_build(folder: Path, index: Path, options: dict[str, Any]) -> dict[str, Any]:
    from autofaiss import build_index

    index.mkdir()
    started = time.perf_counter()
    _, infos = build_index(
        embeddings=str(folder / "dataset"),
        file_format="parquet",
        embedding_column_name="image_embedding",
        index_path=str(index / "knn.index"),
        index_infos_path=str(index / "index_infos.json"),
        max_index_memory_usage=options["autofaiss_index_memory"],
        current_memory_available=options["autofaiss_memory_available"],
        index_key=options["autofaiss_index_key"],
        metric_type="ip",
        nb_cores=2,
        verbose=20,  # INFO: its stages and their times, in the log
    )
    if infos is None:
        raise RuntimeError("autofaiss built no index (see its log above)")
    return {
        "build_s": time.perf_counter() - started,
        "index": infos["index_key"],
        "param": infos["index_param"],
        "infos": infos,
        "options": options,
    }


def autofaiss_can_build(index_key: str | None) -> bool:
    """Whether autofaiss 2.18 can build ``index_key`` (``None``: its own choice) for inner product: it tunes the
    search parameters of its own choices (``OPQ..,IVF..[_HNSW..],PQ..``), ``HNSW..``, ``IVF..,Flat`` and ``Flat``
    only, and stops on the others after building them (``IVF4472,SQ8``: "we don't have heuristics for that kind")."""
    return index_key is None or bool(
        re.fullmatch(r"OPQ\d+_\d+,IVF\d+(_HNSW\d+)?,PQ\d+(x\d+)?|HNSW\d+|IVF\d+,Flat|Flat", index_key)
    )


def child_autofaiss_query(folder: Path, index: Path, options: dict[str, Any]) -> dict[str, Any]:
    import faiss

    loaded = faiss.read_index(str(index / "knn.index"))
    faiss.ParameterSpace().set_index_parameters(
        loaded, json.loads((index / "index_infos.json").read_text())["index_param"]
    )
    queries = np.load(folder / "queries.npy")
    _, labels = loaded.search(queries, K)
    return {
        "recall_at_10": recall(labels, np.load(folder / "truth.npy")),
        **latency_ms(lambda query: loaded.search(query[None, :], K), queries),
    }


def recall(labels: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(found) & set(expected)) / K for found, expected in zip(labels, truth, strict=True)]))


def latency_ms(search: Any, queries: np.ndarray, prefix: str = "") -> dict[str, float]:
    """``p50_ms`` and ``p99_ms`` (named after ``prefix``) of ``search(query)``, one query at a time."""
    times = []
    for query in queries:
        started = time.perf_counter()
        search(query)
        times.append((time.perf_counter() - started) * 1000)
    return {f"p50_{prefix}ms": float(np.percentile(times, 50)), f"p99_{prefix}ms": float(np.percentile(times, 99))}


CHILDREN = {
    "ours-build": child_ours_build,
    "ours-query": child_ours_query,
    "autofaiss-build": child_autofaiss_build,
    "autofaiss-query": child_autofaiss_query,
}


def compare(folder: Path, autofaiss_python: str, only: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """Both tools' build then query session on the set in ``folder``, each in a process of its own (``options``
    passed to each); the indexes are removed once measured unless ``options["keep"]``."""
    results: dict[str, Any] = {}
    for tool, python in (("ours", sys.executable), ("autofaiss", autofaiss_python)):
        if tool not in only:
            continue
        if tool == "autofaiss" and options["autofaiss_index_key"] == "ours":
            if "build" not in results.get("ours", {}):
                raise SystemExit("--autofaiss-index-key ours needs dask_clip's build first (--tools ours,autofaiss)")
            options = {**options, "autofaiss_index_key": results["ours"]["build"]["index"]}
        if tool == "autofaiss" and not autofaiss_can_build(options["autofaiss_index_key"]):
            results[tool] = {"error": f"autofaiss cannot build {options['autofaiss_index_key']}"}
            print(tool, json.dumps(results[tool]), flush=True)
            continue
        index = folder / f"index-{tool}"
        shutil.rmtree(index, ignore_errors=True)
        run = [python, __file__, "--child"]
        started_at = {"load_average": os.getloadavg(), "time": time.strftime("%H:%M:%S", time.gmtime())}
        print(tool, "build starts", json.dumps(started_at), flush=True)
        try:
            build = run_sampled([*run, f"{tool}-build", str(folder), str(index), json.dumps(options)])
        except RuntimeError as error:  # autofaiss out of memory or refusing: said, and the other tool still runs
            results[tool] = {"error": str(error), "load_average": os.getloadavg()}
            print(tool, json.dumps(results[tool]), flush=True)
            shutil.rmtree(index, ignore_errors=True)
            continue
        query = run_sampled([*run, f"{tool}-query", str(folder), str(index), json.dumps(options)])
        sizes = {path.name: path.stat().st_size / 2**20 for path in index.rglob("*") if path.is_file()}
        results[tool] = {
            "build": build,
            "query": query,
            "index_mb": sum(sizes.values()),
            "files_mb": sizes,
            "load_average_start": started_at["load_average"],
            "load_average": os.getloadavg(),
        }
        print(tool, json.dumps(results[tool]), flush=True)
        if not options["keep"]:
            shutil.rmtree(index)
    return results


def print_table(n: int, results: dict[str, dict[str, Any]]) -> None:
    import harness

    rows = []
    for name, by_tool in results.items():
        for tool, result in by_tool.items():
            if tool == "vectors_and_truth":
                continue
            if "error" in result:
                rows.append([name, tool, result["error"], *["-"] * 7])
                continue
            build, query = result["build"], result["query"]
            peak = [build["main_peak_mb"], build["largest_child_peak_mb"], query["main_peak_mb"]]
            rows.append(
                [
                    name,
                    tool,
                    f"{build['index']}",
                    f"{build['build_s']:.0f}",
                    " / ".join(f"{p['hwm'] / 1024:.2f}" for p in peak),
                    " / ".join(f"{p['anon'] / 1024:.2f}" for p in peak),
                    f"{result['index_mb'] / 1024:.2f}",
                    f"{query['recall_at_10']:.3f}",
                    f"{query['p50_ms']:.1f}" + (f" ({query['p50_faiss_ms']:.1f})" if "p50_faiss_ms" in query else ""),
                    f"{query['p99_ms']:.1f}",
                ]
            )
    header = ["set", "tool", "index", "build s", "VmHWM GB b/w/q", "RssAnon GB b/w/q", "GiB", "recall@10"]
    header += ["p50 ms", "p99"]
    print(f"n={n:,}; b: build process, w: its largest worker, q: query process")
    harness.print_table(header, rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # a build or query session, in its own process
        _, _, kind, folder, index, options = sys.argv
        print(json.dumps(CHILDREN[kind](Path(folder), Path(index), json.loads(options))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000, help="vectors per set")
    parser.add_argument("--folder", required=True, help="where the vectors and indexes go (kept for a re-run)")
    parser.add_argument("--autofaiss-python", required=True, help="the python of a virtualenv with autofaiss")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--tools", default="ours,autofaiss")
    parser.add_argument("--keep", action="store_true", help="keep each set's vectors, truth and indexes")
    parser.add_argument("--autofaiss-index-memory", default="4G", help="autofaiss's max_index_memory_usage")
    parser.add_argument(
        "--autofaiss-memory-available",
        default="16G",  # of this machine's 24 GiB: autofaiss refuses an index budget above 90% of it
        help="autofaiss's current_memory_available (what its build may use)",
    )
    parser.add_argument(
        "--autofaiss-index-key",
        default=None,
        help="the index autofaiss builds (a faiss factory string, or 'ours': the key dask_clip's build chose); "
        "by default autofaiss chooses from its budgets",
    )
    args = parser.parse_args()
    import harness

    machine = harness.machine()
    results: dict[str, Any] = {}
    for name in args.sets.split(","):
        folder = Path(args.folder) / f"{name}-{args.n}"
        started = time.perf_counter()
        write_set(folder, name, args.n)
        written = {"s": time.perf_counter() - started, "vmhwm_mb": status_kb(os.getpid(), "VmHWM") / 1024}
        print(f"{name}: vectors and exact top 10: {json.dumps(written)}, load {os.getloadavg()}", flush=True)
        options = {
            "keep": args.keep,
            "autofaiss_index_memory": args.autofaiss_index_memory,
            "autofaiss_memory_available": args.autofaiss_memory_available,
            "autofaiss_index_key": args.autofaiss_index_key,
        }
        results[name] = {
            **compare(folder, args.autofaiss_python, args.tools.split(","), options),
            "vectors_and_truth": written,
        }
        if not args.keep:
            shutil.rmtree(folder)
    print_table(args.n, results)
    print(f"load average {machine['load_average_start']} -> {os.getloadavg()}")
    harness.write_results(f"bench_index_scale-{args.n}", {"n": args.n, "machine": machine, "results": results})


if __name__ == "__main__":
    main()
