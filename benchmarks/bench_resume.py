#!/usr/bin/env python
"""Seconds for a re-run to decide that every shard of an unchanged, fully embedded dataset is finished.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_resume.py              # 10,000 shards (a few minutes to set up)
    .venv/bin/python benchmarks/bench_resume.py --shards 1000

It writes ``--shards`` shards of four rows (one image each, three failed downloads: most of a real
img2dataset shard's cost in files, little in images), embeds and saves them once with the tiny
random-weight CLIP on a 2-worker ``LocalCluster``, then times the same ``save_metadata`` again, which must
write nothing. Audit hooks on the client and on every worker count the files each opens during the re-run:
no tar may be opened (a tar's identity comes from the folder listing); each parquet is opened once, for its
footer and id column.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import audit
import harness
import numpy as np


def _write_shards(folder: str, numbers: list[int], payload: bytes) -> int:
    from dask_clip import testing

    for number in numbers:
        rows, members = [], {}
        for index in range(4):
            key = testing.img2dataset_key(number, index, shard_digits=6)
            status = "success" if index == 0 else "failed_to_download"
            rows.append({"url": f"file:///{key}.jpg", "caption": "tiny", "key": key, "status": status})
            if index == 0:
                members[key] = {"jpg": payload}
        testing.write_shard(folder, number, rows, members)
    return len(numbers)


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=10_000, help="shards of 4 rows each")
    options = parser.parse_args(argv)
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, get_client, testing

    started = time.perf_counter()
    results: dict[str, Any] = {"machine": harness.machine(), "shards": options.shards}
    with tempfile.TemporaryDirectory() as work:
        folder, model = Path(work) / "shards", Path(work) / "model"
        testing.save_random_clip_model(model, shape="tiny")
        payload = testing.encode_jpeg(np.full((32, 32, 3), 128, dtype=np.uint8))
        chunks = [list(range(start, min(start + 500, options.shards))) for start in range(0, options.shards, 500)]
        with ProcessPoolExecutor(harness.CORES) as pool:
            sum(pool.map(_write_shards, [str(folder)] * len(chunks), chunks, [payload] * len(chunks)))
        harness.log(started, f"wrote {options.shards} shards")
        with get_client("cpu", n_workers=2, threads_per_worker=1, dashboard_address=":0") as client:
            first_started = time.perf_counter()
            embedder = ClipImageEmbedder(str(model), autocast=False)
            first = embedder(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
            results["first_run_s"] = time.perf_counter() - first_started
            assert first["written"].all()
            harness.log(started, f"embedded and saved every shard in {results['first_run_s']:.1f}s")

            client.run(audit.start_recording)
            audit.start_recording()
            rerun_started = time.perf_counter()
            again = embedder(ImageTextPairDataset.from_webdataset(str(folder))).save_metadata()
            results["rerun_s"] = time.perf_counter() - rerun_started
            results["client_opens"] = audit.stop_recording()
            per_worker = client.run(audit.stop_recording)
            results["worker_opens"] = {
                suffix: sum(o[suffix] for o in per_worker.values()) for suffix in (".tar", ".parquet")
            }
            results["rerun_written"] = int(again["written"].sum())
    harness.log(started, "done")
    print(
        f"\nre-run over {options.shards} unchanged shards: decided in {results['rerun_s']:.1f}s "
        f"({results['rerun_s'] / options.shards * 1000:.2f} ms a shard), {results['rerun_written']} written; "
        f"files opened: tars {results['client_opens']['.tar'] + results['worker_opens']['.tar']}, "
        f"parquets {results['client_opens']['.parquet'] + results['worker_opens']['.parquet']}; "
        f"first run (embed + save) {results['first_run_s']:.1f}s"
    )
    print(f"machine: {results['machine']}")
    harness.write_results("bench_resume", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
