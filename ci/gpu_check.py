#!/usr/bin/env python
"""The GPU check: every figure of dask_clip on one GPU, into ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``.

    python ci/gpu_check.py OUT [--rehearse] [--wheelhouse DIR]     (ci/gpu_check.sh runs this)

Steps, in order (each one's figures go under its name in the JSON, written again after every step; a failing step
is recorded and the others still run; the exit status is 1 when any failed; ``--steps`` runs some of them):

- ``environment``: versions; pyproject.toml's floors and the carried wheels' requirements met by what is
  installed (a version clash shows here, named); faiss and cudf never imported; what the driver and torch see.
- ``data``: shards of generated images, re-encoded from scikit-image's photos with variations (crop, flip,
  quality, progressive, grey), on every core: ``IMAGES_224`` at 224 px and ``IMAGES_PHOTO`` at photo sizes.
- ``gpu_tests``: the gpu-marked tests (pytest -m gpu).
- ``model_only``, ``decode_only``: the model on preprocessed crops (bf16), and decoding alone: Pillow on
  threads vs device decode (nvJPEG through TorchCodec) in batches, and torchvision's ``decode_jpeg`` on the device.
- ``model_variants``: the vision tower alone on pixels already on the device: float32 weights under bf16
  autocast (dask_clip's way) against bfloat16 weights, at batch sizes 256 and 512, with their cosine to float32.
- ``out_of_memory``: an absurd batch size must raise ``DeviceOutOfMemoryError`` naming the fix.
- ``fidelity``: cosine of the embeddings to transformers' ``get_image_features`` (fp32, same device) over the
  image kinds of the CPU tests (progressive, CMYK, grey, EXIF-rotated, 16-bit PNG, WebP, plain JPEG).
- ``end_to_end``: ``from_webdataset`` -> ``ClipImageEmbedder`` (bf16, device decode; Pillow if that fails) ->
  ``save_metadata`` on a ``LocalCUDACluster`` whose workers loaded the model first (``prepare_workers``);
  images/s against the goal, peak GPU memory per worker, and how many embed tasks ran at once on the one GPU
  (``num_gpus_per_worker=0.25``: 4).

The model has ViT-L/14's shape and random weights. ``--rehearse`` (automatic without a GPU) runs every step at
tiny sizes on the CPU, with a tiny model on a ``LocalCluster`` whose worker offers one ``GPU`` resource, and says
``SKIPPED: needs GPU`` for what only a GPU can show.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
GOAL_IMAGES_PER_S = 2500.0
"""ViT-L/14 bf16 end to end on one H200 (about half its compute ceiling)."""
COSINE_FP32, COSINE_BF16 = 0.9999, 0.999
END_TO_END_BUDGET_S = 60
"""The 224 px end-to-end run takes as many shards as the model alone would embed in this many seconds."""
DEADLINE_S = 8 * 60
"""A step that would start later than this is skipped: the lent machine gives a command 10 minutes (``--deadline``
sets another)."""
GPU_TESTS_TIMEOUT_S = 240
VARIANT_BATCHES = 12
TRIM_S = 0.005
"""Each task's compute interval is shortened by this much at both ends when counting tasks that ran at once."""
NEEDS_GPU = "SKIPPED: needs GPU"
VIT_L_14_VISION_PARAMETERS = 303_966_208
"""OpenAI's ViT-L/14 image tower with its projection."""


@dataclass(frozen=True)
class Sizes:
    """How much each step does: the GPU run's sizes, or the rehearsal's tiny ones."""

    model_shape: str
    images_224: int
    images_photo: int
    shard_size: int
    batch_size: int
    model_only_batches: int
    decode_images: int


ON_GPU = Sizes("vit-l-14", 150_000, 6_000, 1_000, 256, 30, 12_000)
REHEARSAL = Sizes("tiny", 32, 8, 8, 8, 2, 24)


@dataclass
class Run:
    """What the steps share: where to write, the sizes, and what earlier steps made."""

    out: Path
    work: Path
    gpu: bool
    sizes: Sizes
    wheelhouse: Path | None
    started: float
    model_dir: Path | None = None
    model_images_per_s: float | None = None
    data_224: Path | None = None
    data_photo: Path | None = None
    client: Any = None

    @property
    def device(self) -> str:
        return "cuda" if self.gpu else "cpu"


# --- environment -------------------------------------------------------------------------------------------
def environment(run: Run) -> dict[str, Any]:
    """Versions, floors and requirements met, what the check imports importable, no faiss or cudf imported, and
    the GPU stack. Every problem is listed, not only the first."""
    import importlib
    from importlib import metadata

    from packaging.requirements import Requirement

    figures: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    names = ["torch", "torchvision", "transformers", "numpy", "pandas", "pyarrow", "pillow", "dask", "distributed"]
    names += ["dask-cuda", "torchcodec", "fsspec", "nvidia-ml-py", "dask-clip"]
    figures["versions"] = {name: _version(name) for name in names}
    problems = [f"dask_clip needs {need}, found {_version(need.name)}" for need in _unmet(_project_requirements())]
    problems += _wheelhouse_problems(run.wheelhouse, Requirement, metadata)
    # dask_cuda imports without a GPU (LocalCUDACluster needs one); torchcodec.decoders loads its native library
    for module in ("dask_clip.embedders", "dask_clip.dataset", "distributed", "dask_cuda", "torchcodec.decoders"):
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - each is a problem to list
            problems.append(f"import {module}: {type(error).__name__}: {error}")
    if _never_imported():
        problems.append(f"importing dask_clip imported {_never_imported()}: import them only where they are used")
    figures["dask_clip_from"] = getattr(sys.modules.get("dask_clip"), "__file__", None)
    from dask_clip.gpu_environment import detect

    figures.update(gpu_stack=detect().describe(), problems=problems)
    if run.gpu:
        import torch

        figures["gpu"] = torch.cuda.get_device_name(0)
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    return figures


def _never_imported() -> list[str]:
    """The modules of faiss and cuDF this process imported (the check must need neither)."""
    return sorted(name for name in sys.modules if name.split(".")[0] in ("faiss", "cudf", "dask_cudf"))


def imports(run: Run) -> dict[str, Any]:
    """After every step: faiss and cuDF were imported neither here nor on any worker."""
    figures = {"here": _never_imported()}
    if run.client is not None:
        figures["workers"] = run.client.run(_never_imported)
    if figures["here"] or any(figures.get("workers", {}).values()):
        raise CheckFailed("faiss or cuDF was imported: the GPU machine has neither", figures)
    return figures


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _project_requirements() -> list[Any]:
    """pyproject.toml's dependencies the check needs (faiss-cpu aside: never imported here)."""
    import tomllib
    from packaging.requirements import Requirement

    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [Requirement(text) for text in listed if not text.startswith("faiss")]


def _unmet(requirements: list[Any]) -> list[Any]:
    """The requirements the installed distributions do not meet (missing, or the wrong version)."""
    unmet = []
    for requirement in requirements:
        found = _version(requirement.name)
        if found is None or not requirement.specifier.contains(found, prereleases=True):
            unmet.append(requirement)
    return unmet


def _wheelhouse_problems(wheelhouse: Path | None, requirement_class: Any, metadata: Any) -> list[str]:
    """Each carried wheel's requirements (with the extras asked for) that nothing installed meets, except the CUDA
    libraries the wheelhouse leaves to the machine."""
    if wheelhouse is None:
        return []
    manifest = json.loads((wheelhouse / "wheelhouse.json").read_text())
    left_to_machine = {entry["name"] for entry in manifest["left_out"]}
    extras = {"dask": {"distributed", "dataframe", "array"}, "dask-cuda": {"cu13"}}
    problems = []
    for wheel in manifest["wheels"]:
        if _version(wheel["name"]) is None:
            problems.append(f"{wheel['name']} {wheel['version']} is in the wheelhouse's list but not installed")
            continue
        if wheel["name"] == "dask-clip":
            continue  # its own requirements are pyproject.toml's, checked above
        for text in metadata.requires(wheel["name"]) or []:
            requirement = requirement_class(text)
            wanted = extras.get(wheel["name"], set()) | {""}
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate({"extra": extra}) for extra in wanted):
                continue
            name = re.sub(r"[-_.]+", "-", requirement.name).lower()
            if name in left_to_machine:
                continue
            if _unmet([requirement]):
                problems.append(f"{wheel['name']} {wheel['version']} needs {requirement}, found {_version(name)}")
    return problems


# --- data and model --------------------------------------------------------------------------------------
_PHOTOS: dict[str, np.ndarray] = {}


def _generated_shard(folder: Path, shard: int, count: int, short_side: tuple[int, int], seed: int) -> int:
    """Write shard ``shard`` of ``count`` JPEGs re-encoded from scikit-image's photos: a random crop of a random
    photo, flipped or not, resized to a short side in ``short_side``, quality 60-95, 1 in 5 progressive, 1 in 10
    grey. Returns the bytes written."""
    from PIL import Image

    from dask_clip import testing

    if not _PHOTOS:
        _PHOTOS.update(testing.sample_photos())
    rng = np.random.default_rng(seed)
    names = sorted(_PHOTOS)
    rows, members, written = [], {}, 0
    for index in range(count):
        pixels = _PHOTOS[names[rng.integers(len(names))]]
        height, width = pixels.shape[:2]
        crop_height, crop_width = (int(side * rng.uniform(0.5, 1.0)) for side in (height, width))
        top, left = rng.integers(height - crop_height + 1), rng.integers(width - crop_width + 1)
        image = Image.fromarray(pixels[top : top + crop_height, left : left + crop_width])
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = rng.integers(*short_side, endpoint=True) / min(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        if rng.random() < 0.1:
            image = image.convert("L")
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)), progressive=bool(rng.random() < 0.2))
        key = testing.img2dataset_key(shard, index)
        members[key] = {"jpg": buffer.getvalue()}
        rows.append({"key": key, "caption": f"generated {key}", "status": "success"})
        rows[-1].update(width=image.width, height=image.height)
        written += len(buffer.getvalue())
    testing.write_shard(folder, shard, rows, members)
    return written


def _generate(folder: Path, images: int, shard_size: int, short_side: tuple[int, int], seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    counts = [min(shard_size, images - first) for first in range(0, images, shard_size)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        jobs = [
            pool.submit(_generated_shard, folder, shard, count, short_side, seed * 100_003 + shard)
            for shard, count in enumerate(counts)
        ]
        written = sum(job.result() for job in jobs)
    seconds = time.perf_counter() - started
    return {"images": images, "shards": len(counts), "mib": written / 2**20, "seconds": seconds}


def data(run: Run) -> dict[str, Any]:
    """The generated shards (``run.data_224``, ``run.data_photo``) and the random-weight model (``run.model_dir``)."""
    from dask_clip import testing

    run.data_224, run.data_photo = run.work / "images-224", run.work / "images-photo"
    figures = {
        "at_224_px": _generate(run.data_224, run.sizes.images_224, run.sizes.shard_size, (224, 280), 1),
        "at_photo_sizes": _generate(run.data_photo, run.sizes.images_photo, run.sizes.shard_size, (480, 1400), 2),
    }
    started = time.perf_counter()
    run.model_dir = testing.save_random_clip_model(run.work / "model", shape=run.sizes.model_shape)
    figures["model"] = {"shape": run.sizes.model_shape, "save_s": time.perf_counter() - started}
    parameters = figures["model"]["vit_l_14_vision_parameters"] = _vit_l_14_vision_parameters()
    if parameters != VIT_L_14_VISION_PARAMETERS:
        raise CheckFailed(f"the vit-l-14 shape has {parameters} parameters, not {VIT_L_14_VISION_PARAMETERS}", figures)
    return figures


def _vit_l_14_vision_parameters() -> int:
    """The ViT-L/14 shape's vision tower built without memory (torch's meta device): its parameter count, so that
    the rehearsal checks that this transformers builds the shape the GPU run saves."""
    import torch
    from transformers import CLIPVisionModelWithProjection

    from dask_clip import testing

    config = testing.clip_config("vit-l-14")
    with torch.device("meta"):
        tower = CLIPVisionModelWithProjection(config.vision_config)
    return sum(parameter.numel() for parameter in tower.parameters())


# --- the steps on the GPU ----------------------------------------------------------------------------------
def gpu_tests(run: Run) -> dict[str, Any]:
    """pytest -m gpu in a subprocess; its summary line and counts (junit XML)."""
    import xml.etree.ElementTree as ElementTree

    junit = run.work / "gpu-tests.xml"
    # only the files that hold gpu tests: the others import what the GPU machine lacks (faiss, webdataset...)
    files = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_*.py") if _has_gpu_tests(path))
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    command += files
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=GPU_TESTS_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"")[-4000:]
        raise CheckFailed(f"pytest -m gpu ran past {GPU_TESTS_TIMEOUT_S} s", {"output_tail": str(output)}) from None
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    figures = {**counts, "files": files, "summary": summary, "seconds": time.perf_counter() - started}
    if result.returncode != 0:
        figures["output_tail"] = result.stdout[-4000:] + result.stderr[-2000:]
        raise CheckFailed(f"pytest -m gpu: {summary}", figures)
    return figures


def _has_gpu_tests(path: Path) -> bool:
    return "@pytest.mark.gpu" in path.read_text()


def _crops(run: Run, count: int) -> list[np.ndarray]:
    """``count`` preprocessed ``uint8 (224, 224, 3)`` crops of the generated 224 px images."""
    from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess

    config = PreprocessConfig().with_decode_mode("fast")
    return [decode_and_preprocess(data, config) for data in _jpegs(run.data_224, count)]


def _jpegs(folder: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEGs of the shards in ``folder``, in shard order."""
    import tarfile

    found: list[bytes] = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as archive:
            for member in archive:
                if len(found) == count:
                    return found
                found.append(archive.extractfile(member).read())
    return found


def _peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def model_only(run: Run) -> dict[str, Any]:
    """``ClipVisionModel.embed`` on already-preprocessed crops, bf16 autocast, one process."""
    import torch

    from dask_clip import ClipImageEmbedder

    embedder = ClipImageEmbedder(str(run.model_dir), device=run.device, batch_size=run.sizes.batch_size)
    model = embedder.load_model()
    crops = _crops(run, run.sizes.batch_size)
    model.embed(crops)  # warm-up: kernels chosen, memory allocated
    if run.gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(run.sizes.model_only_batches):
        model.embed(crops)  # returns numpy: synchronised
    seconds = time.perf_counter() - started
    images = run.sizes.model_only_batches * len(crops)
    figures = {"images": images, "batch_size": len(crops), "dtype": str(model.autocast_dtype or "float32")}
    run.model_images_per_s = images / seconds
    figures.update(images_per_s=run.model_images_per_s, peak_gpu_mib=_peak_mib(run.device))
    del model
    if run.gpu:
        torch.cuda.empty_cache()
    return figures


def model_variants(run: Run) -> dict[str, Any]:
    """The vision tower alone on pixels already on the device (no host copy), ``VARIANT_BATCHES`` batches each:
    dask_clip's way (float32 weights under bf16 autocast) against bfloat16 weights, at two batch sizes; and each
    variant's centred cosine to float32 on the same pixels. Says where the model's own speed stands against the
    goal, apart from the host-side path that ``model_only`` includes."""
    import torch

    from dask_clip import ClipImageEmbedder
    from dask_clip.images.preprocess import to_pixel_values

    model = ClipImageEmbedder(str(run.model_dir), device=run.device).load_model()
    tower, attribute = model.model, model.attribute
    crops = _crops(run, run.sizes.batch_size)
    pixels = to_pixel_values(crops, model.preprocess, run.device, torch.float32)

    def forward(batch: Any, autocast: bool) -> Any:
        with torch.inference_mode(), torch.autocast(run.device, dtype=torch.bfloat16, enabled=autocast):
            return getattr(tower(pixel_values=batch), attribute).float()

    def images_per_s(batch: Any, autocast: bool) -> float:
        for _ in range(2):
            forward(batch, autocast)
        _synchronize(run)
        started = time.perf_counter()
        for _ in range(VARIANT_BATCHES):
            forward(batch, autocast)
        _synchronize(run)
        return VARIANT_BATCHES * len(batch) / (time.perf_counter() - started)

    reference = forward(pixels, autocast=False)
    reference = reference - reference.mean(dim=0)
    figures: dict[str, Any] = {"batches": VARIANT_BATCHES, "attention": tower.config._attn_implementation}
    doubled = torch.cat([pixels, pixels])
    figures["fp32_weights_autocast_bf16"] = {
        "images_per_s": images_per_s(pixels, True),
        "images_per_s_batch_512": images_per_s(doubled, True),
        "min_centred_cosine_to_fp32": _min_centred_cosine(forward(pixels, True), reference),
    }
    tower.to(torch.bfloat16)
    pixels, doubled = pixels.to(torch.bfloat16), doubled.to(torch.bfloat16)
    figures["bf16_weights"] = {
        "images_per_s": images_per_s(pixels, False),
        "images_per_s_batch_512": images_per_s(doubled, False),
        "min_centred_cosine_to_fp32": _min_centred_cosine(forward(pixels, False), reference),
    }
    return figures


def _synchronize(run: Run) -> None:
    import torch

    if run.gpu:
        torch.cuda.synchronize()


def _min_centred_cosine(embeddings: Any, centred_reference: Any) -> float:
    """The smallest cosine between the rows of ``embeddings``, each set centred on its own mean, and those of
    ``centred_reference`` (random weights map every image near one direction: centring is the strict test)."""
    import torch

    centred = embeddings - embeddings.mean(dim=0)
    return float(torch.nn.functional.cosine_similarity(centred, centred_reference, dim=1).min())


def decode_only(run: Run) -> dict[str, Any]:
    """Decoding + preprocessing alone: Pillow (``decode_mode="fast"``) on one thread per core, vs device decode
    (header checks on the threads, JPEGs decoded in batches on the device by TorchCodec). torchvision's
    ``decode_jpeg`` on the device (decoding only, no resize) is measured too: the fallback if TorchCodec fails."""
    from dask_clip.images.preprocess import PreprocessConfig, decode_and_preprocess

    jpegs = _jpegs(run.data_224, run.sizes.decode_images)
    figures: dict[str, Any] = {"images": len(jpegs), "threads": os.cpu_count()}
    fast = PreprocessConfig().with_decode_mode("fast")
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        started = time.perf_counter()
        list(pool.map(lambda data: decode_and_preprocess(data, fast), jpegs))
        figures["pillow_threads_images_per_s"] = len(jpegs) / (time.perf_counter() - started)
        failures = []
        for name, measure in (("device", _torchcodec_on_device), ("torchvision_decode_jpeg", _torchvision_on_device)):
            try:
                figures[f"{name}_images_per_s"] = measure(run, jpegs, pool)
            except Exception as error:  # noqa: BLE001 - the other decoder is still measured
                failures.append(f"{name}: {type(error).__name__}: {error}")
    figures["device"] = run.device if run.gpu else "cpu (TorchCodec's CPU decoder: nvJPEG needs a GPU)"
    if failures:
        raise CheckFailed("; ".join(failures), figures)
    return figures


def _torchcodec_on_device(run: Run, jpegs: list[bytes], pool: ThreadPoolExecutor) -> float:
    import torch

    from dask_clip.images.device_decode import decode_on_device, prepare_image
    from dask_clip.images.preprocess import PreprocessConfig

    device = PreprocessConfig().with_decode_mode("device")
    decode_on_device([prepare_image(jpegs[0], device)], device, run.device)  # warm-up
    started = time.perf_counter()
    for first in range(0, len(jpegs), run.sizes.batch_size):
        batch = jpegs[first : first + run.sizes.batch_size]
        encoded = list(pool.map(lambda data: prepare_image(data, device), batch))
        decoded = decode_on_device(encoded, device, run.device)
        if not all(isinstance(image, torch.Tensor) for image in decoded):
            raise CheckFailed(f"decode_on_device gave {sorted({type(i).__name__ for i in decoded})}", {})
    if run.gpu:
        torch.cuda.synchronize()
    return len(jpegs) / (time.perf_counter() - started)


def _torchvision_on_device(run: Run, jpegs: list[bytes], pool: ThreadPoolExecutor) -> float:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
    decode_jpeg(encoded[:2], mode=ImageReadMode.RGB, device=run.device)  # warm-up
    started = time.perf_counter()
    for first in range(0, len(encoded), run.sizes.batch_size):
        decode_jpeg(encoded[first : first + run.sizes.batch_size], mode=ImageReadMode.RGB, device=run.device)
    if run.gpu:
        torch.cuda.synchronize()
    return len(jpegs) / (time.perf_counter() - started)


def out_of_memory(run: Run) -> dict[str, Any]:
    """A batch twice the GPU's memory in uint8 pixels must be a ``DeviceOutOfMemoryError`` naming the fix."""
    if not run.gpu:
        return {"status": NEEDS_GPU}
    import torch

    from dask_clip import ClipImageEmbedder
    from dask_clip.errors import DeviceOutOfMemoryError

    model = ClipImageEmbedder(str(run.model_dir), device="cuda").load_model()
    pixel = torch.zeros((3, 224, 224), dtype=torch.uint8, device="cuda")
    absurd = 2 * torch.cuda.get_device_properties(0).total_memory // pixel.numel()
    try:
        model.embed([pixel] * absurd)
    except DeviceOutOfMemoryError as error:
        message = str(error)
    else:
        raise CheckFailed(f"a batch of {absurd} images did not run out of GPU memory", {"batch_size": absurd})
    finally:
        del model, pixel
        torch.cuda.empty_cache()
    names_the_fix = "smaller batch_size" in message and str(absurd) in message
    figures = {"batch_size": absurd, "error": message[:600], "names_batch_size_and_fix": names_the_fix}
    if not names_the_fix:
        raise CheckFailed("the out-of-memory error does not name the batch size and the fix", figures)
    return figures


def _start_cluster(run: Run) -> Any:
    from dask_clip import get_client

    if run.gpu:
        return get_client("gpu", dashboard_address=None)
    # a worker offering one GPU resource: the embed tasks (0.25 each) are packed as on a GPU worker
    return get_client("cpu", n_workers=1, threads_per_worker=4, resources={"GPU": 1}, dashboard_address=None)


def end_to_end(run: Run) -> dict[str, Any]:
    """from_webdataset -> ClipImageEmbedder (bf16, device decode, 0.25 GPU per task) -> save_metadata. Should device
    decode fail, the error is recorded and the run goes on with ``decode_mode="fast"`` (Pillow on the threads)."""
    started = time.perf_counter()
    run.client = _start_cluster(run)
    figures: dict[str, Any] = {"cluster": type(run.client.cluster).__name__, "decode_mode": "device"}
    figures["cluster_start_s"] = time.perf_counter() - started
    figures["workers"] = len(run.client.scheduler_info()["workers"])
    for name, folder in (("at_224_px", _time_boxed(run)), ("at_photo_sizes", run.data_photo)):
        try:
            figures[name] = _embed_and_save(run, folder, name, figures["decode_mode"])
        except Exception as error:  # recorded; the figures then come from Pillow decoding
            if figures["decode_mode"] != "device":
                raise
            figures["device_decode_error"] = f"{type(error).__name__}: {error}"[:2000]
            figures["decode_mode"] = "fast"
            figures[name] = _embed_and_save(run, folder, name, "fast")
    figures["vs_goal"] = figures["at_224_px"]["images_per_s"] / GOAL_IMAGES_PER_S
    figures["goal_images_per_s"] = GOAL_IMAGES_PER_S
    packed = figures["at_224_px"]["most_embed_tasks_at_once_per_worker"]
    if max(packed.values(), default=0) != 4:
        raise CheckFailed(f"4 embed tasks at num_gpus_per_worker=0.25 should share one GPU; saw {packed}", figures)
    if "device_decode_error" in figures:
        raise CheckFailed(f"device decode failed: {figures['device_decode_error'][:300]}", figures)
    return figures


def _embed_and_save(run: Run, folder: Path, name: str, decode_mode: str) -> dict[str, Any]:
    """One embed-and-save run over the shards in ``folder``: images/s, rows without an embedding, peak GPU memory
    per worker and the most embed tasks at once per worker."""
    from distributed import get_task_stream

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, prepare_workers

    embedder = ClipImageEmbedder(
        str(run.model_dir), batch_size=run.sizes.batch_size, decode_mode=decode_mode, num_gpus_per_worker=0.25
    )
    started = time.perf_counter()
    prepare_workers(embedder, run.client)  # the model load is not part of the throughput
    warm_s = time.perf_counter() - started
    run.client.run(_reset_peak_memory)
    dataset = ImageTextPairDataset.from_webdataset(str(folder))
    started = time.perf_counter()
    with get_task_stream(run.client) as stream:
        summary = embedder(dataset).save_metadata(str(run.work / f"embedded-{name}-{decode_mode}"))
    seconds = time.perf_counter() - started
    rows = int(summary["rows"].sum())
    entry = {"images": rows, "errors": int(summary["errors"].sum()), "seconds": seconds, "images_per_s": rows / seconds}
    entry["model_load_s"] = warm_s
    entry["peak_gpu_mib_per_worker"] = list(run.client.run(_peak_memory).values())
    entry["most_embed_tasks_at_once_per_worker"] = _most_at_once(stream.data, "save", TRIM_S)
    entry["most_at_once_untrimmed"] = _most_at_once(stream.data, "save")
    print(f"gpu_check:   {name} ({decode_mode}): {rows} images in {seconds:.1f} s", flush=True)
    return entry


def _time_boxed(run: Run) -> Path:
    """The 224 px shards, or as many of them as the model alone embeds in
    ``END_TO_END_BUDGET_S`` (hard links in a folder of their own): a slow GPU must not push the check past its
    deadline."""
    tars = sorted(run.data_224.glob("*.tar"))
    if not run.gpu or run.model_images_per_s is None:
        return run.data_224
    shards = max(4, int(run.model_images_per_s * END_TO_END_BUDGET_S) // run.sizes.shard_size)
    if shards >= len(tars):
        return run.data_224
    folder = run.work / "images-224-time-boxed"
    folder.mkdir()
    for tar in tars[:shards]:
        for path in (tar, tar.with_suffix(".parquet")):
            os.link(path, folder / path.name)
    return folder


def _reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _peak_memory() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _most_at_once(stream: list[dict[str, Any]], label: str, trim_s: float = 0.0) -> dict[str, int]:
    """For each worker, the most tasks with ``label`` in their key that computed at the same moment (``"save"``:
    the shard tasks, where Dask fuses reading, embedding and saving a shard), each compute interval shortened by
    ``trim_s`` at both ends (so that one task's recorded stop and the next one's start, taken on different
    threads, cannot make them overlap)."""
    events: dict[str, list[tuple[float, int]]] = {}
    for task in stream:
        if label not in str(task["key"]):
            continue
        for interval in task["startstops"]:
            start, stop = interval["start"] + trim_s, interval["stop"] - trim_s
            if interval["action"] == "compute" and start < stop:
                events.setdefault(task["worker"], []).extend([(start, 1), (stop, -1)])
    most = {}
    for worker, changes in events.items():
        running = peak = 0
        for _, change in sorted(changes, key=lambda event: (event[0], event[1])):
            running += change
            peak = max(peak, running)
        most[worker] = peak
    return most


def fidelity(run: Run) -> dict[str, Any]:
    """Cosine of dask_clip's embeddings to transformers' get_image_features (fp32, same device), per image kind."""
    import torch
    from transformers import CLIPImageProcessor, CLIPModel

    from dask_clip import ClipImageEmbedder, ImageTextPairDataset, embeddings_to_numpy, testing

    images, upright = _image_kinds(testing)
    folder = run.work / "kinds"
    rows = [{"key": key, "caption": key, "status": "success"} for key in images]
    members = {key: {extension: data} for key, (extension, data) in images.items()}
    testing.write_shard(folder, 0, rows, members)
    model = CLIPModel.from_pretrained(run.model_dir).eval().to(run.device)
    processor = CLIPImageProcessor.from_pretrained(run.model_dir)
    reference = {}
    for key, image in upright.items():
        pixels = processor(images=image, return_tensors="pt")["pixel_values"].to(run.device)
        with torch.no_grad():
            features = model.get_image_features(pixel_values=pixels)
        vector = getattr(features, "pooler_output", features)[0].float().cpu().numpy()
        reference[key] = vector / np.linalg.norm(vector)
    del model
    settings = {
        "fp32_exact": ({"autocast": False, "decode_mode": "exact"}, COSINE_FP32),
        "bf16_fast": ({"autocast": True, "decode_mode": "fast"}, COSINE_BF16),
        "bf16_device": ({"autocast": True, "decode_mode": "device"}, COSINE_BF16),
        "fp32_device": ({"autocast": False, "decode_mode": "device"}, COSINE_BF16),
    }
    figures: dict[str, Any] = {"kinds": sorted(images), "thresholds": {"fp32": COSINE_FP32, "bf16": COSINE_BF16}}
    # random weights map every image near one direction: this says how far apart different images still are,
    # and the centred cosines (the mean reference vector taken off both) are the stricter comparison
    keys = sorted(reference)
    stacked = np.stack([reference[key] for key in keys])
    between = stacked @ stacked.T
    figures["reference_between_images_max_cosine"] = float(between[~np.eye(len(keys), dtype=bool)].max())
    mean = stacked.mean(axis=0)
    failed = []
    for name, (options, threshold) in settings.items():
        embedder = ClipImageEmbedder(str(run.model_dir), device=run.device, batch_size=4, **options)
        frame = embedder(ImageTextPairDataset.from_webdataset(str(folder))).metadata.compute().set_index("key")
        vectors = dict(zip(frame.index, embeddings_to_numpy(frame["image_embedding"]), strict=True))
        cosines = {key: float(vectors[key] @ reference[key]) for key in reference}
        low = {key: cosine for key, cosine in cosines.items() if cosine < threshold}
        centred = {key: _cosine(vectors[key] - mean, reference[key] - mean) for key in reference}
        figures[name] = {"threshold": threshold, "min_cosine": min(cosines.values()), "cosines": cosines}
        figures[name]["min_centred_cosine"] = min(centred.values())
        failed += [f"{name}: {key} {cosine:.6f} < {threshold}" for key, cosine in low.items()]
    if failed:
        raise CheckFailed("; ".join(failed), figures)
    return figures


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _image_kinds(testing: Any) -> tuple[dict[str, tuple[str, bytes]], dict[str, Any]]:
    """The image kinds the CPU tests use, encoded (key -> (extension, bytes)), and each as the upright RGB image
    dask_clip must see (key -> PIL image), for transformers' processor."""
    from PIL import Image, ImageOps

    photos = testing.sample_photos(["chelsea", "coffee", "astronaut", "camera"])
    cat, coffee = Image.fromarray(photos["chelsea"]), Image.fromarray(photos["coffee"])
    grey = np.asarray(Image.fromarray(photos["camera"]).convert("L"))

    def encode(image: Any, format: str, **options: Any) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=format, **options)
        return buffer.getvalue()

    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: must turn 90 degrees clockwise to be upright
    images = {
        "jpeg": ("jpg", encode(Image.fromarray(photos["astronaut"]), "JPEG", quality=90)),
        "progressive": ("jpg", encode(cat, "JPEG", quality=90, progressive=True)),
        "cmyk": ("jpg", encode(cat.convert("CMYK"), "JPEG", quality=95)),
        "grey": ("jpg", encode(Image.fromarray(grey), "JPEG", quality=90)),
        "exif_rotated": ("jpg", encode(coffee, "JPEG", quality=95, exif=exif.tobytes())),
        "sixteen_bit_png": ("png", encode(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")),
        "webp": ("webp", encode(coffee, "WEBP", quality=90)),
    }
    upright = {
        key: ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB") for key, (_, data) in images.items()
    }
    upright["sixteen_bit_png"] = Image.fromarray(grey).convert("RGB")
    return images, upright


# --- running and reporting ---------------------------------------------------------------------------------
class CheckFailed(Exception):
    """A step's verdict is a failure; ``figures`` are what it measured."""

    def __init__(self, message: str, figures: dict[str, Any]) -> None:
        super().__init__(message)
        self.figures = figures


STEPS: list[tuple[str, Callable[[Run], dict[str, Any]]]] = [
    ("environment", environment),
    ("data", data),
    ("gpu_tests", gpu_tests),
    ("model_only", model_only),
    ("model_variants", model_variants),
    ("decode_only", decode_only),
    ("out_of_memory", out_of_memory),
    ("fidelity", fidelity),
    ("end_to_end", end_to_end),
    ("imports", imports),
]
STEP_NAMES = [name for name, _ in STEPS]
NEEDS_DATA = {"model_variants", "model_only", "decode_only", "out_of_memory", "end_to_end", "fidelity"}


def run_steps(run: Run, only: set[str] | None = None, deadline_s: float = DEADLINE_S) -> dict[str, Any]:
    """Each step in order (those in ``only``, with ``data`` when a step needs it), its figures or its failure.
    The results so far are written to ``run.out`` after every step: a run stopped from outside keeps them."""
    results: dict[str, Any] = {"mode": "gpu" if run.gpu else "rehearsal (CPU, tiny sizes)", "sizes": vars(run.sizes)}
    if only is not None and only & NEEDS_DATA:
        only = only | {"data"}
    for name, step in STEPS:
        elapsed = time.perf_counter() - run.started
        if only is not None and name not in only:
            results[name] = {"status": "SKIPPED: not asked for (--steps)"}
            continue
        if elapsed > deadline_s:
            results[name] = {"status": f"SKIPPED: out of time ({elapsed:.0f} s > {deadline_s:.0f} s)"}
        elif name in NEEDS_DATA and run.model_dir is None:
            results[name] = {"status": "SKIPPED: the data step failed"}
        else:
            print(f"gpu_check: [{elapsed:5.0f} s] {name} ...", flush=True)
            started = time.perf_counter()
            try:
                figures = step(run)
                figures.setdefault("status", "ok")
            except CheckFailed as failure:
                figures = {**failure.figures, "status": f"FAILED: {failure}"}
            except Exception as error:  # noqa: BLE001 - recorded, and the exit status says so
                figures = {"status": f"FAILED: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            figures["step_s"] = time.perf_counter() - started
            results[name] = figures
        results["total_s"] = time.perf_counter() - run.started
        write_results(run.out, results)
        print(f"gpu_check: [{results['total_s']:5.0f} s] {name}: {results[name]['status']}", flush=True)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    """``out/gpu_check.json`` (every figure) and ``out/gpu_check.md`` (one table)."""
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(table(results))


def table(results: dict[str, Any]) -> str:
    """The figures as one Markdown table: step, figure, value."""
    lines = ["| step | figure | value |", "| --- | --- | --- |"]
    for step, figures in results.items():
        if not isinstance(figures, dict):
            lines.append(f"| {step} | | {_short(figures)} |")
            continue
        for name, value in _flat(figures):
            if name not in ("traceback", "output_tail"):
                lines.append(f"| {step} | {name} | {_short(value)} |")
    return "\n".join(lines) + "\n"


def _flat(figures: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    flat = []
    for name, value in figures.items():
        if isinstance(value, dict) and value:
            flat += _flat(value, f"{prefix}{name}.")
        else:
            flat.append((f"{prefix}{name}", value))
    return flat


def _short(value: Any) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return text.replace("|", "/").replace("\n", " ")[:300]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--rehearse", action="store_true", help="CPU rehearsal at tiny sizes (automatic without GPU)")
    parser.add_argument("--wheelhouse", type=Path, help="the wheelhouse installed (requirements checked)")
    parser.add_argument("--steps", help=f"run only these steps, comma-separated (of: {', '.join(STEP_NAMES)})")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds after which no step starts")
    parser.add_argument("--images-224", type=int, help="images at 224 px on a GPU (default: enough for 60 s)")
    parser.add_argument("--images-photo", type=int, help="images at photo sizes on a GPU")
    options = parser.parse_args(argv)
    only = None if options.steps is None else set(options.steps.split(","))
    if only is not None and only - set(STEP_NAMES):
        parser.error(f"--steps: no step named {', '.join(sorted(only - set(STEP_NAMES)))}")
    import torch

    gpu = torch.cuda.is_available() and not options.rehearse
    if not gpu:
        print("gpu_check: REHEARSAL on the CPU at tiny sizes; the GPU-only figures say: " + NEEDS_GPU, flush=True)
    options.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
        sizes = ON_GPU if gpu else REHEARSAL
        if gpu and options.images_224:
            sizes = replace(sizes, images_224=options.images_224)
        if gpu and options.images_photo:
            sizes = replace(sizes, images_photo=options.images_photo)
        run = Run(options.out, Path(work), gpu, sizes, options.wheelhouse, time.perf_counter())
        try:
            results = run_steps(run, only, options.deadline)
        finally:
            if run.client is not None:
                with contextlib.suppress(Exception):
                    cluster = run.client.cluster
                    run.client.close()
                    cluster.close()
    write_results(options.out, results)
    print(table(results))
    failed = [name for name, figures in results.items() if str(_status(figures)).startswith("FAILED")]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'ok'} ({results['total_s']:.0f} s); "
          f"figures in {options.out}/gpu_check.json and gpu_check.md")  # fmt: skip
    return 1 if failed else 0


def _status(figures: Any) -> str:
    return figures.get("status", "") if isinstance(figures, dict) else ""


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
