#!/usr/bin/env python
"""Decode + preprocess throughput of each ``decode_mode`` on one core, and what each leaves on the host.

Run from the root of a checkout (``--device cuda`` on a GPU machine measures nvJPEG)::

    .venv/bin/python benchmarks/bench_decode.py                 # the CPU, about a minute
    .venv/bin/python benchmarks/bench_decode.py --device cuda   # the GPU path

The images are the real photos of ``dask_clip.testing.sample_photos`` re-encoded as JPEG at each
``--long-sides`` (the long side in pixels; 0 keeps the original 191 to 1411 px). For each mode the
pipeline is the embedder's, minus reading tars and the model: ``prepare_image`` per image (what a decode
thread does), then for ``device`` the batched ``decode_on_device``, then ``to_pixel_values`` on
``--device``. Everything runs on one thread (torch too), so images/s is per core of the host.
``host_ms`` is the process CPU time per image: on a GPU it is what ``device`` leaves to the decode
threads. ``mean_abs_vs_exact`` compares the final uint8 crops with those of ``exact`` (0-255 levels).

Each mode runs ``--repeat`` interleaved rounds and keeps its fastest; JSON goes to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import harness  # first: puts the checkout on sys.path
import numpy as np
import torch
from PIL import Image

from dask_clip import testing
from dask_clip.images.device_decode import EncodedJpeg, decode_on_device, prepare_image
from dask_clip.images.preprocess import DECODE_MODES, PreprocessConfig, to_pixel_values


def jpegs_at(long_side: int) -> list[bytes]:
    """Every sample photo as a quality-90 JPEG whose long side is ``long_side`` (0: original size)."""
    out = []
    for pixels in testing.sample_photos().values():
        image = Image.fromarray(pixels).convert("RGB")
        if long_side:
            scale = long_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        out.append(testing.encode_jpeg(np.asarray(image)))
    return out


def preprocess_batch(jpegs: list[bytes], config: PreprocessConfig, device: str) -> tuple[Any, list[np.ndarray]]:
    """The embedder's path for one batch: normalised pixels on ``device``, and the uint8 crops (HWC)."""
    prepared = [prepare_image(data, config) for data in jpegs]
    encoded = [item for item in prepared if isinstance(item, EncodedJpeg)]
    decoded = iter(decode_on_device(encoded, config, device) if encoded else [])
    crops = [next(decoded) if isinstance(item, EncodedJpeg) else item for item in prepared]
    pixels = to_pixel_values(crops, config, device, torch.float32)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return pixels, [crop.permute(1, 2, 0).cpu().numpy() if isinstance(crop, torch.Tensor) else crop for crop in crops]


def measure(
    jpegs: list[bytes], config: PreprocessConfig, device: str, batch_size: int, min_seconds: float
) -> dict[str, float]:
    """Images/s and host CPU ms per image over whole passes of ``jpegs`` until ``min_seconds`` have passed."""
    images, wall_started, cpu_started = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - wall_started < min_seconds:
        for start in range(0, len(jpegs), batch_size):
            preprocess_batch(jpegs[start : start + batch_size], config, device)
        images += len(jpegs)
    wall, cpu = time.perf_counter() - wall_started, time.process_time() - cpu_started
    return {"images_per_s": images / wall, "host_ms": 1000 * cpu / images, "images": images}


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument(
        "--long-sides", default="0,1024,2048", help="JPEG long sides in px, 0 = original (default: 0,1024,2048)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default: 32)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per mode, best kept (default: 3)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per round (default: 3)")
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    configs = {mode: PreprocessConfig().with_decode_mode(mode) for mode in DECODE_MODES}
    results: dict[str, Any] = {
        "options": vars(options),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name() if options.device.startswith("cuda") else "cpu",
        "sizes": {},
    }
    for long_side in [int(side) for side in options.long_sides.split(",")]:
        jpegs = jpegs_at(long_side)
        crops = {
            mode: np.concatenate(preprocess_batch(jpegs, config, options.device)[1]) for mode, config in configs.items()
        }
        rounds: dict[str, list[dict[str, float]]] = {mode: [] for mode in configs}
        for _ in range(options.repeat):
            for mode, config in configs.items():
                rounds[mode].append(measure(jpegs, config, options.device, options.batch_size, options.seconds))
        entry = {}
        for mode in configs:
            fastest = max(rounds[mode], key=lambda round_: round_["images_per_s"])
            difference = np.abs(crops[mode].astype(np.int16) - crops["exact"])
            entry[mode] = {**fastest, "mean_abs_vs_exact": float(difference.mean()), "rounds": rounds[mode]}
        for mode in configs:
            entry[mode]["ratio_vs_exact"] = entry[mode]["images_per_s"] / entry["exact"]["images_per_s"]
        results["sizes"][long_side or "original"] = entry
        print(f"long side {long_side or 'original'} ({len(jpegs)} JPEGs, {options.device}):")
        for mode in configs:
            row = entry[mode]
            print(
                f"  {mode:6s} {row['images_per_s']:8.1f} images/s  x{row['ratio_vs_exact']:.2f} vs exact  "
                f"host {row['host_ms']:6.2f} ms/image  mean |crop - exact| {row['mean_abs_vs_exact']:.3f}"
            )
    results["peak_gpu_memory_mb"] = harness.peak_gpu_memory_mb()
    harness.write_results(f"bench_decode-{options.device.replace(':', '')}", results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
