"""The image tower of a CLIP-family checkpoint run by OpenVINO on a CPU worker (the ``openvino`` extra).

A worker converts the torch tower (vision model and projection) once with ``openvino.convert_model`` and keeps
the converted model on disk (``cache_folder``), under a key naming the weights (a digest of their files), the
precision of its weights (fp32, which runs in fp32 or bf16, or int8) and the input shape; every later load on
that machine, by any process, compiles it from there. At conversion its embeddings in each precision it runs in
are compared with torch fp32's on a few fixed probe images, and the smallest cosine is kept with it: a model
whose agreement misses ``AGREEMENT`` (0.9999 in fp32, 0.999 in bf16) is refused, so that a column computed
partly by torch and partly by OpenVINO is one column (``provenance``: the engine is a property of a column, not
part of its identity). ``precision="int8"`` (NNCF's data-free int8 compression of the weights) is an opt-in
with its own identity: it is not held to those thresholds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Any

import numpy as np

from dask_clip.errors import ModelLoadError
from dask_clip.images.preprocess import PreprocessConfig, to_pixel_values
from dask_clip.io.atomic import fsync_folder
from dask_clip.models.clip import ImageModelDescription, load_tower
from dask_clip.models.loading import SAFETENSORS_FILES, is_local_path, model_version
from dask_clip.optional import require

logger = logging.getLogger(__name__)

AGREEMENT = {"fp32": 0.9999, "bf16": 0.999}
"""The smallest cosine to torch fp32 an engine must reach, per precision, to compute the same column as torch."""
PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
"""OpenVINO's ``INFERENCE_PRECISION_HINT`` per precision (int8: int8 weights, fp32 activations)."""
CACHE_ENVIRONMENT = "DASK_CLIP_CACHE_DIR"
PROBE_IMAGES = 8


def cache_folder(folder: str | None = None) -> str:
    """Where converted models are kept: ``folder``, else ``$DASK_CLIP_CACHE_DIR/openvino``, else
    ``$XDG_CACHE_HOME/dask_clip/openvino`` (``~/.cache/dask_clip/openvino``)."""
    if folder:
        return os.path.expanduser(folder)
    if os.environ.get(CACHE_ENVIRONMENT):
        return os.path.join(os.path.expanduser(os.environ[CACHE_ENVIRONMENT]), "openvino")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dask_clip", "openvino")


def weights_digest(model_dir: str) -> str:
    """A digest of the weights ``model_dir`` names: of its safetensors files' bytes (a local folder), else of its
    hub revision."""
    if not is_local_path(model_dir):
        return hashlib.sha256(json.dumps(model_version(model_dir), sort_keys=True).encode()).hexdigest()[:16]
    folder = os.path.expanduser(model_dir)
    hasher = hashlib.sha256()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") or n in SAFETENSORS_FILES)
    for name in names:
        hasher.update(name.encode())
        with open(os.path.join(folder, name), "rb") as file:
            for block in iter(lambda file=file: file.read(1 << 24), b""):
                hasher.update(block)
    return hasher.hexdigest()[:16]


def stored_precision(precision: str) -> str:
    """The precision of a converted model's weights: ``"int8"``, or ``"fp32"`` (which runs in fp32 and in bf16)."""
    return "int8" if precision == "int8" else "fp32"


def conversion_key(model_dir: str, family: str, precision: str, preprocess: PreprocessConfig) -> str:
    """The name of a converted model's folder: family, weights, the precision of its weights (``stored_precision``),
    input shape and OpenVINO's version."""
    ov = require("openvino", "openvino", "engine='openvino'")
    precision = stored_precision(precision)
    shape = [3, preprocess.crop_height, preprocess.crop_width]
    parts = {"family": family, "weights": weights_digest(model_dir), "precision": precision, "shape": shape}
    parts["openvino"] = ov.get_version()
    return f"{family}-{precision}-{hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]}"


def probe_pixels(preprocess: PreprocessConfig) -> Any:
    """``PROBE_IMAGES`` fixed, smooth, photo-like images as normalised pixels ``float32 (N, 3, H, W)`` (torch)."""
    import torch

    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(0, 255, (PROBE_IMAGES, 3, 6, 6)).astype(np.float32))
    size = (preprocess.crop_height, preprocess.crop_width)
    smooth = torch.nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    images = smooth.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return to_pixel_values(list(images), preprocess, "cpu", torch.float32)


def smallest_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine between ``float32 (N, D)`` arrays."""
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cosines.min())


def tower_module(model: Any, attribute: str) -> Any:
    """A torch module mapping pixels ``float32 (B, 3, H, W)`` to ``model``'s embeddings ``float32 (B, D)`` (its
    output's ``attribute``): what ``convert_model`` traces."""
    import torch

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: Any) -> Any:
            return getattr(self.model(pixel_values=pixel_values), attribute)

    return Tower().eval()


def convert(model_dir: str, described: ImageModelDescription, precision: str, folder: str) -> None:
    """Convert the tower of ``model_dir`` to OpenVINO with weights in ``stored_precision(precision)`` and save it in
    ``folder`` (written whole under a temporary name, then renamed: a reader never sees half a model), with
    ``agreement.json`` holding, per precision it runs in, the smallest cosine to torch fp32 on the probe images."""
    import torch

    ov = require("openvino", "openvino", "engine='openvino'")
    torch_tower = load_tower(described.family, model_dir, "vision", described.width)
    tower = tower_module(torch_tower, described.family.image_attribute)
    probe = probe_pixels(described.preprocess)
    with torch.inference_mode():
        reference = tower(probe).float().numpy()
    height, width = described.preprocess.crop_height, described.preprocess.crop_width
    with torch.no_grad(), _quiet_tracing():
        converted = ov.convert_model(tower, example_input=probe[:1], input=[(-1, 3, height, width)])
    if stored_precision(precision) == "int8":
        nncf = require("nncf", "openvino", "precision='int8'")
        converted = nncf.compress_weights(converted, mode=nncf.CompressWeightsMode.INT8_ASYM)
    temporary = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{uuid.uuid4().hex}.tmp")
    os.makedirs(temporary)
    try:
        ov.save_model(converted, os.path.join(temporary, "model.xml"), compress_to_fp16=False)
        agreement = {
            runs_in: smallest_cosine(compile_model(temporary, runs_in)(probe.numpy())[0], reference)
            for runs_in in (["int8"] if precision == "int8" else ["fp32", "bf16"])
        }
        with open(os.path.join(temporary, "agreement.json"), "w") as file:
            json.dump(agreement, file)
        for name in os.listdir(temporary):
            with open(os.path.join(temporary, name), "rb") as file:
                os.fsync(file.fileno())
        try:
            os.rename(temporary, folder)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "agreement.json")):
                raise
            # another process converted the same model meanwhile: keep its copy
        fsync_folder(os.path.dirname(folder))
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


@contextlib.contextmanager
def _quiet_tracing() -> Any:
    """Silence the tracer's warnings about Python conditions in transformers' code (the shape is fixed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def compile_model(folder: str, precision: str) -> Any:
    """The model saved in ``folder`` compiled for this CPU at ``precision``."""
    ov = require("openvino", "openvino", "engine='openvino'")
    import torch

    options = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision], "INFERENCE_NUM_THREADS": torch.get_num_threads()}
    return ov.Core().compile_model(os.path.join(folder, "model.xml"), "CPU", options)


class OpenVinoVisionModel:
    """The image tower of a CLIP-family checkpoint compiled by OpenVINO for this CPU (see the module).

    ``precision`` is ``"fp32"``, ``"bf16"`` or ``"int8"``; ``cache_dir`` None is ``cache_folder()``'s default.
    It runs on as many threads as torch does in this process (a Dask worker's share of the machine).
    ``ModelLoadError`` when its agreement with torch fp32 misses ``AGREEMENT`` at that precision.
    """

    def __init__(self, model_dir: str, described: ImageModelDescription, precision: str, cache_dir: str | None) -> None:
        import torch

        self.device = torch.device("cpu")
        self.preprocess = described.preprocess
        self.precision = precision
        folder = os.path.join(
            cache_folder(cache_dir), conversion_key(model_dir, described.family.name, precision, described.preprocess)
        )
        if not os.path.isfile(os.path.join(folder, "agreement.json")):
            logger.info("converting the vision tower of %s to OpenVINO into %s", model_dir, folder)
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            convert(model_dir, described, precision, folder)
        with open(os.path.join(folder, "agreement.json")) as file:
            self.smallest_cosine = json.load(file)[precision]
        if precision in AGREEMENT and self.smallest_cosine < AGREEMENT[precision]:
            raise ModelLoadError(
                f"{model_dir!r}: OpenVINO's {precision} embeddings reach a cosine of only {self.smallest_cosine:.6f} "
                f"to torch fp32 (at least {AGREEMENT[precision]} is needed to compute the same column); use "
                f"engine='torch' (converted model: {folder})"
            )
        self.compiled = compile_model(folder, precision)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """Preprocessed ``uint8 (H, W, 3)`` images -> raw (unnormalised) embeddings ``float32 (B, D)``."""
        import torch

        pixels = to_pixel_values(images, self.preprocess, self.device, torch.float32).numpy()
        return np.asarray(self.compiled(pixels)[0], dtype=np.float32)
