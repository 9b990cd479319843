#!/usr/bin/env python
"""Throughput of dask_clip end to end, against its two parts and against the plain transformers loop.

Run from the root of a checkout::

    .venv/bin/python benchmarks/bench_embed.py            # full run (< 15 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_embed.py --quick    # a couple of minutes

For each model shape built by ``dask_clip.testing.save_random_clip_model`` ("tiny": decoding is the
bottleneck; "vit-b-32": the model is), on the same shards of real photos at their original sizes
(``make_img2dataset_shards`` with ``sample_photos()``: 191 to 1411 px), in one run, it measures
images per second of:

1. ``model only``: ``ClipVisionModel.embed`` on already-preprocessed uint8 crops, run inside the
   workers of the same cluster as the end-to-end run (same batch size, dtype, torch threads and malloc
   settings);
2. ``decode only``: reading the tars and decoding + preprocessing every image as the embedder does
   (with ``--decode-mode device``, JPEGs in batches on the GPU when there is one), one process per core;
3. ``end to end``: ``from_webdataset`` -> ``ClipImageEmbedder`` -> ``save_metadata`` on a
   ``LocalCluster`` with default settings (cluster start-up and model load are reported apart);
4. ``plain loop``: what a user would write: ``CLIPImageProcessor`` + ``CLIPModel.get_image_features``
   in one process, fp32, batched like dask_clip;
5. ``HF processor only``: ``CLIPImageProcessor`` on PIL-decoded images, one process per core.

and reports ``efficiency = end_to_end / (1 / (1/model_only + 1/decode_only))`` (1.0 = as fast as
running both parts one after the other on all cores) and ``speedup = end_to_end / plain_loop``.
It also measures how close the fast decode (``decode_mode="fast"``) is to the exact one (cosine of
the final embeddings on the real photos), the peak RSS of a process embedding one shard of 500 vs
5000 images, and the graph build time of ``from_webdataset`` + ``embedder(ds)`` over 10,000 shards
(with a check that no tar is opened on the client).

The machine may be shared: every measurement runs ``--repeat`` rounds (2 in the full run),
interleaved with the others so that all see the same load, and keeps its fastest round (all rounds
are in the JSON). Results are printed as a table and written as JSON to ``benchmarks/results/``
(gitignored).

Each measurement is a module next to this script (``throughput``, ``plain_loop``, ``agreement``,
``memory``, ``graph_build``; ``harness`` for what they share); this script runs them and reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import memory
import throughput
from agreement import agreement
from graph_build import graph_build
from plain_loop import plain_loop

# (shards, images per shard) per model shape: enough work for a few seconds per measurement
SIZES = {
    "full": {"tiny": (8, 192), "vit-b-32": (8, 32)},
    "quick": {"tiny": (4, 64), "vit-b-32": (4, 16)},
}
RSS_SHARD_SIZES = {"full": (500, 5000), "quick": (250, 2500)}
REPEAT = {"full": 2, "quick": 1}  # each measurement keeps the best of this many rounds
GRAPH_SHARDS = {"full": 10_000, "quick": 2_000}
AGREEMENT_IMAGES = 48


def measure_shape(
    shape: str, mode: str, options: argparse.Namespace, work: Path, pool: ProcessPoolExecutor, started: float
) -> dict[str, Any]:
    """Every throughput measurement and the agreement for one model shape, their rounds interleaved."""
    from dask_clip import ClipImageEmbedder, testing
    from dask_clip.images.preprocess import decode_and_preprocess

    harness.log(started, f"{shape}: writing model and shards")
    shape_dir = work / shape
    model_dir = testing.save_random_clip_model(shape_dir / "model", shape=shape)
    n_shards, per_shard = SIZES[mode][shape]
    tars = harness.make_shards(shape_dir / "shards", n_shards, per_shard)
    smallest, largest, mean_short = harness.image_sizes(tars[:1])
    entry: dict[str, Any] = {
        "shards": n_shards,
        "images": sum(harness.count_images(t) for t in tars),
        "image_short_side_min": smallest,
        "image_long_side_max": largest,
        "image_short_side_mean": mean_short,
    }
    probe = ClipImageEmbedder(str(model_dir), **throughput.embedder_kwargs(options))
    modes = sorted({"exact", "fast", probe.decode_mode})
    configs = {m: probe.preprocess.with_decode_mode(m) for m in modes}

    throughput.warm_up(pool, model_dir)
    rounds: dict[str, list] = {k: [] for k in [f"decode_only_{m}" for m in modes] + ["hf_processor_only", "plain_loop"]}

    def each_round() -> None:
        harness.log(
            started,
            f"{shape}: round: decode only, HF processor only, plain loop, then model only and end to end on the "
            "cluster",
        )
        for m in modes:
            rounds[f"decode_only_{m}"].append(throughput.decode_only(pool, tars, configs[m], options.batch_size))
        rounds["hf_processor_only"].append(throughput.hf_processor_only(pool, tars, model_dir, options.batch_size))
        rounds["plain_loop"].append(plain_loop(tars, model_dir, options.batch_size))

    crops = [decode_and_preprocess(j, configs[probe.decode_mode]) for j in harness.jpegs_of(tars, 32)]
    entry.update(throughput.cluster_measurements(shape_dir, tars, model_dir, crops, options, each_round))
    entry.update({name: harness.best(values) for name, values in rounds.items()})
    entry["decode_only"] = entry[f"decode_only_{probe.decode_mode}"]
    entry["agreement"] = agreement(model_dir, harness.jpegs_of(tars, AGREEMENT_IMAGES))
    entry["summary"] = summarize(entry)
    harness.log(started, f"{shape}: {json.dumps(entry['summary'])}")
    return entry


# --------------------------------------------------------------------------------------------------
# report


def summarize(shape: dict[str, Any]) -> dict[str, float]:
    model = shape["model_only"]["images_per_s"]
    decode = shape["decode_only"]["images_per_s"]
    end_to_end = shape["end_to_end"]["images_per_s"]
    ideal = 1 / (1 / model + 1 / decode)
    return {
        "ideal_images_per_s": ideal,
        "efficiency": end_to_end / ideal,
        "speedup": end_to_end / shape["plain_loop"]["images_per_s"],
        "decode_vs_hf_processor": decode / shape["hf_processor_only"]["images_per_s"],
        "decode_exact_vs_hf_processor": shape["decode_only_exact"]["images_per_s"]
        / shape["hf_processor_only"]["images_per_s"],
    }


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print()
    print(
        f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, AVX2 {m['avx2']}, "
        f"native bf16 {m['avx512_bf16'] or m['amx']}; torch {m['torch']}, transformers {m['transformers']}, "
        f"Pillow {m['pillow']}, distributed {m['distributed']}; load average at start {m['load_average_start'][0]:.2f}"
    )
    header = (
        "shape",
        "images",
        "model only",
        "decode only",
        "HF proc only",
        "end to end",
        "plain loop",
        "efficiency",
        "speedup",
        "decode/HF",
    )
    rows = []
    for name, shape in results["shapes"].items():
        s = shape["summary"]
        cells = [
            name,
            str(shape["images"]),
            *(
                f"{shape[k]['images_per_s']:.1f}"
                for k in ("model_only", "decode_only", "hf_processor_only", "end_to_end", "plain_loop")
            ),
            f"{s['efficiency']:.2f}",
            f"{s['speedup']:.2f}x",
            f"{s['decode_vs_hf_processor']:.2f}x",
        ]
        rows.append(cells)
    harness.print_table(header, rows)
    print(
        "\n(images/s; efficiency = end to end / (1/(1/model only + 1/decode only)); speedup = end to end / plain loop)"
    )
    for name, shape in results["shapes"].items():
        e, a = shape["embedder"], shape["agreement"]
        print(
            f"\n{name}: {shape['workers']} workers x {shape['threads_per_worker']} threads, torch threads "
            f"{shape['torch_threads_per_worker']}, batch {e['batch_size']}, decode_threads {e['decode_threads']}, "
            f"decode_mode {e['decode_mode']}, autocast {e['autocast']}; plain loop torch threads "
            f"{shape['plain_loop']['torch_threads']}"
        )
        print(
            f"  cluster start-up {shape['cluster_startup_s']:.1f}s, model load {shape['model_load_s']:.1f}s "
            f"(not in end to end); end to end {shape['end_to_end']['seconds']:.1f}s for "
            f"{shape['end_to_end']['images']} images; "
            f"decode only exact mode {shape['decode_only_exact']['images_per_s']:.1f} img/s, fast mode "
            f"{shape['decode_only_fast']['images_per_s']:.1f} img/s (exact / HF processor "
            f"{shape['summary']['decode_exact_vs_hf_processor']:.2f}x)"
        )
        print(
            f"  agreement on {a['images']} photos (cosine): fast vs exact min {a['fast_vs_exact_min']:.5f} "
            f"mean {a['fast_vs_exact_mean']:.5f}; exact vs transformers min {a['exact_vs_transformers_min']:.6f}; "
            f"fast vs transformers min {a['fast_vs_transformers_min']:.5f}"
        )
    if "rss" in results:
        r = results["rss"]
        print(
            f"\npeak RSS embedding one shard (tiny model): {r['small']['rows']} images "
            f"{r['small']['peak_rss_mb']:.0f} MB, "
            f"{r['large']['rows']} images {r['large']['peak_rss_mb']:.0f} MB (VmHWM; ratio {r['ratio']:.3f}; sampled "
            f"{r['small']['peak_rss_mb_sampled']:.0f} / {r['large']['peak_rss_mb_sampled']:.0f} MB; "
            f"after model load {r['small']['after_load_mb']:.0f} / {r['large']['after_load_mb']:.0f} MB)"
        )
    if "graph" in results:
        g = results["graph"]
        print(
            f"graph build over {g['shards']} shards: from_webdataset {g['from_webdataset_s']:.2f}s + embedder(ds) "
            f"{g['embedder_call_s']:.2f}s = {g['build_s']:.2f}s; materializing the {g['graph_tasks']}-task graph "
            f"{g['graph_materialize_s']:.2f}s; tars opened on the client: {g['tar_opens_on_client']}, parquets: "
            f"{g['parquet_opens_on_client']}"
        )
    print(f"\ntotal {results['total_s']:.0f}s; load average at end {results['load_average_end'][0]:.2f}")


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and shards: a couple of minutes")
    parser.add_argument("--shapes", default="tiny,vit-b-32", help="model shapes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="batch_size (default: the embedder's)")
    parser.add_argument("--decode-threads", type=int, default=None, help="decode_threads (default: the embedder's)")
    parser.add_argument(
        "--decode-mode", choices=("fast", "exact", "device"), default=None, help="default: the embedder's"
    )
    parser.add_argument("--no-autocast", action="store_true", help="autocast=False (default: the embedder's)")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster n_workers (default: Dask's)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="LocalCluster threads_per_worker")
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch.set_num_threads on each worker (experiment)"
    )
    parser.add_argument(
        "--repeat", type=int, default=None, help="rounds per measurement, best kept (default: 2, quick 1)"
    )
    parser.add_argument("--skip-extras", action="store_true", help="skip the RSS and graph-build measurements")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    options = parse_args(argv)
    from dask_clip import testing

    logging.getLogger("distributed").setLevel(logging.ERROR)
    mode = "quick" if options.quick else "full"
    options.repeat = options.repeat or REPEAT[mode]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "mode": mode,
        "options": dict(vars(options)),
        "machine": harness.machine(),
        "shapes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="dask_clip_bench_"))
    try:
        with harness.process_pool() as pool:
            for shape in options.shapes.split(","):
                results["shapes"][shape] = measure_shape(shape, mode, options, work, pool, started)

            if not options.skip_extras:
                harness.log(started, "peak RSS, 500 vs 5000 images")
                tiny = work / "tiny" / "model"
                if not tiny.exists():
                    testing.save_random_clip_model(tiny, shape="tiny")
                small, large = RSS_SHARD_SIZES[mode]
                results["rss"] = memory.small_vs_large(work, tiny, small, large, options.batch_size)
                harness.log(started, f"graph build over {GRAPH_SHARDS[mode]} shards")
                results["graph"] = graph_build(work / "many", tiny, GRAPH_SHARDS[mode], pool)
    finally:
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    print_report(results)
    harness.write_results(f"bench_embed-{mode}", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
