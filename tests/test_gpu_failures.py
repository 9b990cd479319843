"""Every GPU setup problem is a loud error naming the host, the torch and CUDA versions and the fix; only one
image's decode failure falls back (to Pillow, for that image). No GPU here: each state is simulated by
replacing what the driver (NVML), torch or TorchCodec report."""

from __future__ import annotations

import shutil
import socket
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dask_clip import ClipImageEmbedder, ImageTextPairDataset, get_client, gpu_environment
from dask_clip.errors import ConfigurationError, DeviceOutOfMemoryError, DeviceSetupError
from dask_clip.images import device_decode
from dask_clip.images.device_decode import EncodedJpeg, decode_on_device, import_decode_jpeg
from dask_clip.images.preprocess import PreprocessConfig
from dask_clip.models.device import autocast_dtype_for, bf16_is_fast, resolve_device, run_on_batch

from .test_fast_decode import jpeg

DRIVER_CUDA_12 = (2, "550.54.15", "12.4")
"""NVML's answer on a machine with two GPUs and a driver for CUDA 12.4 (older than torch's CUDA 13 build)."""


@pytest.fixture
def driver_sees_gpus_torch_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu_environment, "driver_view", lambda: DRIVER_CUDA_12)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")


def assert_names_the_stack(message: str) -> None:
    assert f"host {socket.gethostname()}" in message
    assert f"torch {torch.__version__}" in message and "CUDA 13.0" in message
    assert "Fix:" in message


def test_default_device_with_a_driver_torch_cannot_use_is_an_error(driver_sees_gpus_torch_does_not) -> None:
    with pytest.raises(DeviceSetupError) as raised:
        resolve_device(None)
    message = str(raised.value)
    assert_names_the_stack(message)
    assert "driver 550.54.15 (CUDA 12.4) sees 2 GPU(s)" in message and "can use 0" in message
    assert "update the NVIDIA driver" in message and "CUDA 12 recipe" in message
    assert isinstance(raised.value, ConfigurationError)  # stops the run; the CLI exits 2


def test_a_cpu_only_torch_on_a_gpu_machine_is_told_to_install_a_cuda_build(
    driver_sees_gpus_torch_does_not, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceSetupError, match=r"a CPU-only build.*install a CUDA build of torch"):
        resolve_device(None)


def test_gpus_hidden_on_purpose_run_on_the_cpu(driver_sees_gpus_torch_does_not, monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert resolve_device(None) == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_without_any_gpu_the_default_device_is_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_environment, "driver_view", lambda: (0, None, None))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"


def test_a_gpu_cluster_is_not_started_when_torch_cannot_use_the_gpus(driver_sees_gpus_torch_does_not, monkeypatch):
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kwargs: pytest.fail("must not start a CUDA cluster torch cannot use")
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    with pytest.raises(DeviceSetupError) as raised:
        get_client("gpu")
    assert_names_the_stack(str(raised.value))


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_bf16_only_where_the_gpu_runs_it_natively(monkeypatch, capability, native) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert bf16_is_fast("cuda:0") is native
    assert autocast_dtype_for("cuda:0", autocast=True) == (torch.bfloat16 if native else None)


def test_a_torchcodec_that_does_not_load_is_a_setup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = device_decode.require.__globals__["importlib"].import_module

    def broken_native_library(name: str, *args):
        if name.startswith("torchcodec"):
            raise OSError("libtorchcodec_core7.so: undefined symbol: _ZN3c1017RegisterOperators")
        return real_import(name, *args)

    monkeypatch.setattr(device_decode.require.__globals__["importlib"], "import_module", broken_native_library)
    with pytest.raises(DeviceSetupError) as raised:
        import_decode_jpeg()
    message = str(raised.value)
    assert "undefined symbol" in message and "TorchCodec release made for torch" in message
    assert_names_the_stack(message)


def refusing_decoder(error: Exception):
    def decode_jpeg(data, mode="RGB", device="cpu"):
        raise error

    return decode_jpeg


@pytest.mark.parametrize("error", [RuntimeError("nvJPEG is not available"), ValueError("no current CUDA device")])
def test_a_device_that_cannot_decode_stops_the_run_before_the_first_shard(
    monkeypatch, pristine_shards: Path, tiny_model: Path, tmp_path: Path, error: Exception
) -> None:
    # a model folder of its own, so that no model cached by another test skips the load-time check
    model = Path(shutil.copytree(tiny_model, tmp_path / f"model-{type(error).__name__}"))
    monkeypatch.setattr(device_decode, "import_decode_jpeg", lambda: refusing_decoder(error))
    dataset = ImageTextPairDataset.from_webdataset(str(pristine_shards))
    embedder = ClipImageEmbedder(model_dir=str(model), device="cpu", decode_mode="device")
    with pytest.raises(DeviceSetupError) as raised:
        embedder(dataset).metadata.compute(scheduler="sync")
    assert str(error) in str(raised.value) and "decode_mode='fast'" in str(raised.value)
    assert f"host {socket.gethostname()}" in str(raised.value)


def test_out_of_memory_in_decoding_is_an_error_not_a_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(device_decode, "import_decode_jpeg", lambda: refusing_decoder(oom))
    jpegs = [EncodedJpeg(jpeg(64, 48), 48, 64) for _ in range(3)]
    with pytest.raises(DeviceOutOfMemoryError) as raised:
        decode_on_device(jpegs, PreprocessConfig().with_decode_mode("device"), "cpu")
    assert "decoding a batch of 3 images" in str(raised.value) and "Tried to allocate" in str(raised.value)
    assert_names_the_stack(str(raised.value))


def test_out_of_memory_at_the_first_batch_names_the_batch_and_the_fix() -> None:
    def forward(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    images = [np.zeros((224, 224, 3), dtype=np.uint8)] * 4
    with pytest.raises(DeviceOutOfMemoryError) as raised:
        run_on_batch(forward, images, PreprocessConfig(), "cpu", None)
    message = str(raised.value)
    assert "a batch of 4 images" in message and "smaller batch_size" in message
    assert_names_the_stack(message)
    assert isinstance(raised.value, ConfigurationError)


def test_one_image_the_device_refuses_still_falls_back_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    good, bad = jpeg(64, 48), jpeg(40, 30)

    def decode_jpeg(data, mode="RGB", device="cpu"):
        if isinstance(data, list):
            raise RuntimeError("batch failed")
        if data == bad:
            raise RuntimeError("corrupt entropy segment")
        return torch.zeros((3, 64, 48), dtype=torch.uint8)

    monkeypatch.setattr(device_decode, "import_decode_jpeg", lambda: decode_jpeg)
    results = decode_on_device(
        [EncodedJpeg(good, 48, 64), EncodedJpeg(bad, 30, 40)], PreprocessConfig().with_decode_mode("device"), "cpu"
    )
    assert isinstance(results[0], torch.Tensor)  # decoded on the device
    assert isinstance(results[1], np.ndarray) and results[1].shape == (224, 224, 3)  # Pillow decoded it


@pytest.mark.parametrize(
    "visible, hidden",
    [
        ("", True),
        ("-1", True),
        ("NoDevFiles", True),
        ("none", True),
        ("-1,0", True),
        ("0", False),
        ("1,0", False),
        ("GPU-5f1a", False),
    ],
)
def test_gpus_count_as_hidden_as_cuda_reads_the_mask(monkeypatch, visible: str, hidden: bool) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_environment.gpus_hidden_on_purpose() is hidden


def test_an_explicit_cuda_device_on_a_mismatched_host_names_the_fix(driver_sees_gpus_torch_does_not) -> None:
    with pytest.raises(DeviceSetupError, match="update the NVIDIA driver"):
        resolve_device("cuda")


def test_the_gpus_count_even_when_the_driver_cannot_describe_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = types.ModuleType("pynvml")
    nvml.nvmlInit = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 2
    nvml.nvmlSystemGetDriverVersion = lambda: b"550.54.15"

    def no_cuda_version():
        raise RuntimeError("NVML_ERROR_FUNCTION_NOT_FOUND")

    nvml.nvmlSystemGetCudaDriverVersion = no_cuda_version
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu_environment.driver_view() == (2, "550.54.15", None)
    assert gpu_environment.count_gpus() == 2
