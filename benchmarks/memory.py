"""Peak RSS of one process embedding one shard, for a shard of 500 and one of 5000 images (250 and 2500
with ``--quick``): streaming a shard should cost the same memory whatever its length.

Each shard is embedded by a fresh process running this file as a script, as a Dask worker would (one
OpenMP thread, dask_clip's malloc tuning, the model loaded through the per-process cache, the shard
computed by ``embedder(dataset).metadata``). Its peak is read from ``VmHWM`` and also sampled from outside.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (run as a script: the checkout on sys.path, the hub offline)
import numpy as np

SCRIPT = str(Path(__file__).resolve())


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


def embed_shard(folder: str, model_dir: str, batch_size: int) -> None:
    """(In the child process.) Embed the one shard of ``folder`` as a worker would and print a JSON line."""
    import psutil

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset
    from dask_clip.distributed.worker_setup import reuse_freed_memory

    reuse_freed_memory()  # what MemoryTuningPlugin does when a worker starts
    embedder = ClipImageEmbedder(model_dir, batch_size=batch_size)
    embedder.model.get()
    after_load = psutil.Process().memory_info().rss
    print(json.dumps({"event": "loaded", "rss_mb": after_load / 2**20}), flush=True)
    frame = embedder(ImageTextPairDataset.from_webdataset(folder)).metadata.compute(scheduler="synchronous")
    print(
        json.dumps(
            {
                "event": "done",
                "rows": len(frame),
                "embedded": int(frame["image_embedding"].notna().sum()),
                "after_load_mb": after_load / 2**20,
                "vm_hwm_mb": vm_hwm_mb(),
            }
        ),
        flush=True,
    )


def vm_hwm_mb() -> float:
    """This process's peak RSS (``VmHWM``). Unlike ``ru_maxrss``, it does not carry over the RSS of the
    (large) parent that forked this process before ``exec``."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def peak_rss(folder: Path, model_dir: Path, batch_size: int) -> dict[str, float]:
    """Run ``embed_shard`` on ``folder`` in a child process; its peak RSS, read and sampled."""
    import psutil

    env = dict(os.environ, OMP_NUM_THREADS="1")  # as in a Dask worker
    command = [sys.executable, SCRIPT, str(folder), str(model_dir), str(batch_size)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    watched = psutil.Process(process.pid)
    peak, samples, stop = [0], [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                if SCRIPT not in watched.cmdline():  # still the fork of this (large) process, before exec
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
    return {
        "rows": done["rows"],
        "embedded": done["embedded"],
        "after_load_mb": done["after_load_mb"],
        "peak_rss_mb_sampled": peak[0] / 2**20,
        "peak_rss_mb": done["vm_hwm_mb"],
        "samples": samples[0],
    }


def small_vs_large(work: Path, model_dir: Path, small: int, large: int, batch_size: int) -> dict[str, Any]:
    """``peak_rss`` of a shard of ``small`` images and one of ``large`` images (written under ``work``)."""
    rss: dict[str, Any] = {}
    for name, images in (("small", small), ("large", large)):
        folder = work / f"rss-{images}"
        make_small_image_shard(folder, images)
        rss[name] = peak_rss(folder, model_dir, batch_size)
    rss["ratio"] = rss["large"]["peak_rss_mb"] / rss["small"]["peak_rss_mb"]
    return rss


if __name__ == "__main__":
    embed_shard(sys.argv[1], sys.argv[2], int(sys.argv[3]))
