"""What this process can see of NVIDIA GPUs, in the driver's view (NVML) and in torch's, for the checks that
turn a broken GPU stack into an error instead of a silent run on the CPU.

The driver and torch disagree in the cases users meet: a CUDA 12 driver under torch's CUDA 13 build, a
CPU-only torch on a GPU machine. NVML ignores ``CUDA_VISIBLE_DEVICES``, so GPUs hidden on purpose
(``CUDA_VISIBLE_DEVICES=""`` or ``-1``) are not a mismatch. Importing this module imports neither torch nor NVML.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

from dask_clip.errors import DeviceOutOfMemoryError, DeviceSetupError

NATIVE_BF16_CAPABILITY = (8, 0)
"""The CUDA compute capability from which bfloat16 runs natively (Ampere); older GPUs emulate it, slowly."""
TORCH_INDEX = "https://download.pytorch.org/whl"


@dataclass(frozen=True)
class GpuEnvironment:
    """The GPU stack of one process: ``host``; the driver's GPU count, version and newest CUDA it supports
    (``"13.0"``; None without a driver); torch's version, the CUDA it was built for (None for a CPU build)
    and the GPUs it can use here."""

    host: str
    driver_gpus: int
    driver_version: str | None
    driver_cuda: str | None
    torch_version: str
    torch_cuda: str | None
    torch_gpus: int

    def describe(self) -> str:
        """One line for error messages, e.g. ``on host gpu-3: NVIDIA driver 550.54 (CUDA 12.4) sees 2
        GPU(s); torch 2.14.1 (built for CUDA 13.0) can use 0``."""
        if self.driver_version is None:
            driver = "no NVIDIA driver answers (NVML)"
        else:
            driver = f"NVIDIA driver {self.driver_version} (CUDA {self.driver_cuda}) sees {self.driver_gpus} GPU(s)"
        built = f"built for CUDA {self.torch_cuda}" if self.torch_cuda else "a CPU-only build"
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        mask = "" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})"
        return f"on host {self.host}: {driver}; torch {self.torch_version} ({built}) can use {self.torch_gpus}{mask}"

    def torch_mismatch_fix(self) -> str:
        """What to do when the driver sees GPUs that torch cannot use."""
        if self.torch_cuda is None:
            return (
                f"install a CUDA build of torch {self.torch_version.split('+')[0]} "
                f"(pip install torch --index-url {TORCH_INDEX}/cu130), or set CUDA_VISIBLE_DEVICES='' to run on the CPU"
            )
        if self.driver_cuda and _major(self.driver_cuda) < _major(self.torch_cuda):
            return (
                f"the driver supports CUDA {self.driver_cuda} but this torch needs CUDA {self.torch_cuda}: update the "
                f"NVIDIA driver, or install torch, torchcodec and RAPIDS built for CUDA {_major(self.driver_cuda)} "
                "(the README's CUDA 12 recipe)"
            )
        return (
            "check that this process may use the GPUs (CUDA_VISIBLE_DEVICES, a container's --gpus) "
            "and that nvidia-smi works"
        )


def _major(version: str) -> int:
    return int(version.split(".")[0])


def gpus_hidden_on_purpose() -> bool:
    """Whether ``CUDA_VISIBLE_DEVICES`` hides every GPU from this process. CUDA reads its entries up to the
    first invalid one, so a first entry that is no device index or UUID (``""``, ``-1``, ``none``, Slurm's
    ``NoDevFiles``) hides them all."""
    return _hides_every_gpu(os.environ.get("CUDA_VISIBLE_DEVICES"))


def _hides_every_gpu(visible: str | None) -> bool:
    if visible is None:
        return False
    first = visible.split(",")[0].strip()
    return not (first.isdigit() or first.startswith(("GPU-", "MIG-")))


def driver_view() -> tuple[int, str | None, str | None]:
    """NVML's GPU count, driver version and the newest CUDA the driver supports (``"12.4"``);
    ``(0, None, None)`` without ``nvidia-ml-py``, a driver or a device."""
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no library, no driver and no device all mean: the driver sees nothing
        return 0, None, None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        version = version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - the GPUs are there; only the description is missing
        version = None
    try:
        cuda = int(pynvml.nvmlSystemGetCudaDriverVersion())
    except Exception:  # noqa: BLE001
        return count, version, None
    return count, version, f"{cuda // 1000}.{cuda % 1000 // 10}"


def count_gpus() -> int:
    """How many NVIDIA GPUs the driver sees (NVML); 0 when there is no driver or no device."""
    return driver_view()[0]


def detect() -> GpuEnvironment:
    """The GPU stack of this process (imports torch; does not create a CUDA context)."""
    import torch

    driver_gpus, driver_version, driver_cuda = driver_view()
    torch_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    torch_view = (torch.__version__, torch.version.cuda, torch_gpus)
    return GpuEnvironment(socket.gethostname(), driver_gpus, driver_version, driver_cuda, *torch_view)


@dataclass(frozen=True)
class ProcessGpuView:
    """What one process (a Dask worker) would run a model on: its ``host``, the GPUs its NVIDIA driver sees
    (NVML, blind to ``CUDA_VISIBLE_DEVICES``), its ``CUDA_VISIBLE_DEVICES`` (None when unset) and, only when the
    driver sees GPUs that are not hidden on purpose, its torch's view (``environment``; else torch is not
    imported)."""

    host: str
    driver_gpus: int
    visible: str | None
    environment: GpuEnvironment | None

    @property
    def hidden(self) -> bool:
        """Whether ``CUDA_VISIBLE_DEVICES`` hides every GPU from this process on purpose."""
        return _hides_every_gpu(self.visible)

    @property
    def device(self) -> str:
        """The GPU that torch's ``"cuda"`` device is here: the first entry of ``CUDA_VISIBLE_DEVICES`` (an index
        or a UUID), else ``"0"``."""
        return "0" if self.visible is None else self.visible.split(",")[0].strip()

    @property
    def torch_uses_gpus(self) -> bool:
        """Whether torch here can use a GPU (then ``device=None`` means ``"cuda"``)."""
        return self.environment is not None and self.environment.torch_gpus > 0


def process_gpu_view() -> ProcessGpuView:
    """This process's ``ProcessGpuView`` (imports torch only when the driver sees GPUs that are not hidden)."""
    driver_gpus = count_gpus()
    environment = detect() if driver_gpus and not gpus_hidden_on_purpose() else None
    return ProcessGpuView(socket.gethostname(), driver_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"), environment)


def check_torch_sees_gpus(environment: GpuEnvironment) -> None:
    """``DeviceSetupError`` when the driver sees GPUs that torch cannot use (and they are not hidden on purpose)."""
    if environment.driver_gpus and not environment.torch_gpus and not gpus_hidden_on_purpose():
        raise DeviceSetupError(
            f"torch cannot use the GPUs that the NVIDIA driver sees, {environment.describe()}. "
            f"Fix: {environment.torch_mismatch_fix()}. (dask_clip does not fall back to the CPU silently; "
            "give device='cpu' to run there on purpose.)"
        )


def has_native_bf16(capability: tuple[int, int]) -> bool:
    """Whether a GPU of CUDA compute ``capability`` runs bfloat16 natively (``>= NATIVE_BF16_CAPABILITY``)."""
    return tuple(capability) >= NATIVE_BF16_CAPABILITY


@contextlib.contextmanager
def out_of_memory_is_loud(device: object, batch_size: int, what: str = "a batch") -> Iterator[None]:
    """Turn torch's out-of-memory error in the block into a ``DeviceOutOfMemoryError`` naming the host, the
    torch and CUDA versions, ``batch_size`` and the fix."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        raise DeviceOutOfMemoryError(
            f"{what} of {batch_size} images does not fit in the memory of {device} {detect().describe()}: {error}. "
            "Fix: a smaller batch_size, fewer embedding tasks per GPU (a larger num_gpus_per_worker), or a "
            "GPU with more memory."
        ) from error
