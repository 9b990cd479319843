"""What every benchmark shares: the shards they read, the machine they ran on, best-of-rounds rates, the
process pool, progress lines and the JSON result files.

Benchmarks run as scripts from the root of a checkout (``.venv/bin/python benchmarks/bench_embed.py``), so
this folder is the first entry of ``sys.path`` and the measurement modules import each other by plain name
(``import harness``). Child processes find them too: spawned processes (the process pool, the workers of
a ``LocalCluster``) inherit the parent's ``sys.path``, and a script run with ``subprocess`` gets its own
folder first again.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random-weight models only: never reach the hub
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np

RESULTS_DIR = ROOT / "benchmarks" / "results"
CORES = os.cpu_count() or 1


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


def images_of(tar_url: str) -> Iterator[bytes]:
    """The encoded image of every sample of a shard that has one, in tar order (a generator)."""
    from dask_clip.io.tar_samples import iter_tar_samples

    for sample in iter_tar_samples(tar_url):
        member = sample.image_member()
        if member is not None:
            yield sample.members[member]


def jpegs_of(tars: list[Path], limit: int | None = None) -> list[bytes]:
    """The encoded images of ``tars`` in order, at most ``limit`` of them."""
    out = []
    for tar in tars:
        for data in images_of(str(tar)):
            out.append(data)
            if limit is not None and len(out) >= limit:
                return out
    return out


def image_sizes(tars: list[Path]) -> tuple[int, int, float]:
    """The shortest short side, the longest long side and the mean short side of the images of ``tars``."""
    from PIL import Image

    sides = [min(Image.open(io.BytesIO(data)).size) for data in jpegs_of(tars)]
    longs = [max(Image.open(io.BytesIO(data)).size) for data in jpegs_of(tars)]
    return min(sides), max(longs), float(np.mean(sides))


def count_images(tar: Path) -> int:
    return sum(1 for _ in images_of(str(tar)))


# --------------------------------------------------------------------------------------------------
# rates


def rate(images: int, seconds: float) -> dict[str, float]:
    """One timed run: ``images`` in ``seconds``."""
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of repeated runs (the one least disturbed by other load), with every round's rate."""
    fastest = max(rounds, key=lambda r: r["images_per_s"])
    return {**fastest, "rounds_images_per_s": [round(r["images_per_s"], 2) for r in rounds]}


# --------------------------------------------------------------------------------------------------
# processes


def _single_threaded() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def process_pool() -> ProcessPoolExecutor:
    """One spawned process per core, each with one torch thread (no oversubscription)."""
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(CORES, mp_context=context, initializer=_single_threaded)


# --------------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    """The CPU (with its AVX2 / AVX-512 bf16 / AMX flags), memory, library versions and load."""
    import dask
    import distributed
    import PIL
    import torch
    import transformers

    with open("/proc/cpuinfo") as file:
        cpuinfo = file.read().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx2": "avx2" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "load_average_start": os.getloadavg(),
    }


def print_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> None:
    """A Markdown table of ``rows`` (cells already formatted) under ``header``, after a blank line."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def log(started: float, message: str) -> None:
    """A progress line, prefixed with the seconds since ``started`` (a ``time.perf_counter()``)."""
    print(f"[{time.perf_counter() - started:6.0f}s] {message}", flush=True)


def peak_gpu_memory_mb() -> float | None:
    """The most GPU memory torch has held in this process since it started, in MiB; None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def write_results(name: str, results: dict[str, Any]) -> Path:
    """``results`` as ``benchmarks/results/<name>-<timestamp>.json`` (gitignored); prints and returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path}")
    return path


@contextmanager
def work_folder(prefix: str, parent: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder (under ``parent``, a benchmark's ``--work-dir``), removed with all it holds after."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def finish(name: str, results: dict[str, Any], started: float, report: Callable[[dict[str, Any]], None]) -> None:
    """Record ``total_s`` since ``started`` in ``results``, print them with ``report``, and ``write_results``."""
    results["total_s"] = time.perf_counter() - started
    report(results)
    write_results(name, results)
