#!/usr/bin/env python
"""Two models in one read (``MultiEmbedder``) against two separate embedder runs, on the same shards.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_multi_embed.py            # 4 shards x 64 real photos, 3 rounds
    .venv/bin/python benchmarks/bench_multi_embed.py --quick    # 2 shards x 32, 2 rounds

The models are random-weight CLIPs from ``dask_clip.testing.save_random_clip_model``: ``tiny`` (decoding is
its whole cost) and ``vit-b-32`` (ViT-B/32's shape: inference weighs too), both at 224 px. The shards hold
real photos from scikit-image at their original sizes (``harness.make_shards``: 191 to 1411 px), so decoding
costs what it costs on real data. On a ``LocalCluster`` (one single-threaded worker per core) with both
models already loaded on every worker, each round times, in alternating order, the embeddings of every
shard computed by

1. ``multi``: ``MultiEmbedder([tiny, b32])`` (each image decoded once, resized for each model);
2. ``separate``: ``tiny`` alone, then ``b32`` alone (each image decoded twice);

and the script prints each round's seconds and ``speedup = separate / multi`` (the median over rounds, and
each round's). The two ways give the same vectors (checked). Results go, with the machine and its load, to
``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import numpy as np

SIZES = {"full": (4, 64, 3), "quick": (2, 32, 2)}  # shards, images per shard, rounds


def embed_all(embedder: Any, dataset: Any) -> tuple[Any, float]:
    """``embedder(dataset)`` computed on the current client -> (the frame, seconds)."""
    started = time.perf_counter()
    frame = embedder(dataset).pandas_metadata.compute()
    return frame, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shards and rounds")
    parser.add_argument("--decode-mode", default=None, choices=("fast", "exact"), help="default: the embedders'")
    options = parser.parse_args()
    n_shards, per_shard, rounds = SIZES["quick" if options.quick else "full"]
    started = time.perf_counter()

    from dask_clip import (
        ClipImageEmbedder,
        ImageTextPairDataset,
        MultiEmbedder,
        embeddings_to_numpy,
        get_client,
        testing,
    )

    machine = harness.machine()
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as scratch:
        work = Path(scratch)
        harness.log(started, f"writing {n_shards} shards of {per_shard} photos and two models")
        harness.make_shards(work / "shards", n_shards, per_shard)
        tiny = testing.save_random_clip_model(work / "tiny", shape="tiny")
        b32 = testing.save_random_clip_model(work / "b32", shape="vit-b-32", seed=1)
        dataset = ImageTextPairDataset.from_webdataset(str(work / "shards"))
        images = sum(harness.count_images(tar) for tar in sorted((work / "shards").glob("*.tar")))
        common = {"decode_mode": options.decode_mode} if options.decode_mode else {}
        first = ClipImageEmbedder(str(tiny), embedding_column="emb_tiny", **common)
        second = ClipImageEmbedder(str(b32), embedding_column="emb_b32", **common)
        multi = MultiEmbedder([first, second])
        with get_client("cpu", n_workers=os.cpu_count(), threads_per_worker=1, dashboard_address=":0") as client:
            harness.log(started, f"cluster of {len(client.scheduler_info()['workers'])} workers; warming up")
            embed_all(multi, dataset)  # every worker loads both models (the same cache entries as alone)
            timings: list[dict[str, float]] = []
            for number in range(rounds):
                order = ["multi", "separate"] if number % 2 == 0 else ["separate", "multi"]
                seconds: dict[str, float] = {}
                for way in order:
                    if way == "multi":
                        together, seconds["multi"] = embed_all(multi, dataset)
                    else:
                        alone_tiny, tiny_s = embed_all(first, dataset)
                        alone_b32, b32_s = embed_all(second, dataset)
                        seconds.update(separate=tiny_s + b32_s, tiny_alone=tiny_s, b32_alone=b32_s)
                seconds["speedup"] = seconds["separate"] / seconds["multi"]
                timings.append(seconds)
                harness.log(
                    started,
                    f"round {number + 1}: multi {seconds['multi']:.1f}s, separate {seconds['separate']:.1f}s "
                    f"(tiny {seconds['tiny_alone']:.1f}s + b32 {seconds['b32_alone']:.1f}s), "
                    f"speedup {seconds['speedup']:.2f}, load {os.getloadavg()[0]:.1f}",
                )
            for column, alone in (("emb_tiny", alone_tiny), ("emb_b32", alone_b32)):
                together_vectors = embeddings_to_numpy(together.set_index("key")[column])
                alone_vectors = embeddings_to_numpy(alone.set_index("key").loc[together["key"], column])
                cosine = np.sum(together_vectors * alone_vectors, axis=1)
                assert cosine.min() >= 0.9999, (column, float(cosine.min()))
    speedups = [t["speedup"] for t in timings]
    results = {
        "images": images,
        "shards": n_shards,
        "decode_mode": first.decode_mode,
        "rounds": timings,
        "speedup_median": statistics.median(speedups),
        "multi_images_per_s_best": images / min(t["multi"] for t in timings),
        "separate_images_per_s_best": images / min(t["separate"] for t in timings),
        "machine": machine,
        "load_average_end": os.getloadavg(),
    }
    harness.print_table(
        ("way", "best seconds", "images/s"),
        [
            [
                "multi (one read)",
                f"{min(t['multi'] for t in timings):.1f}",
                f"{results['multi_images_per_s_best']:.1f}",
            ],
            [
                "separate (two)",
                f"{min(t['separate'] for t in timings):.1f}",
                f"{results['separate_images_per_s_best']:.1f}",
            ],
        ],
    )
    print(
        f"\nspeedup (separate / multi) over {images} images, decode_mode={first.decode_mode}: median "
        f"{results['speedup_median']:.2f} (rounds: {', '.join(f'{s:.2f}' for s in speedups)}); "
        f"load average {machine['load_average_start'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end"
    )
    harness.write_results("multi_embed", results)


if __name__ == "__main__":
    main()
