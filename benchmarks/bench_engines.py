#!/usr/bin/env python
"""Inference engines on CPU workers: torch against OpenVINO (``ClipImageEmbedder(engine=...)``), in fp32 and bf16,
with ``torch.compile`` and int8 (NNCF) beside them.

Run from the root of a checkout where the ``openvino`` extra is installed::

    .venv/bin/python benchmarks/bench_engines.py           # tiny and ViT-B/32-shaped models (~10 minutes, 2 cores)
    .venv/bin/python benchmarks/bench_engines.py --quick   # fewer images

For each random-weight model shape (``testing.save_random_clip_model``: "tiny", decode-bound; "vit-b-32",
model-bound) it measures, in one run, interleaved over ``--repeat`` rounds (each keeping its best):

1. ``model only``: ``embed`` of the loaded model on preprocessed uint8 crops of the real photos, batches of
   ``--batch-size``, in this process on ``--threads`` threads (what a 1-worker CPU cluster gives the model);
2. ``end to end``: ``from_webdataset`` -> ``ClipImageEmbedder`` -> ``save_metadata`` on a ``LocalCluster``
   with default settings (model load and conversion apart, once per worker, before the rounds);
3. ``cosine``: the smallest cosine of each engine's embeddings to torch fp32's on the real photos
   (``decode_mode="exact"``).

Engines: torch fp32 (``autocast=False``) and bf16 (autocast, where the CPU has AVX512-BF16 or AMX), OpenVINO
fp32 and bf16 (its inference precision hint), ``torch.compile`` of the torch tower (model only; inductor), and
int8 (model only): OpenVINO with ``precision="int8"`` as the library makes it (NNCF's data-free int8 weight
compression, fp32 activations) and NNCF's full post-training quantization calibrated on the real
photos. Ratios are to torch at the same precision.
Results are printed as tables and written as JSON to ``benchmarks/results/`` (gitignored).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness  # first: puts the checkout on sys.path and keeps the hub offline
import numpy as np

ENGINES = {  # name -> ClipImageEmbedder options
    "torch fp32": {"autocast": False},
    "openvino fp32": {"autocast": False, "engine": "openvino"},
    "torch bf16": {"autocast": True},
    "openvino bf16": {"autocast": True, "engine": "openvino"},
}


def real_crops(model_dir: Path, jpegs: list[bytes]) -> list[np.ndarray]:
    """The photos decoded and preprocessed exactly (``uint8 (H, W, 3)``) for ``model_dir``."""
    from dask_clip import ClipImageEmbedder
    from dask_clip.images.preprocess import decode_and_preprocess

    preprocess = ClipImageEmbedder(str(model_dir), autocast=False, decode_mode="exact").preprocess
    return [decode_and_preprocess(data, preprocess) for data in jpegs]


def model_only(model: Any, crops: list[np.ndarray], images: int, batch_size: int) -> dict[str, float]:
    """Embed ``images`` crops (cycling through ``crops``) in batches: one timed run after a warm-up batch."""
    model.embed(crops[:batch_size])
    started, done = time.perf_counter(), 0
    while done < images:
        batch = [crops[(done + k) % len(crops)] for k in range(min(batch_size, images - done))]
        model.embed(batch)
        done += len(batch)
    return harness.rate(done, time.perf_counter() - started)


class CompiledTorch:
    """The torch tower under ``torch.compile`` (inductor), behind the same ``embed`` as the loaded model."""

    def __init__(self, loaded: Any) -> None:
        import torch

        self.loaded = loaded
        self.forward = torch.compile(loaded.model)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        from dask_clip.models.device import run_on_batch

        loaded = self.loaded
        return run_on_batch(
            lambda pixels: getattr(self.forward(pixel_values=pixels), loaded.attribute),
            images,
            loaded.preprocess,
            loaded.device,
            loaded.autocast_dtype,
        )


class NncfOnPhotos:
    """OpenVINO int8, quantized by NNCF calibrated on the real photos (not the library's probe images)."""

    def __init__(self, model_dir: Path, crops: list[np.ndarray], embedder: Any) -> None:
        import nncf
        import openvino as ov
        import torch

        from dask_clip.images.preprocess import to_pixel_values
        from dask_clip.models.clip import load_tower
        from dask_clip.models.openvino import tower_module

        self.preprocess = embedder.preprocess
        family = embedder.description.family
        torch_tower = load_tower(family, str(model_dir), "vision", embedder.embedding_dim)
        tower = tower_module(torch_tower, family.image_attribute)
        pixels = to_pixel_values(crops, self.preprocess, "cpu", torch.float32)
        size = (-1, 3, self.preprocess.crop_height, self.preprocess.crop_width)
        with torch.no_grad():
            converted = ov.convert_model(tower, example_input=pixels[:1], input=[size])
        dataset = nncf.Dataset([pixels[i : i + 1].numpy() for i in range(len(pixels))])
        quantized = nncf.quantize(converted, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels))
        options = {"INFERENCE_NUM_THREADS": torch.get_num_threads()}
        self.compiled = ov.Core().compile_model(quantized, "CPU", options)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        from dask_clip.images.preprocess import to_pixel_values

        pixels = to_pixel_values(images, self.preprocess, "cpu", torch.float32).numpy()
        return np.asarray(self.compiled(pixels)[0], dtype=np.float32)


def smallest_cosine(vectors: np.ndarray, reference: np.ndarray) -> float:
    from dask_clip.models.openvino import smallest_cosine as cosine

    return cosine(vectors, reference)


def measure_shape(shape: str, folder: Path, tars: list[Path], jpegs: list[bytes], options: argparse.Namespace) -> dict:
    """Every engine on one model shape: load times, model-only and end-to-end rates, cosine to torch fp32."""
    import torch

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, clear_cache, get_client, testing

    started = time.perf_counter()
    model_dir = testing.save_random_clip_model(folder / "model", shape=shape)
    cache = str(folder / "openvino-cache")
    crops = real_crops(model_dir, jpegs)
    out: dict[str, Any] = {"load_s": {}, "model_only": {}, "end_to_end": {}, "cosine_to_torch_fp32": {}}

    torch.set_num_threads(options.threads)
    models: dict[str, Any] = {}
    for name, kwargs in ENGINES.items():
        t0 = time.perf_counter()
        models[name] = ClipImageEmbedder(str(model_dir), engine_cache_dir=cache, **kwargs).load_model()
        out["load_s"][name] = time.perf_counter() - t0  # OpenVINO fp32 includes the conversion (bf16 reuses it)
    for precision, kwargs in (("fp32", ENGINES["torch fp32"]), ("bf16", ENGINES["torch bf16"])):
        t0 = time.perf_counter()
        compiled = CompiledTorch(ClipImageEmbedder(str(model_dir), **kwargs).load_model())
        compiled.embed(crops[: options.batch_size])  # compiles
        out["load_s"][f"torch.compile {precision}"] = time.perf_counter() - t0
        models[f"torch.compile {precision}"] = compiled
    t0 = time.perf_counter()
    int8 = ClipImageEmbedder(str(model_dir), engine="openvino", precision="int8", engine_cache_dir=cache)
    models["openvino int8 weights"] = int8.load_model()
    out["load_s"]["openvino int8 weights"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    models["openvino int8 full (photo-calibrated)"] = NncfOnPhotos(model_dir, crops, int8)
    out["load_s"]["openvino int8 full (photo-calibrated)"] = time.perf_counter() - t0
    harness.log(started, f"{shape}: {len(models)} engines loaded")

    reference = models["torch fp32"].embed(crops)
    for name, model in models.items():
        out["cosine_to_torch_fp32"][name] = smallest_cosine(model.embed(crops), reference)

    rounds: dict[str, list] = {name: [] for name in models}
    for _ in range(options.repeat):
        for name, model in models.items():
            rounds[name].append(model_only(model, crops, options.images, options.batch_size))
    out["model_only"] = {name: harness.best(runs) for name, runs in rounds.items()}
    harness.log(started, f"{shape}: model only done")
    del models

    client = get_client("cpu", dashboard_address=":0")
    try:
        out["workers"] = len(client.scheduler_info(n_workers=-1)["workers"])
        embedders = {
            name: ClipImageEmbedder(str(model_dir), engine_cache_dir=cache, batch_size=options.batch_size, **kwargs)
            for name, kwargs in ENGINES.items()
        }
        warm = folder / "warm"
        harness.make_shards(warm, 2, 4)
        for embedder in embedders.values():  # loads (and converts) once per worker, untimed
            embedder(ImageTextPairDataset.from_webdataset(str(warm))).save_metadata(path=str(folder / "warm-out"))
        e2e: dict[str, list] = {name: [] for name in embedders}
        for round_number in range(options.repeat):
            for name, embedder in embedders.items():
                output = folder / f"out-{round_number}-{name.replace(' ', '-')}"
                t0 = time.perf_counter()
                embedder(ImageTextPairDataset.from_webdataset(str(tars[0].parent))).save_metadata(path=str(output))
                e2e[name].append(harness.rate(sum(map(harness.count_images, tars)), time.perf_counter() - t0))
                shutil.rmtree(output)
        out["end_to_end"] = {name: harness.best(runs) for name, runs in e2e.items()}
        clear_cache(client)
    finally:
        client.close()
        client.cluster.close()
    harness.log(started, f"{shape}: end to end done")
    return out


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, avx512_bf16={m['avx512_bf16']}, amx={m['amx']}; torch {m['torch']}, "
        f"openvino {results['openvino']}; {results['threads']} threads model only; load average at start "
        f"{m['load_average_start'][0]:.2f}, at end {results['load_average_end'][0]:.2f}"
    )
    for shape, out in results["shapes"].items():
        print(f"\n{shape}:")
        rows = []
        for name, rate in out["model_only"].items():
            precision = "bf16" if "bf16" in name else "fp32"
            base = out["model_only"][f"torch {precision}"]["images_per_s"]
            e2e = out["end_to_end"].get(name)
            e2e_base = out["end_to_end"][f"torch {precision}"]["images_per_s"]
            rows.append(
                [
                    name,
                    f"{rate['images_per_s']:.1f}",
                    f"{rate['images_per_s'] / base:.2f}x",
                    f"{e2e['images_per_s']:.1f}" if e2e else "-",
                    f"{e2e['images_per_s'] / e2e_base:.2f}x" if e2e else "-",
                    f"{out['cosine_to_torch_fp32'][name]:.6f}",
                    f"{out['load_s'][name]:.1f}",
                ]
            )
        header = ("engine", "model img/s", "vs torch", "end-to-end img/s", "vs torch", "min cosine", "load s")
        harness.print_table(header, rows)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and one round")
    parser.add_argument("--shapes", default="tiny,vit-b-32")
    parser.add_argument("--threads", type=int, default=harness.CORES, help="threads of the model-only runs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--images", type=int, default=256, help="images per model-only run")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=64)
    options = parser.parse_args(argv)
    if options.quick:
        options.repeat, options.images, options.shards, options.per_shard = 1, 64, 2, 32
    return options


def main(argv: list[str]) -> dict[str, Any]:
    import openvino

    options = parse_args(argv)
    results: dict[str, Any] = {"machine": harness.machine(), "openvino": openvino.get_version()}
    results["threads"], results["options"], results["shapes"] = options.threads, vars(options), {}
    folder = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        tars = harness.make_shards(folder / "shards", options.shards, options.per_shard)
        jpegs = harness.jpegs_of(tars, limit=32)
        for shape in options.shapes.split(","):
            results["shapes"][shape] = measure_shape(shape, folder / shape, tars, jpegs, options)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    print_report(results)
    harness.write_results("bench_engines", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
