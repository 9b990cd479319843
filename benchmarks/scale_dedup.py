"""Semantic dedup at scale: wall time, peak RSS per worker, and recall and precision of the planted pairs.

``run(dataset_path, n, workers, options, p2p_buffer)`` deduplicates a dataset written by
``synthetic_vectors.write_synthetic`` (its planted groups in ``planted.parquet`` next to the dataset folder) with
``SemanticDeduplicator(**options)`` on a fresh ``LocalCluster`` of ``workers`` processes with one thread each
(started by ``get_client`` or by the user: ``start_cluster``; Dask's own P2P settings unless ``p2p_buffer`` is
given), saving only the decision columns into a folder of their
own, then counts the rows compared in other clusters than their own (``copy_counts``, not timed).
A thread samples every worker's RSS twice a second while it runs. Then, on the client:

- **planted pairs**: every pair of members of a planted group is found when the dedup did not keep both;
  precision is the share of removed rows that are planted members naming a member of their own group;
- **exact check on a subset**: all pairs of rows of the first shards (about ``SUBSET_ROWS``) with cosine
  ``>= 1 - eps``, found exactly with a faiss flat index: the pairs the planted groups should be, and the
  recall and precision of the dedup against them.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (the checkout on sys.path, the hub offline)
import numpy as np
import pandas as pd
from synthetic_vectors import read_vectors

SUBSET_ROWS = 20_000
RSS_INTERVAL_S = 0.5
WORKER_MEMORY_LIMIT = "3GiB"  # above the 2 GB goal, so a run that misses it is measured rather than killed
CLUSTERS = ("dask_clip", "user")
"""Who starts a run's cluster (``start_cluster``)."""
DEDUP_OPTIONS = {"eps": 0.01, "n_clusters": 1000}
"""The options every run sets (the others at ``SemanticDeduplicator``'s defaults), before a run's own."""


class PeakRss:
    """Samples every worker's RSS (``psutil``) and the tasks it is running, in a background thread while the
    block runs: the peak per worker, with the tasks running at that moment, and a timeline."""

    def __init__(self, client: Any, interval: float = RSS_INTERVAL_S) -> None:
        self.client, self.interval = client, interval
        self.peaks: dict[str, int] = {}
        self.tasks_at_peak: dict[str, list[str]] = {}
        self.timeline: list[tuple[float, str, float, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        started = time.perf_counter()
        while not self._stop.is_set():
            now = time.perf_counter() - started
            for worker, (rss, tasks) in self.client.run(_rss_and_tasks).items():
                if rss > self.peaks.get(worker, 0):
                    self.peaks[worker], self.tasks_at_peak[worker] = rss, tasks
                self.timeline.append((round(now, 1), worker, round(rss / 2**20), tasks))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _rss_and_tasks(dask_worker: Any) -> tuple[int, list[str]]:
    """(In a worker.) Its RSS and the name prefixes of the tasks it is executing."""
    from distributed.utils import key_split

    return _rss(), sorted({key_split(task.key) for task in dask_worker.state.executing})


def start_cluster(cluster: str, workers: int, memory_limit: str) -> Any:
    """A client of a fresh cluster of ``workers`` single-threaded workers of ``memory_limit`` each: started by
    ``dask_clip.get_client`` (``cluster="dask_clip"``), or as a user would, a ``distributed.LocalCluster`` of
    their own and a ``Client`` of it that dask_clip picks up as the current client (``cluster="user"``)."""
    from distributed import Client, LocalCluster

    from dask_clip import get_client

    if cluster not in CLUSTERS:
        raise ValueError(f"cluster must be one of {CLUSTERS}, not {cluster!r}")
    if cluster == "dask_clip":
        return get_client(
            "cpu", n_workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=":0"
        )
    local = LocalCluster(n_workers=workers, threads_per_worker=1, memory_limit=memory_limit, dashboard_address=":0")
    return Client(local)


def run(
    dataset_path: str,
    n: int,
    workers: int,
    options: dict[str, Any] | None = None,
    p2p_buffer: str | None = None,
    memory_limit: str = WORKER_MEMORY_LIMIT,
    cluster: str = "dask_clip",
    count_copies: bool = True,
) -> dict[str, Any]:
    """Deduplicate the synthetic dataset at ``dataset_path`` (``n`` rows) on ``workers`` workers -> figures.

    ``options``: ``SemanticDeduplicator`` options over ``DEDUP_OPTIONS``. ``p2p_buffer``: the rows a worker's P2P
    shuffle holds in memory before sending (``distributed.p2p.comm.buffer``; None: Dask's default, 1 GiB). It is
    read when a worker starts, so it is set before the cluster starts (nannies pass their config on).
    ``memory_limit`` per worker and ``cluster`` (who starts it): ``start_cluster``. ``count_copies=False`` skips
    ``copy_counts`` (a sample and an assign pass of its own: ``copied_rows`` and ``copies`` are None)."""
    import dask

    from dask_clip import ImageTextPairDataset, SemanticDeduplicator

    dataset_path = Path(dataset_path)
    output = dataset_path.parent / "dedup"
    options = {**DEDUP_OPTIONS, **(options or {})}
    p2p_config = {} if p2p_buffer is None else {"distributed.p2p.comm.buffer": p2p_buffer}
    started = time.perf_counter()
    with (
        dask.config.set(p2p_config),
        start_cluster(cluster, workers, memory_limit) as client,
    ):
        startup_s = time.perf_counter() - started
        baseline = client.run(_rss)
        dataset = ImageTextPairDataset.from_webdataset(str(dataset_path))
        dedup = SemanticDeduplicator(**options)
        with PeakRss(client) as rss:
            began = time.perf_counter()
            summary = dedup(dataset).save_metadata(
                str(output), columns=["keep", "duplicate_of", "similarity"], overwrite=True
            )
            wall_s = time.perf_counter() - began
        decisions = pd.concat(pd.read_parquet(p) for p in sorted(output.glob("*.parquet"))).set_index("key")
        assert len(decisions) == n == int(summary["rows"].sum()), (len(decisions), n)
        planted = planted_scores(decisions, pd.read_parquet(dataset_path.parent / "planted.parquet"))
        peaks = sorted(round(v / 2**20) for v in rss.peaks.values())
        # printed before the copies are counted (a pass of its own), so that a run stopped then keeps its figures
        print(f"dedup: {wall_s:.0f} s, peak RSS {peaks} MB, planted {planted}", flush=True)
        copies = dedup.copy_counts(dataset) if count_copies else None
        client.cluster.close()
    result = {
        "rows": n,
        "shards": len(summary),
        "workers": workers,
        "threads_per_worker": 1,
        "worker_memory_limit": memory_limit,
        "cluster": cluster,
        "options": options,
        "cluster_startup_s": startup_s,
        "wall_s": wall_s,
        "peak_rss_mb_per_worker": sorted(v / 2**20 for v in rss.peaks.values()),
        "rss_mb_at_start_per_worker": sorted(v / 2**20 for v in baseline.values()),
        "tasks_at_peak_rss": [rss.tasks_at_peak[w] for w in sorted(rss.peaks, key=rss.peaks.get)],
        "p2p_comm_buffer": p2p_buffer or "Dask's default",
        "copied_rows": None if copies is None else int(copies["copied_rows"].sum()),
        "copies": None if copies is None else int(copies["copies"].sum()),
        "rss_timeline": rss.timeline,
        "removed": int((~decisions["keep"]).sum()),
        "planted": planted,
        "exact_subset": subset_scores(decisions, dataset_path, 1 - options["eps"]),
    }
    return result


def planted_scores(decisions: pd.DataFrame, planted: pd.DataFrame) -> dict[str, Any]:
    """Recall of the planted pairs (not both kept) and precision of the removals (a planted member naming a
    member of its own group)."""
    group_of = planted.set_index("key")["group"]
    keep = decisions["keep"]
    found = total = 0
    for members in planted.groupby("group")["key"]:
        keys = members[1].tolist()
        kept = keep.loc[keys].to_numpy()
        for i in range(len(keys)):
            for j in range(i + 1, len(keys)):
                total += 1
                found += not (kept[i] and kept[j])
    removed = decisions[~keep]
    same_group = [
        key in group_of.index and other in group_of.index and group_of[key] == group_of[other]
        for key, other in zip(removed.index, removed["duplicate_of"], strict=True)
    ]
    return {
        "groups": int(planted["group"].nunique()),
        "pairs": total,
        "found": found,
        "recall": found / total if total else math.nan,
        "removed": len(removed),
        "precision": float(np.mean(same_group)) if len(removed) else math.nan,
    }


def subset_scores(decisions: pd.DataFrame, dataset_path: Path, threshold: float) -> dict[str, Any]:
    """Every pair with cosine ``>= threshold`` among the rows of the first shards (exact, faiss flat index),
    and how the dedup's decisions on those rows agree with them."""
    import faiss

    rows_per_shard = pd.read_parquet(dataset_path / "00000.parquet", columns=["key"]).shape[0]
    shards = sorted(dataset_path.glob("*.parquet"))
    count = min(len(shards), max(1, math.ceil(SUBSET_ROWS / rows_per_shard)))
    keys, vectors = read_vectors(dataset_path, list(range(count)))
    began = time.perf_counter()
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    limits, cosines, neighbours = index.range_search(vectors, threshold - 1e-6)
    pairs = set()
    for row in range(len(keys)):
        for position in range(limits[row], limits[row + 1]):
            other = int(neighbours[position])
            if other > row and cosines[position] >= threshold:
                pairs.add((keys[row], keys[other]))
    exact_s = time.perf_counter() - began
    keep = decisions["keep"]
    found = sum(not (keep[a] and keep[b]) for a, b in pairs)
    in_subset = set(keys)
    removed = decisions.loc[keys][~keep.loc[keys]]
    checkable = [(k, o) for k, o in zip(removed.index, removed["duplicate_of"], strict=True) if o in in_subset]
    correct = sum((min(k, o), max(k, o)) in pairs for k, o in checkable)
    return {
        "rows": len(keys),
        "exact_pairs": len(pairs),
        "exact_search_s": exact_s,
        "recall": found / len(pairs) if pairs else math.nan,
        "removals_naming_a_row_of_the_subset": len(checkable),
        "precision": correct / len(checkable) if checkable else math.nan,
    }
