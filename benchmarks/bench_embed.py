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
   workers of the same cluster as the end-to-end run (same batch size, dtype and torch threads);
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
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-weight models only: never reach the hub
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"

# (shards, images per shard) per model shape: enough work for a few seconds per measurement
SIZES = {
    "full": {"tiny": (8, 192), "vit-b-32": (8, 32)},
    "quick": {"tiny": (4, 64), "vit-b-32": (4, 16)},
}
RSS_SHARD_SIZES = {"full": (500, 5000), "quick": (250, 2500)}
REPEAT = {"full": 2, "quick": 1}  # each measurement keeps the best of this many rounds
GRAPH_SHARDS = {"full": 10_000, "quick": 2_000}
AGREEMENT_IMAGES = 48


# --------------------------------------------------------------------------------------------------
# data


def make_shards(folder: Path, n_shards: int, per_shard: int) -> list[Path]:
    """``n_shards`` img2dataset shards of real photos at their original sizes, no failed download.

    One ``make_img2dataset_shards`` call per shard keeps its distinct crops small (it trims a few
    more rows as its sample counter grows), so every shard holds the same photos, shuffled differently.
    """
    from dask_clip import testing

    photos = testing.sample_photos()
    tars = []
    for number in range(n_shards):
        tars += testing.make_img2dataset_shards(
            folder, shard_numbers=[number], samples_per_shard=per_shard, failed_per_shard=0, seed=number, photos=photos
        )
    return tars


def jpegs_of(tars: list[Path], limit: int | None = None) -> list[bytes]:
    from dask_clip.io.tar_samples import iter_tar_samples

    out = []
    for tar in tars:
        for sample in iter_tar_samples(str(tar)):
            if "jpg" in sample.members:
                out.append(sample.members["jpg"])
                if limit is not None and len(out) >= limit:
                    return out
    return out


def image_sizes(tars: list[Path]) -> tuple[int, int, float]:
    from PIL import Image

    sides = [min(Image.open(io.BytesIO(data)).size) for data in jpegs_of(tars)]
    longs = [max(Image.open(io.BytesIO(data)).size) for data in jpegs_of(tars)]
    return min(sides), max(longs), float(np.mean(sides))


# --------------------------------------------------------------------------------------------------
# process-pool measurements (decode only, HF processor only): one process per core


def _pool_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _pool_warm(model_dir: str, seconds: float) -> int:
    from transformers import CLIPImageProcessor  # noqa: F401  (import cost stays out of the timing)

    import dask_clip.embedders.image_preprocessing  # noqa: F401

    _processor(model_dir)
    time.sleep(seconds)  # keeps this process busy so that every process of the pool gets a warm-up
    return os.getpid()


def _decode_shard(tar_url: str, config: Any, batch_size: int) -> int:
    """Decode and preprocess every image of a shard as the embedder does (``decode_mode="device"``: JPEGs
    in batches on the GPU when there is one, else on the CPU); returns the number of images."""
    import torch

    from dask_clip.embedders.device_decode import EncodedJpeg, decode_on_device, prepare_image
    from dask_clip.embedders.inference import resolve_device
    from dask_clip.io.tar_samples import iter_tar_samples

    device = resolve_device(None)
    count, encoded = 0, []
    for sample in iter_tar_samples(tar_url):
        if "jpg" in sample.members:
            prepared = prepare_image(sample.members["jpg"], config)
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


_PROCESSORS: dict[str, Any] = {}


def _processor(model_dir: str) -> Any:
    from transformers import CLIPImageProcessor

    if model_dir not in _PROCESSORS:
        _PROCESSORS[model_dir] = CLIPImageProcessor.from_pretrained(model_dir)
    return _PROCESSORS[model_dir]


def _hf_processor_shard(tar_url: str, model_dir: str, batch_size: int) -> int:
    from PIL import Image

    from dask_clip.io.tar_samples import iter_tar_samples

    processor = _processor(model_dir)
    count, batch = 0, []
    for sample in iter_tar_samples(tar_url):
        if "jpg" in sample.members:
            batch.append(Image.open(io.BytesIO(sample.members["jpg"])))
            if len(batch) == batch_size:
                processor(images=batch, return_tensors="pt")
                count, batch = count + len(batch), []
    if batch:
        processor(images=batch, return_tensors="pt")
        count += len(batch)
    return count


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (the one least disturbed by other load), with every round's rate."""
    fastest = max(rounds, key=lambda r: r["images_per_s"])
    return {**fastest, "rounds_images_per_s": [round(r["images_per_s"], 2) for r in rounds]}


def pool_throughput(pool: ProcessPoolExecutor, function: Any, tars: list[Path], *args: Any) -> dict[str, float]:
    started = time.perf_counter()
    counts = list(pool.map(function, [str(t) for t in tars], *[[a] * len(tars) for a in args]))
    seconds = time.perf_counter() - started
    return {"images": sum(counts), "seconds": seconds, "images_per_s": sum(counts) / seconds}


# --------------------------------------------------------------------------------------------------
# cluster measurements


def _load_on_worker(embedder: Any) -> dict[str, float]:
    import torch

    from dask_clip.distributed.model_cache import get_or_load

    started = time.perf_counter()
    get_or_load(embedder.cache_key, embedder.load_model)
    return {"load_s": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}


def _model_only_on_worker(embedder: Any, crops: list[np.ndarray], shard_sizes: list[int], start_at: float) -> tuple:
    """Embed ``shard_sizes`` images (batched per shard, as a shard task does) from preprocessed crops."""
    from dask_clip.distributed.model_cache import get_or_load
    from dask_clip.embedders.base import l2_normalize

    model = get_or_load(embedder.cache_key, embedder.load_model)
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
    shape_dir: Path, tars: list[Path], model_dir: Path, crops: list[np.ndarray], options: argparse.Namespace,
    each_round: Any = None,
) -> dict[str, Any]:
    """Start a LocalCluster, load the model, then ``options.repeat`` rounds of: ``each_round()`` (the
    measurements outside the cluster), model only, end to end. Interleaved so that every measurement
    sees the same (shared, noisy) machine; each keeps its best round."""
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, cache_info, get_client

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
        out["threads_per_worker"] = sorted({w["nthreads"] for w in client.scheduler_info(n_workers=-1)["workers"].values()})
        if options.torch_threads:
            client.run(_set_torch_threads, options.torch_threads)
        embedder = ClipImageEmbedder(str(model_dir), **embedder_kwargs(options))
        out["embedder"] = {"batch_size": embedder.batch_size, "decode_threads": embedder.decode_threads,
                           "autocast": embedder.autocast, "decode_mode": embedder.decode_mode}

        started = time.perf_counter()
        loads = client.gather([client.submit(_load_on_worker, embedder, workers=[w], pure=False) for w in workers])
        out["model_load_s"] = time.perf_counter() - started
        out["model_load_s_per_worker"] = [round(x["load_s"], 3) for x in loads]
        out["torch_threads_per_worker"] = [x["torch_threads"] for x in loads]

        # warm-up end to end on a small copy (imports, first parquet write), never timed
        warm = shape_dir / "warm"
        make_shards(warm, len(workers), 4)
        embedder(ImageTextPairDataset.from_webdataset(str(warm))).save_metadata(path=str(shape_dir / "warm-out"))

        # model only: each worker embeds the images of its share of the shards, all workers at once
        sizes = [count_images(t) for t in tars]
        shares = [sizes[i :: len(workers)] for i in range(len(workers))]
        # one untimed batch per worker first (first-call allocations and kernel set-up)
        client.gather([client.submit(_model_only_on_worker, embedder, crops, [embedder.batch_size], 0.0,
                                     workers=[w], pure=False) for w in workers])
        model_rounds, end_to_end_rounds = [], []
        for round_number in range(options.repeat):  # interleaved, so that all see the same machine
            if each_round is not None:
                each_round()
            start_at = time.time() + 1.0
            futures = [
                client.submit(_model_only_on_worker, embedder, crops, share, start_at, workers=[w], pure=False)
                for w, share in zip(workers, shares)
            ]
            runs = client.gather(futures)
            seconds = max(r[1] for r in runs) - min(r[0] for r in runs)
            images = sum(r[2] for r in runs)
            model_rounds.append({"images": images, "seconds": seconds, "images_per_s": images / seconds})

            # end to end: from the listing to the parquet files written
            output = shape_dir / f"output-{round_number}"
            started = time.perf_counter()
            dataset = ImageTextPairDataset.from_webdataset(str(tars[0].parent))
            summary = embedder(dataset).save_metadata(path=str(output))
            seconds = time.perf_counter() - started
            images = int(summary["rows"].sum())
            if int(summary["errors"].sum()) or images != sum(sizes):
                raise RuntimeError(f"end to end run lost images: {summary}")
            end_to_end_rounds.append({"images": images, "seconds": seconds, "images_per_s": images / seconds})
        out["model_only"] = best(model_rounds)
        out["end_to_end"] = best(end_to_end_rounds)
        out["model_loads_per_worker"] = [counts.get(embedder.cache_key, 0) for counts in cache_info(client).values()]
    finally:
        client.close()
        client.cluster.close()
    return out


def embedder_kwargs(options: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"model_inference_batch_size": options.batch_size}
    if options.decode_threads:
        kwargs["decode_threads"] = options.decode_threads
    if options.decode_mode:
        kwargs["decode_mode"] = options.decode_mode
    if options.no_autocast:
        kwargs["autocast"] = False
    return kwargs


def count_images(tar: Path) -> int:
    with tarfile.open(tar) as archive:
        return sum(1 for name in archive.getnames() if name.endswith(".jpg"))


# --------------------------------------------------------------------------------------------------
# the plain loop a user would write, and the agreement of the fast decode


def plain_loop(tars: list[Path], model_dir: Path, batch_size: int) -> dict[str, Any]:
    """``CLIPImageProcessor`` + ``CLIPModel.get_image_features`` over every image, one process, fp32."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    embeddings = []

    def flush(images: list[Any]) -> None:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)  # transformers 5 returns an output object
        embeddings.append(torch.nn.functional.normalize(features, dim=-1).numpy())

    started = time.perf_counter()
    for tar in tars:
        with tarfile.open(tar) as archive:
            batch = []
            for member in archive:
                if member.name.endswith(".jpg"):
                    batch.append(Image.open(io.BytesIO(archive.extractfile(member).read())))
                    if len(batch) == batch_size:
                        flush(batch)
                        batch = []
            if batch:
                flush(batch)
    seconds = time.perf_counter() - started
    images = sum(len(e) for e in embeddings)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds, "torch_threads": torch.get_num_threads()}


def agreement(model_dir: Path, jpegs: list[bytes]) -> dict[str, float]:
    """Cosine of final embeddings: fast vs exact decode, and each vs transformers' own pipeline."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPModel

    from dask_clip.embedders.base import l2_normalize
    from dask_clip.embedders.clip import ClipVisionModel
    from dask_clip.embedders.image_preprocessing import decode_and_preprocess

    exact = ClipVisionModel(str(model_dir), "cpu", False, 10**9, decode_mode="exact")
    fast = ClipVisionModel(str(model_dir), "cpu", False, 10**9, decode_mode="fast")
    e_exact = l2_normalize(exact.embed([decode_and_preprocess(j, exact.preprocess) for j in jpegs]))
    e_fast = l2_normalize(fast.embed([decode_and_preprocess(j, fast.preprocess) for j in jpegs]))
    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPImageProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        pixels = processor(images=[Image.open(io.BytesIO(j)) for j in jpegs], return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels)
    reference = l2_normalize(getattr(features, "pooler_output", features).numpy())
    cos_fast_exact = np.sum(e_fast * e_exact, axis=1)
    cos_exact_ref = np.sum(e_exact * reference, axis=1)
    cos_fast_ref = np.sum(e_fast * reference, axis=1)
    return {
        "images": len(jpegs),
        "fast_vs_exact_min": float(cos_fast_exact.min()), "fast_vs_exact_mean": float(cos_fast_exact.mean()),
        "exact_vs_transformers_min": float(cos_exact_ref.min()),
        "fast_vs_transformers_min": float(cos_fast_ref.min()), "fast_vs_transformers_mean": float(cos_fast_ref.mean()),
    }


# --------------------------------------------------------------------------------------------------
# memory: peak RSS of one process embedding one shard of 500 vs 5000 small images


def make_small_image_shard(folder: Path, images: int, seed: int = 0) -> Path:
    """One shard of ``images`` JPEGs whose shortest side is 256-400 px (48 distinct images, cycled)."""
    from PIL import Image

    from dask_clip import testing

    rng = np.random.default_rng(seed)
    photos = list(testing.sample_photos().values())
    variants = []
    for index in range(48):
        photo = photos[index % len(photos)]
        side = int(rng.integers(256, 401))
        height, width = photo.shape[:2]
        scale = side / min(height, width)
        resized = Image.fromarray(photo).resize((max(side, round(width * scale)), max(side, round(height * scale))))
        variants.append(testing.encode_jpeg(np.asarray(resized)))
    rows, members = [], {}
    for index in range(images):
        key = testing.img2dataset_key(0, index, index_digits=5)
        rows.append({"url": f"file:///small/{index}.jpg", "caption": "a photo", "key": key, "status": "success"})
        members[key] = {"jpg": variants[index % len(variants)], "txt": b"a photo"}
    tar, _ = testing.write_shard(folder, 0, rows, members)
    return tar


def rss_child(folder: str, model_dir: str, batch_size: int) -> None:
    """(In a subprocess.) Embed the one shard of ``folder`` as a worker would and print a JSON line."""
    import psutil

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset
    from dask_clip.distributed.model_cache import get_or_load

    embedder = ClipImageEmbedder(model_dir, model_inference_batch_size=batch_size)
    get_or_load(embedder.cache_key, embedder.load_model)
    after_load = psutil.Process().memory_info().rss
    print(json.dumps({"event": "loaded", "rss_mb": after_load / 2**20}), flush=True)
    frame = embedder(ImageTextPairDataset.from_webdataset(folder)).metadata.compute(scheduler="synchronous")
    print(json.dumps({
        "event": "done", "rows": len(frame), "embedded": int(frame["image_embedding"].notna().sum()),
        "after_load_mb": after_load / 2**20, "vm_hwm_mb": vm_hwm_mb(),
    }), flush=True)


def vm_hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``). Unlike ``ru_maxrss``, it does not carry over the RSS of the
    (large) parent that forked this process before ``exec``."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_rss(folder: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1")  # as in a Dask worker
    command = [sys.executable, __file__, "--rss-child", str(folder), str(model_dir), str(batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    watched = psutil.Process(process.pid)
    peak, samples, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                if "--rss-child" not in watched.cmdline():  # still the fork of this (large) process, before exec
                    time.sleep(0.001)
                    continue
                peak[0] = max(peak[0], watched.memory_info().rss)
                samples[0] += 1
            except psutil.Error:
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = process.communicate(timeout=900)
    stop.set()
    sampler.join()
    if process.returncode:
        raise RuntimeError(f"RSS child failed ({process.returncode})")
    done = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")][-1]
    return {"rows": done["rows"], "embedded": done["embedded"], "after_load_mb": done["after_load_mb"],
            "peak_rss_mb_sampled": peak[0] / 2**20, "peak_rss_mb": done["vm_hwm_mb"], "samples": samples[0]}


# --------------------------------------------------------------------------------------------------
# graph build over many shards


def _write_tiny_shards(folder: str, numbers: list[int], payload: bytes) -> int:
    from dask_clip import testing

    for number in numbers:
        key = testing.img2dataset_key(number, 0, shard_digits=6)
        row = {"url": f"file:///tiny/{number}.jpg", "caption": "tiny", "key": key, "status": "success"}
        testing.write_shard(folder, number, [row], {key: {"jpg": payload}})
    return len(numbers)


def graph_build(folder: Path, model_dir: Path, shards: int, pool: ProcessPoolExecutor) -> dict[str, Any]:
    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, testing

    payload = testing.encode_jpeg(np.full((16, 16, 3), 128, dtype=np.uint8))
    started = time.perf_counter()
    chunks = [list(range(start, min(start + 500, shards))) for start in range(0, shards, 500)]
    written = sum(pool.map(_write_tiny_shards, [str(folder)] * len(chunks), chunks, [payload] * len(chunks)))
    write_s = time.perf_counter() - started

    opened: list[str] = []
    recording = threading.Event()

    def audit(event: str, args: tuple) -> None:
        if recording.is_set() and event == "open" and isinstance(args[0], (str, os.PathLike)):
            opened.append(os.fspath(args[0]))

    sys.addaudithook(audit)  # cannot be removed: it records only while ``recording`` is set
    recording.set()
    started = time.perf_counter()
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    discovered = time.perf_counter()
    embedded = ClipImageEmbedder(str(model_dir))(dataset)
    built = time.perf_counter()
    graph = embedded.metadata.__dask_graph__()
    materialized = time.perf_counter()
    recording.clear()
    return {
        "shards": written, "write_s": write_s,
        "from_webdataset_s": discovered - started, "embedder_call_s": built - discovered,
        "build_s": built - started, "graph_materialize_s": materialized - built, "graph_tasks": len(graph),
        "tar_opens_on_client": sum(p.endswith(".tar") for p in opened),
        "parquet_opens_on_client": sum(p.endswith(".parquet") for p in opened),
    }


# --------------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    import PIL
    import torch
    import transformers

    import dask
    import distributed

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return {
        "cpu": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags, "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "pillow": PIL.__version__, "dask": dask.__version__, "distributed": distributed.__version__,
        "load_average_start": os.getloadavg(),
    }


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
        "decode_exact_vs_hf_processor": shape["decode_only_exact"]["images_per_s"] / shape["hf_processor_only"]["images_per_s"],
    }


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, AVX2 {m['avx2']}, "
          f"native bf16 {m['avx512_bf16'] or m['amx']}; torch {m['torch']}, transformers {m['transformers']}, "
          f"Pillow {m['pillow']}, distributed {m['distributed']}; load average at start {m['load_average_start'][0]:.2f}")
    header = ("shape", "images", "model only", "decode only", "HF proc only", "end to end", "plain loop",
              "efficiency", "speedup", "decode/HF")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for name, shape in results["shapes"].items():
        s = shape["summary"]
        cells = [
            name, str(shape["images"]),
            *(f"{shape[k]['images_per_s']:.1f}" for k in ("model_only", "decode_only", "hf_processor_only", "end_to_end", "plain_loop")),
            f"{s['efficiency']:.2f}", f"{s['speedup']:.2f}x", f"{s['decode_vs_hf_processor']:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |")
    print("\n(images/s; efficiency = end to end / (1/(1/model only + 1/decode only)); speedup = end to end / plain loop)")
    for name, shape in results["shapes"].items():
        e, a = shape["embedder"], shape["agreement"]
        print(f"\n{name}: {shape['workers']} workers x {shape['threads_per_worker']} threads, torch threads "
              f"{shape['torch_threads_per_worker']}, batch {e['batch_size']}, decode_threads {e['decode_threads']}, "
              f"decode_mode {e['decode_mode']}, autocast {e['autocast']}; plain loop torch threads {shape['plain_loop']['torch_threads']}")
        print(f"  cluster start-up {shape['cluster_startup_s']:.1f}s, model load {shape['model_load_s']:.1f}s "
              f"(not in end to end); end to end {shape['end_to_end']['seconds']:.1f}s for {shape['end_to_end']['images']} images; "
              f"decode only exact mode {shape['decode_only_exact']['images_per_s']:.1f} img/s, fast mode "
              f"{shape['decode_only_fast']['images_per_s']:.1f} img/s (exact / HF processor "
              f"{shape['summary']['decode_exact_vs_hf_processor']:.2f}x)")
        print(f"  agreement on {a['images']} photos (cosine): fast vs exact min {a['fast_vs_exact_min']:.5f} "
              f"mean {a['fast_vs_exact_mean']:.5f}; exact vs transformers min {a['exact_vs_transformers_min']:.6f}; "
              f"fast vs transformers min {a['fast_vs_transformers_min']:.5f}")
    if "rss" in results:
        r = results["rss"]
        print(f"\npeak RSS embedding one shard (tiny model): {r['small']['rows']} images {r['small']['peak_rss_mb']:.0f} MB, "
              f"{r['large']['rows']} images {r['large']['peak_rss_mb']:.0f} MB (VmHWM; ratio {r['ratio']:.3f}; sampled "
              f"{r['small']['peak_rss_mb_sampled']:.0f} / {r['large']['peak_rss_mb_sampled']:.0f} MB; "
              f"after model load {r['small']['after_load_mb']:.0f} / {r['large']['after_load_mb']:.0f} MB)")
    if "graph" in results:
        g = results["graph"]
        print(f"graph build over {g['shards']} shards: from_webdataset {g['from_webdataset_s']:.2f}s + embedder(ds) "
              f"{g['embedder_call_s']:.2f}s = {g['build_s']:.2f}s; materializing the {g['graph_tasks']}-task graph "
              f"{g['graph_materialize_s']:.2f}s; tars opened on the client: {g['tar_opens_on_client']}, parquets: "
              f"{g['parquet_opens_on_client']}")
    print(f"\ntotal {results['total_s']:.0f}s; load average at end {results['load_average_end'][0]:.2f}")


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and shards: a couple of minutes")
    parser.add_argument("--shapes", default="tiny,vit-b-32", help="model shapes, comma-separated")
    parser.add_argument("--batch-size", type=int, default=32, help="model_inference_batch_size (default: the embedder's)")
    parser.add_argument("--decode-threads", type=int, default=None, help="decode_threads (default: the embedder's)")
    parser.add_argument("--decode-mode", choices=("fast", "exact", "device"), default=None, help="default: the embedder's")
    parser.add_argument("--no-autocast", action="store_true", help="autocast=False (default: the embedder's)")
    parser.add_argument("--workers", type=int, default=None, help="LocalCluster n_workers (default: Dask's)")
    parser.add_argument("--threads-per-worker", type=int, default=None, help="LocalCluster threads_per_worker")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads on each worker (experiment)")
    parser.add_argument("--repeat", type=int, default=None, help="rounds per measurement, best kept (default: 2, quick 1)")
    parser.add_argument("--skip-extras", action="store_true", help="skip the RSS and graph-build measurements")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--rss-child", nargs=3, metavar=("FOLDER", "MODEL_DIR", "BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> dict[str, Any]:
    options = parse_args(argv)
    if options.rss_child:
        folder, model_dir, batch = options.rss_child
        rss_child(folder, model_dir, int(batch))
        return {}
    import logging

    import torch

    from dask_clip import testing
    from dask_clip.embedders.clip import ClipImageEmbedder
    from dask_clip.embedders.image_preprocessing import decode_and_preprocess

    logging.getLogger("distributed").setLevel(logging.ERROR)
    mode = "quick" if options.quick else "full"
    options.repeat = options.repeat or REPEAT[mode]
    started = time.perf_counter()
    results: dict[str, Any] = {"mode": mode, "options": {k: v for k, v in vars(options).items() if k != "rss_child"},
                               "machine": machine(), "shapes": {}}
    work = Path(tempfile.mkdtemp(prefix="dask_clip_bench_"))
    cores = os.cpu_count() or 1
    context = multiprocessing.get_context("spawn")
    try:
        with ProcessPoolExecutor(cores, mp_context=context, initializer=_pool_init) as pool:
            for shape in options.shapes.split(","):
                print(f"[{time.perf_counter() - started:6.0f}s] {shape}: writing model and shards", flush=True)
                shape_dir = work / shape
                model_dir = testing.save_random_clip_model(shape_dir / "model", shape=shape)
                n_shards, per_shard = SIZES[mode][shape]
                tars = make_shards(shape_dir / "shards", n_shards, per_shard)
                smallest, largest, mean_short = image_sizes(tars[:1])
                entry: dict[str, Any] = {"shards": n_shards, "images": sum(count_images(t) for t in tars),
                                         "image_short_side_min": smallest, "image_long_side_max": largest,
                                         "image_short_side_mean": mean_short}
                probe = ClipImageEmbedder(str(model_dir), **embedder_kwargs(options))
                modes = sorted({"exact", "fast", probe.decode_mode})
                configs = {m: _preprocess_config(model_dir, m, probe) for m in modes}

                list(pool.map(_pool_warm, [str(model_dir)] * cores * 2, [0.3] * cores * 2))
                rounds: dict[str, list] = {k: [] for k in [f"decode_only_{m}" for m in modes] + ["hf_processor_only", "plain_loop"]}

                def each_round() -> None:
                    print(f"[{time.perf_counter() - started:6.0f}s] {shape}: round: decode only, HF processor only, "
                          "plain loop, then model only and end to end on the cluster", flush=True)
                    for m in modes:
                        rounds[f"decode_only_{m}"].append(
                            pool_throughput(pool, _decode_shard, tars, configs[m], options.batch_size))
                    rounds["hf_processor_only"].append(
                        pool_throughput(pool, _hf_processor_shard, tars, str(model_dir), options.batch_size))
                    rounds["plain_loop"].append(plain_loop(tars, model_dir, options.batch_size))

                crops = [decode_and_preprocess(j, configs[probe.decode_mode]) for j in jpegs_of(tars, 32)]
                entry.update(cluster_measurements(shape_dir, tars, model_dir, crops, options, each_round))
                entry.update({name: best(values) for name, values in rounds.items()})
                entry["decode_only"] = entry[f"decode_only_{probe.decode_mode}"]
                entry["agreement"] = agreement(model_dir, jpegs_of(tars, AGREEMENT_IMAGES))
                entry["summary"] = summarize(entry)
                results["shapes"][shape] = entry
                print(f"[{time.perf_counter() - started:6.0f}s] {shape}: {json.dumps(entry['summary'])}", flush=True)

            if not options.skip_extras:
                print(f"[{time.perf_counter() - started:6.0f}s] peak RSS, 500 vs 5000 images", flush=True)
                tiny = work / "tiny" / "model"
                if not tiny.exists():
                    testing.save_random_clip_model(tiny, shape="tiny")
                small_n, large_n = RSS_SHARD_SIZES[mode]
                rss = {}
                for name, n in (("small", small_n), ("large", large_n)):
                    folder = work / f"rss-{n}"
                    make_small_image_shard(folder, n)
                    rss[name] = peak_rss(folder, tiny, options.batch_size)
                rss["ratio"] = rss["large"]["peak_rss_mb"] / rss["small"]["peak_rss_mb"]
                results["rss"] = rss
                print(f"[{time.perf_counter() - started:6.0f}s] graph build over {GRAPH_SHARDS[mode]} shards", flush=True)
                results["graph"] = graph_build(work / "many", tiny, GRAPH_SHARDS[mode], pool)
    finally:
        if options.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - started
    results["load_average_end"] = os.getloadavg()
    print_report(results)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    path = RESULTS_DIR / f"bench_embed-{mode}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return results


def _preprocess_config(model_dir: Path, decode_mode: str, embedder: Any) -> Any:
    """The ``PreprocessConfig`` the workers use for ``decode_mode`` (without loading weights)."""
    from dask_clip.embedders.clip import preprocess_config

    return preprocess_config(str(model_dir), embedder.max_image_pixels, decode_mode)


if __name__ == "__main__":
    main(sys.argv[1:])
