"""Images per second of dask_clip's two parts, of the whole, and of transformers' image processor.

- ``decode only``: reading the tars and decoding + preprocessing every image as the embedder does (with
  ``decode_mode="device"``, JPEGs in batches on the GPU when there is one), one process per core;
- ``HF processor only``: ``CLIPImageProcessor`` on PIL-decoded images, one process per core;
- ``model only``: ``ClipVisionModel.embed`` on already-preprocessed uint8 crops, run inside the workers of
  the same cluster as the end-to-end run (same batch size, dtype, torch threads and malloc settings);
- ``end to end``: ``from_webdataset`` -> ``ClipImageEmbedder`` -> ``save_metadata`` on a ``LocalCluster``
  with default settings (cluster start-up and model load are reported apart).
"""

from __future__ import annotations

import argparse
import io
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import harness
import numpy as np

# --------------------------------------------------------------------------------------------------
# process-pool measurements (decode only, HF processor only): one process per core

_PROCESSORS: dict[str, Any] = {}


def _processor(model_dir: str) -> Any:
    from transformers import CLIPImageProcessor

    if model_dir not in _PROCESSORS:
        _PROCESSORS[model_dir] = CLIPImageProcessor.from_pretrained(model_dir)
    return _PROCESSORS[model_dir]


def _warm(model_dir: str, seconds: float) -> None:
    from transformers import CLIPImageProcessor  # noqa: F401  (import cost stays out of the timing)

    import dask_clip.images.preprocess  # noqa: F401

    _processor(model_dir)
    time.sleep(seconds)  # keeps this process busy so that every process of the pool gets a warm-up


def warm_up(pool: ProcessPoolExecutor, model_dir: Path) -> None:
    """Imports and the image processor of ``model_dir`` loaded in every process of ``pool``, untimed."""
    list(pool.map(_warm, [str(model_dir)] * harness.CORES * 2, [0.3] * harness.CORES * 2))


def _decode_shard(tar_url: str, config: Any, batch_size: int) -> int:
    """Decode and preprocess every image of a shard as the embedder does (``decode_mode="device"``: JPEGs
    in batches on the GPU when there is one, else on the CPU); returns the number of images."""
    import torch

    from dask_clip.images.device_decode import EncodedJpeg, decode_on_device, prepare_image
    from dask_clip.models.device import resolve_device

    device = resolve_device(None)
    count, encoded = 0, []
    for data in harness.images_of(tar_url):
        prepared = prepare_image(data, config)
        encoded += [prepared] if isinstance(prepared, EncodedJpeg) else []
        count += 1
        if len(encoded) == batch_size:
            decode_on_device(encoded, config, device)
            encoded = []
    if encoded:
        decode_on_device(encoded, config, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return count


def _hf_processor_shard(tar_url: str, model_dir: str, batch_size: int) -> int:
    from PIL import Image

    processor = _processor(model_dir)
    count, batch = 0, []
    for data in harness.images_of(tar_url):
        batch.append(Image.open(io.BytesIO(data)))
        if len(batch) == batch_size:
            processor(images=batch, return_tensors="pt")
            count, batch = count + len(batch), []
    if batch:
        processor(images=batch, return_tensors="pt")
        count += len(batch)
    return count


def _pool_throughput(pool: ProcessPoolExecutor, function: Any, tars: list[Path], *args: Any) -> dict[str, float]:
    """``function(tar, *args)`` for every tar on ``pool``; it returns the number of images it handled."""
    started = time.perf_counter()
    counts = list(pool.map(function, [str(t) for t in tars], *[[a] * len(tars) for a in args]))
    return harness.rate(sum(counts), time.perf_counter() - started)


def decode_only(pool: ProcessPoolExecutor, tars: list[Path], config: Any, batch_size: int) -> dict[str, float]:
    """Decode + preprocess of every image of ``tars`` with ``config`` (a ``PreprocessConfig``), one process per core."""
    return _pool_throughput(pool, _decode_shard, tars, config, batch_size)


def hf_processor_only(
    pool: ProcessPoolExecutor, tars: list[Path], model_dir: Path, batch_size: int
) -> dict[str, float]:
    """``CLIPImageProcessor`` on every image of ``tars``, one process per core."""
    return _pool_throughput(pool, _hf_processor_shard, tars, str(model_dir), batch_size)


# --------------------------------------------------------------------------------------------------
# cluster measurements (model only, end to end)


def embedder_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    """The ``ClipImageEmbedder`` options of the command line (the embedder's defaults where not given)."""
    kwargs: dict[str, Any] = {"batch_size": options.batch_size}
    if options.decode_threads:
        kwargs["decode_threads"] = options.decode_threads
    if options.decode_mode:
        kwargs["decode_mode"] = options.decode_mode
    if options.no_autocast:
        kwargs["autocast"] = False
    return kwargs


def _load_on_worker(embedder: Any) -> dict[str, float]:
    import torch

    started = time.perf_counter()
    embedder.model.get()
    return {"load_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}


def _model_only_on_worker(embedder: Any, crops: list[np.ndarray], shard_sizes: list[int], start_at: float) -> tuple:
    """Embed ``shard_sizes`` images (batched per shard, as a shard task does) from preprocessed crops."""
    from dask_clip.columns import l2_normalize

    model = embedder.model.get()
    while time.time() < start_at:
        time.sleep(0.002)
    started, done = time.time(), 0
    for size in shard_sizes:
        for first in range(0, size, embedder.batch_size):
            batch = [crops[(done + k) % len(crops)] for k in range(min(embedder.batch_size, size - first))]
            l2_normalize(model.embed(batch))
            done += len(batch)
    return started, time.time(), done


def _set_torch_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def cluster_measurements(
    shape_dir: Path,
    tars: list[Path],
    model_dir: Path,
    crops: list[np.ndarray],
    options: argparse.Namespace,
    each_round: Any = None,
) -> dict[str, Any]:
    """Start a LocalCluster, load the model, then ``options.repeat`` rounds of: ``each_round()`` (the
    measurements outside the cluster), model only, end to end. Interleaved so that every measurement
    sees the same (shared, noisy) machine; each keeps its best round."""
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, cache_info, get_client
    from dask_clip.distributed.worker_setup import MemoryTuningPlugin

    out: dict[str, Any] = {}
    cluster_kwargs: dict[str, Any] = {"dashboard_address": ":0"}
    if options.workers:
        cluster_kwargs["n_workers"] = options.workers
    if options.threads_per_worker:
        cluster_kwargs["threads_per_worker"] = options.threads_per_worker
    started = time.perf_counter()
    client = get_client("cpu", **cluster_kwargs)
    try:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
        out["cluster_startup_s"] = time.perf_counter() - started
        out["workers"] = len(workers)
        out["threads_per_worker"] = sorted(
            {w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        )
        # dask_clip tunes glibc's malloc on the workers (MemoryTuningPlugin) the first time it computes on a
        # client, so end to end runs with it. Model only is not a dask_clip computation: registered here,
        # before anything runs, the plugin gives it the same malloc settings, whichever of the two runs first
        # (Dask's own settings would make the model alone up to 2x slower and the comparison unfair).
        client.register_plugin(MemoryTuningPlugin())
        if options.torch_threads:
            client.run(_set_torch_threads, options.torch_threads)
        embedder = ClipImageEmbedder(str(model_dir), **embedder_kwargs(options))
        out["embedder"] = {
            "batch_size": embedder.batch_size,
            "decode_threads": embedder.decode_threads,
            "autocast": embedder.autocast,
            "decode_mode": embedder.decode_mode,
        }

        started = time.perf_counter()
        loads = client.gather([client.submit(_load_on_worker, embedder, workers=[w], pure=False) for w in workers])
        out["model_load_s"] = time.perf_counter() - started
        out["model_load_s_per_worker"] = [round(x["load_s"], 3) for x in loads]
        out["torch_threads_per_worker"] = [x["torch_threads"] for x in loads]

        # warm-up end to end on a small copy (imports, first parquet write), never timed
        warm = shape_dir / "warm"
        harness.make_shards(warm, len(workers), 4)
        embedder(ImageTextPairDataset.from_webdataset(str(warm))).save_metadata(path=str(shape_dir / "warm-out"))

        # model only: each worker embeds the images of its share of the shards, all workers at once
        sizes = [harness.count_images(t) for t in tars]
        shares = [sizes[i :: len(workers)] for i in range(len(workers))]
        # one untimed batch per worker first (first-call allocations and kernel set-up)
        client.gather(
            [
                client.submit(
                    _model_only_on_worker, embedder, crops, [embedder.batch_size], 0.0, workers=[w], pure=False
                )
                for w in workers
            ]
        )
        model_rounds, end_to_end_rounds = [], []
        for round_number in range(options.repeat):  # interleaved, so that all see the same machine
            if each_round is not None:
                each_round()
            start_at = time.time() + 1.0
            futures = [
                client.submit(_model_only_on_worker, embedder, crops, share, start_at, workers=[w], pure=False)
                for w, share in zip(workers, shares, strict=True)
            ]
            runs = client.gather(futures)
            seconds = max(r[1] for r in runs) - min(r[0] for r in runs)
            model_rounds.append(harness.rate(sum(r[2] for r in runs), seconds))

            # end to end: from the listing to the parquet files written
            output = shape_dir / f"output-{round_number}"
            started = time.perf_counter()
            dataset = ImageTextPairDataset.from_webdataset(str(tars[0].parent))
            summary = embedder(dataset).save_metadata(path=str(output))
            seconds = time.perf_counter() - started
            images = int(summary["rows"].sum())
            if int(summary["errors"].sum()) or images != sum(sizes):
                raise RuntimeError(f"end to end run lost images: {summary}")
            end_to_end_rounds.append(harness.rate(images, seconds))
        out["model_only"] = harness.best(model_rounds)
        out["end_to_end"] = harness.best(end_to_end_rounds)
        out["peak_gpu_memory_mb_per_worker"] = list(client.run(harness.peak_gpu_memory_mb).values())
        out["model_loads_per_worker"] = [
            counts.get(embedder.model.cache_key, 0) for counts in cache_info(client).values()
        ]
    finally:
        client.close()
        client.cluster.close()
    return out
