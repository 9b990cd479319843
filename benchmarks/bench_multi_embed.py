#!/usr/bin/env python
"""Two models in one read (``MultiEmbedder``) against two separate embedder runs, on the same shards.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_multi_embed.py            # 4 shards x 64 real photos, 3 rounds
    .venv/bin/python benchmarks/bench_multi_embed.py --quick    # 2 shards x 32, 2 rounds

Two pairs of random-weight CLIPs (``dask_clip.testing.save_random_clip_model``): ``tiny`` (224 px) beside
``vit-b-32`` (ViT-B/32's shape, 224 px: its inference weighs, the realistic case), and ``tiny`` beside ``tiny``
at 336 px (both decode-bound: the most one read can save). The shards hold real photos from scikit-image at
their original sizes (``harness.make_shards``: 191 to 1411 px), so decoding costs what it costs on real data.
On a ``LocalCluster`` (one single-threaded worker per core) with the pair's models already loaded on every
worker, each round times, in alternating order, the embeddings of every shard computed by

1. ``multi``: ``MultiEmbedder([first, second])`` (each image decoded once, resized for each model);
2. ``separate``: ``first`` alone, then ``second`` alone (each image decoded twice);

and the script prints each round's seconds and ``speedup = separate / multi`` (the median over rounds, and
each round's) per pair. The two ways agree (equal input sizes: the same pixels;
a smaller model beside a larger one gets a finer fast decode: cosine >= 0.998, checked). Results go, with
the machine and its load, to ``benchmarks/results/`` (gitignored).
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


PAIRS = {
    "tiny + vit-b-32": (("tiny", 224), ("vit-b-32", 224)),  # B/32 inference weighs: the realistic case
    "tiny + tiny-336": (("tiny", 224), ("tiny", 336)),  # both decode-bound: the most one read can save
}


def embed_all(embedder: Any, dataset: Any) -> tuple[Any, float]:
    """``embedder(dataset)`` computed on the current client -> (the frame, seconds)."""
    started = time.perf_counter()
    frame = embedder(dataset).pandas_metadata.compute()
    return frame, time.perf_counter() - started


def measure_pair(
    name: str, models: list[Path], dataset: Any, options: argparse.Namespace, rounds: int, started: float
) -> dict[str, Any]:
    """Alternating rounds of ``MultiEmbedder`` over ``models`` against each model alone, their vectors compared."""
    from dask_clip import ClipImageEmbedder, MultiEmbedder, embeddings_to_numpy

    common = {"decode_mode": options.decode_mode} if options.decode_mode else {}
    alone = [ClipImageEmbedder(str(m), embedding_column=f"emb_{i}", **common) for i, m in enumerate(models)]
    together = MultiEmbedder(alone)
    embed_all(together, dataset)  # every worker loads both models (the same cache entries as alone)
    timings: list[dict[str, float]] = []
    for number in range(rounds):
        order = ["multi", "separate"] if number % 2 == 0 else ["separate", "multi"]
        seconds: dict[str, float] = {}
        for way in order:
            if way == "multi":
                frame, seconds["multi"] = embed_all(together, dataset)
            else:
                separate = [embed_all(embedder, dataset) for embedder in alone]
                seconds["separate"] = sum(run_seconds for _, run_seconds in separate)
        seconds["speedup"] = seconds["separate"] / seconds["multi"]
        timings.append(seconds)
        harness.log(
            started,
            f"{name}, round {number + 1}: multi {seconds['multi']:.1f}s, separate {seconds['separate']:.1f}s "
            f"({' + '.join(f'{s:.1f}s' for _, s in separate)}), speedup {seconds['speedup']:.2f}, "
            f"load {os.getloadavg()[0]:.1f}",
        )
    agreement = {}
    for index, (single, _) in enumerate(separate):
        column = f"emb_{index}"
        vectors = embeddings_to_numpy(frame.set_index("key")[column])
        expected = embeddings_to_numpy(single.set_index("key").loc[frame["key"], column])
        agreement[column] = float(np.sum(vectors * expected, axis=1).min())
        # equal input sizes: the same pixels; a smaller model beside a larger one gets a finer "fast" decode
        assert agreement[column] >= 0.998, (name, column, agreement[column])
    harness.log(started, f"{name}: least cosine, one read vs alone: {agreement}")
    return {
        "decode_mode": alone[0].decode_mode,
        "rounds": timings,
        "speedup_median": statistics.median(t["speedup"] for t in timings),
        "multi_best_s": min(t["multi"] for t in timings),
        "separate_best_s": min(t["separate"] for t in timings),
        "least_cosine_to_alone": agreement,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shards and rounds")
    parser.add_argument("--decode-mode", default=None, choices=("fast", "exact"), help="default: the embedders'")
    parser.add_argument("--sizes", type=int, nargs=3, metavar=("SHARDS", "PER_SHARD", "ROUNDS"), help="override")
    options = parser.parse_args()
    n_shards, per_shard, rounds = options.sizes or SIZES["quick" if options.quick else "full"]
    started = time.perf_counter()

    from dask_clip import ImageTextPairDataset, get_client, testing

    machine = harness.machine()
    results: dict[str, Any] = {"shards": n_shards, "per_shard": per_shard, "machine": machine, "pairs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as scratch:
        work = Path(scratch)
        harness.log(started, f"writing {n_shards} shards of {per_shard} photos and the models")
        harness.make_shards(work / "shards", n_shards, per_shard)
        dataset = ImageTextPairDataset.from_webdataset(str(work / "shards"))
        results["images"] = sum(harness.count_images(tar) for tar in sorted((work / "shards").glob("*.tar")))
        with get_client("cpu", n_workers=os.cpu_count(), threads_per_worker=1, dashboard_address=":0"):
            for name, shapes in PAIRS.items():
                models = [
                    testing.save_random_clip_model(work / f"{shape}-{size}", shape=shape, image_size=size, seed=index)
                    for index, (shape, size) in enumerate(shapes)
                ]
                results["pairs"][name] = measure_pair(name, models, dataset, options, rounds, started)
    results["load_average_end"] = os.getloadavg()
    images = results["images"]
    harness.print_table(
        ("models", "decode", "multi best s", "separate best s", "speedup (median)", "rounds"),
        [
            [
                name,
                pair["decode_mode"],
                f"{pair['multi_best_s']:.1f}",
                f"{pair['separate_best_s']:.1f}",
                f"{pair['speedup_median']:.2f}",
                ", ".join(f"{t['speedup']:.2f}" for t in pair["rounds"]),
            ]
            for name, pair in results["pairs"].items()
        ],
    )
    print(
        f"\n{images} images; load average {machine['load_average_start'][0]:.1f} at start, "
        f"{results['load_average_end'][0]:.1f} at end"
    )
    harness.write_results("multi_embed", results)


if __name__ == "__main__":
    main()
