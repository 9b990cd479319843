"""ci/check_gpu_extras.py: what it calls a second CUDA stack or an ancient RAPIDS release (the resolution itself
needs the package index and runs in ci/test.sh)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "ci" / "check_gpu_extras.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("check_gpu_extras", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def packages(*pairs: str) -> list[dict[str, str]]:
    return [{"name": name, "version": version} for name, version in (pair.split("==") for pair in pairs)]


HEALTHY = (
    "torch==2.14.1",
    "cuda-bindings==13.5.0",
    "cupy-cuda13x==14.2.0",
    "nvidia-cudnn-cu13==9.24.0.43",
    "dask-cuda==26.10.0",
    "cudf-cu13==26.10.2",
    "dask-cudf-cu13==26.10.2",
    "rmm-cu13==26.10.0",
    "distributed-ucxx-cu13==0.52.0",
)


def test_one_cuda_13_stack_of_the_chosen_release_passes(check) -> None:
    assert check.problems(packages(*HEALTHY)) == []


@pytest.mark.parametrize(
    "intruder, problem",
    [
        ("cudf-cu12==25.6.0", "cudf-cu12 25.6.0 targets CUDA 12"),
        ("cuda-python==12.9.0", "cuda-python 12.9.0 targets CUDA 12"),
        ("cupy-cuda12x==13.4.0", "cupy-cuda12x 13.4.0 targets CUDA 12"),
        ("nvidia-cublas-cu12==12.8.4.1", "targets CUDA 12"),
        ("cuda-toolkit==12.8.1", "cuda-toolkit 12.8.1 targets CUDA 12"),
        ("cuda_bindings==12.9.0", "targets CUDA 12"),
        ("dask-cuda==0.18.0", "dask-cuda 0.18.0 is older than RAPIDS 26.10"),
        ("rmm-cu13==25.12.0", "older than RAPIDS 26.10"),
        ("distributed-ucxx-cu13==0.46.0", "older than ucxx 0.52"),
    ],
)
def test_another_cuda_major_or_an_older_release_is_a_problem(check, intruder: str, problem: str) -> None:
    found = check.problems(packages(*HEALTHY, intruder))
    assert any(problem in line for line in found), found


def test_a_resolution_without_dask_cuda_is_a_problem(check) -> None:
    assert check.problems(packages("torch==2.14.1")) == ["dask-cuda was not resolved at all"]
