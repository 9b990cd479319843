"""Time and memory of ``keep_top_fraction``'s exact fit: N rows of img2dataset-like ids and tied float32 scores (3
decimals) in S shards, ranked in this process (Dask's threaded scheduler, no cluster), then the decision computed.

The peak RSS is the process's (``ru_maxrss``) after the fit, less its peak after writing the shards and reading
one: an upper bound for the client, which here also reads the parquets. Prints a JSON line and writes the
results, with the machine, to benchmarks/results/.
Usage: ``.venv/bin/python benchmarks/bench_top_fraction.py [--rows 2000000] [--shards 20]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import harness  # run as a script: the checkout on sys.path, the hub offline
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def write_shards(folder: Path, rows: int, shards: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per_shard = -(-rows // shards)
    for shard in range(shards):
        count = min(per_shard, rows - shard * per_shard)
        keys = pa.array([f"{shard * 10**4 + i:09d}" for i in range(count)])
        scores = np.round(rng.random(count, dtype=np.float32), 3)
        scores[rng.random(count) < 0.05] = np.nan  # failed downloads: no score
        table = pa.table({"key": keys, "clip_score": pa.array(scores, mask=np.isnan(scores))})
        pq.write_table(table, folder / f"{shard:05d}.parquet")
        tarfile.open(folder / f"{shard:05d}.tar", "w").close()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.3)
    args = parser.parse_args()

    from dask_clip import ImageTextPairDataset, keep_top_fraction

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        write_shards(folder, args.rows, args.shards)
        dataset = ImageTextPairDataset.from_webdataset(str(folder))
        dataset.metadata.partitions[0].compute()  # every import a computation needs, before the peak is taken
        before = peak_mb()
        started = time.perf_counter()
        decided = keep_top_fraction(dataset, "clip_score", args.fraction)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        kept = int(decided.metadata["keep_top_fraction"].sum().compute())
        decide_s = time.perf_counter() - started
    found = decided.provenance["keep_top_fraction"].operation
    result = {
        "machine": harness.machine(),
        "rows": args.rows,
        "shards": args.shards,
        "scored_rows": found["scored_rows"],
        "kept_rows": kept,
        "fit_s": round(fit_s, 2),
        "decide_s": round(decide_s, 2),
        "peak_rss_mb_growth": round(peak_mb() - before, 1),
    }
    assert kept == found["kept_rows"]
    result["load_average_end"] = os.getloadavg()
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}))
    harness.write_results("top_fraction", result)


if __name__ == "__main__":
    main()
